"""``fastdpo export --hf OUT CKPT``: a checkpoint as a directory transformers and vLLM load."""
from __future__ import annotations

from pathlib import Path

from fastdpo.models.hf_export import ADAPTER_DIR, DTYPES, export_hf


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint in Hugging Face format (transformers, vLLM)",
        description="Write CKPT (a fastdpo checkpoint or a Hugging Face directory) to OUT as config.json + "
                    "safetensors + tokenizer files with the chat template, loadable by "
                    "AutoModelForCausalLM/AutoTokenizer.from_pretrained without custom code.")
    p.add_argument("--hf", required=True, type=Path, metavar="OUT", help="output directory (must not exist)")
    p.add_argument("ckpt", type=Path, metavar="CKPT", help="checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer to export (default: the checkpoint's own)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' dtype on disk")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--merge", action="store_true",
                   help="for a LoRA checkpoint: merge the adapter into the weights (default: the base model "
                        "in OUT and the PEFT adapter in OUT/adapter)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    out = export_hf(args.ckpt, args.hf, tokenizer=args.tokenizer, dtype=args.dtype, overwrite=args.overwrite,
                    merge=args.merge)
    if (out / ADAPTER_DIR).is_dir():
        adapter = out / ADAPTER_DIR
        print(f"exported the base model of {args.ckpt} -> {out} and its LoRA adapter -> {adapter} "
              f"(peft: PeftModel.from_pretrained; vLLM: --enable-lora --lora-modules NAME={adapter}); "
              f"--merge writes merged weights instead")
    else:
        print(f"exported {args.ckpt} -> {out}")
    return 0
