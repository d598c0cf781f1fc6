"""``fastdpo train``: DPO from an SFT checkpoint (``--sweep`` for several runs, ``--nproc`` for torchrun)."""
from __future__ import annotations

from pathlib import Path

import yaml

from fastdpo import runtime
from fastdpo.generation.heldout import HeldoutProbe
from fastdpo.training.config import load_config
from fastdpo.training.dpo import run_dpo
from fastdpo.training.sweep import run_sweep


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("train", help="DPO-train a policy from an SFT checkpoint on preference pairs",
                              description="DPO training. Settings come from --config (YAML with sections "
                                          "train/dpo/data) and --set overrides.")
    p.add_argument("--config", type=Path, help="YAML config, e.g. configs/dpo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value: beta=0.2, train.max_steps=100, data.path=[a.jsonl]")
    p.add_argument("--sft-checkpoint", type=Path,
                   help="SFT checkpoint or Hugging Face model directory (overrides the config)")
    p.add_argument("--tokenizer", type=Path,
                   help="tokenizer.json or directory (default: the checkpoint's own)")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--wandb", choices=["auto", "disabled", "offline", "online"], help="W&B mode")
    p.add_argument("--report-to", default=None, metavar="LIST",
                   help="trackers besides metrics.jsonl: wandb,tensorboard or none (train.report_to)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="train one run per value (e.g. beta=0.05,0.1,0.5) sharing cached reference log-probs")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes (N GPUs, or N CPU processes): re-launches this command "
                        "under torchrun; train.batch_size is per process")
    p.set_defaults(func=_cli)


def _relaunch_argv(args) -> list[str]:
    argv = ["train", *(["--config", str(args.config)] if args.config else [])]
    for flag, value in (("--sft-checkpoint", args.sft_checkpoint), ("--tokenizer", args.tokenizer),
                        ("--wandb", args.wandb), ("--report-to", args.report_to)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [x for o in args.overrides for x in ("--set", o)]
    argv += [x for o in args.sweep for x in ("--sweep", o)]
    return argv + (["--resume"] if args.resume else [])


def _cli(args) -> int:
    if args.nproc is not None and args.nproc > 1:
        return runtime.relaunch(args.nproc, "fastdpo.cli", _relaunch_argv(args))
    overrides = list(args.overrides)
    if args.wandb:
        overrides.append(f"train.wandb={args.wandb}")
    if args.report_to:
        overrides.append(f"train.report_to=[{args.report_to}]")
    cfg = load_config(args.config, overrides, kind="dpo")
    sft = args.sft_checkpoint or cfg["sft_checkpoint"]
    if sft is None:
        raise ValueError("no SFT checkpoint: set sft_checkpoint in the config or pass --sft-checkpoint")
    tokenizer = args.tokenizer or cfg["tokenizer"]
    if args.sweep:
        sweep = {}
        for item in args.sweep:
            key, sep, values = item.partition("=")
            if not sep or not values:
                raise ValueError(f"--sweep expects key=v1,v2,..., got {item!r}")
            sweep[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
        run_sweep(sft, cfg["train"], cfg["dpo"], cfg["data"], tokenizer, sweep=sweep, resume=args.resume,
                  health=cfg["health"], heldout_probe=HeldoutProbe.from_config(cfg["health"]))
    else:
        run_dpo(sft, cfg["train"], cfg["dpo"], cfg["data"], tokenizer, resume=args.resume,
                health=cfg["health"], heldout_probe=HeldoutProbe.from_config(cfg["health"]))
    return 0
