"""``fastdpo demo``: the whole loop on the embedded task."""
from __future__ import annotations

from pathlib import Path

from fastdpo.demo.config import DEFAULT_CONFIG
from fastdpo.demo.pipeline import run_demo


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole loop on the embedded task: tokenizer, SFT, mining, DPO, eval (CPU minutes)",
        description="Train a tokenizer and a tiny GPT on the embedded task, mine preference pairs with "
                    "the task's judge, run DPO (and its ablation arms), and evaluate against SFT.")
    p.add_argument("--config", type=Path, default=None, help=f"demo recipe (default {DEFAULT_CONFIG.name})")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every phase (~1 min)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (rebuilt)")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument("--rounds", type=int, default=1,
                   help="N > 1: N online rounds (mine from the current policy, DPO, gate) against one round "
                        "with the same pairs budget, instead of the ablation arms")
    p.set_defaults(func=lambda a: 0 if run_demo(a.config, quick=a.quick, out=a.out, seed=a.seed,
                                                rounds=a.rounds) else 1)


