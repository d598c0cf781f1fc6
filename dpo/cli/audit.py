"""``fastdpo audit``: what is in a preference file before training on it (length bias,
formatting-only and near-identical pairs, duplicates, contradictions, lengths, label consistency)."""
from __future__ import annotations

from fastdpo.cli.common import add_judge_args, judge_from_args
from fastdpo.training.audit import DROP_CLASSES, NEAR_IDENTICAL, audit_preferences
from fastdpo.training.audit_report import format_audit


def add_subcommand(sub) -> None:
    p = sub.add_parser("audit", help="audit preference files: length bias, formatting-only and "
                                     "near-identical pairs, duplicates, contradictions (table, JSON, PNG)")
    p.add_argument("data", nargs="*",
                   help="preference files (JSONL or JSON arrays; every format train reads)")
    p.add_argument("--config", default=None,
                   help="a train config: its data.path, data.format, tokenizer and length limits")
    p.add_argument("--format", default="auto", help="auto | prompt | conversations | hh")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tokenizer", default=None,
                     help="tokenizer.json: lengths in tokens (default: characters)")
    src.add_argument("--ckpt", default=None, help="a checkpoint: its tokenizer and block size")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt + answer token limit, as training's (default: the config's, 1024)")
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="prompt token limit (default: the config's, 512)")
    p.add_argument("--max-completion-length", type=int, default=None,
                   help="answer token limit (default: the config's, none)")
    p.add_argument("--block-size", type=int, default=None, help="model context (default: the checkpoint's)")
    p.add_argument("--near-identical", type=float, default=NEAR_IDENTICAL, metavar="SIM",
                   help="similarity from which a pair counts as near-identical")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--png", default=None, help="write the length distributions as a PNG here")
    p.add_argument("--write-clean", default=None, metavar="OUT",
                   help="write the good rows minus the --drop classes as JSONL here")
    p.add_argument("--drop", default=",".join(DROP_CLASSES),
                   help=f"classes --write-clean leaves out (comma-separated): {','.join(DROP_CLASSES)}")
    p.add_argument("--judge-sample", type=int, default=200, help="pairs the judge checks (with --judge)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    add_judge_args(p)
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    judge = judge_from_args(args) if args.judge or args.judge_url else None
    try:
        report = audit_preferences(
            args.data, fmt=args.format, tokenizer=args.tokenizer, ckpt=args.ckpt, config=args.config,
            max_length=args.max_length, max_prompt_length=args.max_prompt_length, block_size=args.block_size,
            max_completion_length=args.max_completion_length,
            near_identical_threshold=args.near_identical, judge=judge, judge_sample=args.judge_sample,
            seed=args.seed, json_path=args.json, png_path=args.png, write_clean=args.write_clean,
            drop=[d.strip() for d in args.drop.split(",") if d.strip()], progress=not args.no_progress)
    finally:
        if judge is not None:
            judge.close()
    print(format_audit(report))
    for flag, path in (("json", args.json), ("png", args.png)):
        if path:
            print(f"  {flag}: {path}")
    return 0
