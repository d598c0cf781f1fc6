"""``fastdpo sft``: supervised fine-tuning, the starting checkpoint of DPO."""
from __future__ import annotations

from pathlib import Path

from fastdpo.generation.heldout import HeldoutProbe
from fastdpo.models.families import PRESETS
from fastdpo.training.config import load_config
from fastdpo.training.sft import run_sft


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning on prompt/response JSONL (makes the DPO start)",
        description="SFT. Settings come from --config (YAML with sections train/sft/data and "
                    "init_checkpoint or model) and --set overrides.")
    p.add_argument("--config", type=Path, help="YAML config, e.g. configs/sft.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value: train.max_steps=100, data.path=[sft.jsonl]")
    p.add_argument("--init", help="checkpoint directory, Hugging Face model directory, or model preset "
                                  "(overrides init_checkpoint/model)")
    p.add_argument("--tokenizer", type=Path,
                   help="tokenizer.json or tokenizer directory (default: the checkpoint's; a fresh model "
                        "without one gets a BPE trained on the data, sft.tokenizer_vocab_size tokens)")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--wandb", choices=["auto", "disabled", "offline", "online"], help="W&B mode")
    p.add_argument("--report-to", default=None, metavar="LIST",
                   help="trackers besides metrics.jsonl: wandb,tensorboard or none (train.report_to)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    overrides = list(args.overrides)
    if args.wandb:
        overrides.append(f"train.wandb={args.wandb}")
    if args.report_to:
        overrides.append(f"train.report_to=[{args.report_to}]")
    cfg = load_config(args.config, overrides, kind="sft")
    init = args.init or cfg["init_checkpoint"] or cfg["model"]
    if init is None:
        raise ValueError("nothing to fine-tune: set init_checkpoint (a checkpoint) or model (a preset: "
                         f"{sorted(PRESETS)}) in the config, or pass --init")
    tokenizer = args.tokenizer or cfg["tokenizer"]
    run_sft(init, cfg["train"], cfg["sft"], cfg["data"], tokenizer, resume=args.resume,
            health=cfg["health"], heldout_probe=HeldoutProbe.from_config(cfg["health"]))
    return 0
