"""``fastdpo tokenizer``: train fastdpo's byte-level BPE tokenizer on your own text or JSONL files."""
from __future__ import annotations

from pathlib import Path

from fastdpo.models.tokenizer import train_tokenizer


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "tokenizer", help="train a fastdpo tokenizer (byte-level BPE + chat tokens) on your files",
        description="Train fastdpo's tokenizer on text files (.txt: the text; .jsonl/.json: every string "
                    "in each row: prompts, answers, message contents) and write tokenizer.json.")
    p.add_argument("files", nargs="+", type=Path, help="training files")
    p.add_argument("--out", required=True, type=Path, help="tokenizer.json path or a directory")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    path = train_tokenizer(args.files, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    print(f"wrote {path}")
    return 0
