"""The ``fastdpo`` console script.

Each subcommand lives next to the library function it wraps: a module listed in
``SUBCOMMAND_MODULES`` exposes ``add_subcommand(subparsers)``, which adds a parser whose
``func(args)`` calls that function with the same parameters, so the CLI and the Python API
cannot drift apart.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# libgomp reads this once, when torch loads: its default spinning barriers made the chunked CPU
# kernels 2-9x slower at 2 threads whenever another process shares the cores (bench.kernels).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastdpo import __version__  # noqa: E402

SUBCOMMAND_MODULES: list[str] = [
    "fastdpo.cli.pairs", "fastdpo.cli.eval", "fastdpo.cli.serve", "fastdpo.cli.sft", "fastdpo.cli.train",
    "fastdpo.cli.bench", "fastdpo.cli.demo", "fastdpo.cli.label", "fastdpo.cli.export",
    "fastdpo.cli.tokenizer", "fastdpo.cli.audit", "fastdpo.cli.loop",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdpo",
        description="Fast, kernel-accelerated DPO for GPT-2 and Llama-family models: sample, judge, "
                    "train, evaluate.")
    parser.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser("version", help="print the fastdpo, torch and triton versions")
    version.set_defaults(func=_print_version)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommand(sub)
    return parser


def _print_version(args) -> int:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"fastdpo {__version__} (torch {torch.__version__}, triton {triton_version}, {cuda})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # Bad input (files, fields, shapes) is reported in one line; set
        # FASTDPO_TRACEBACK=1 to see where it was raised.
        if os.environ.get("FASTDPO_TRACEBACK"):
            raise
        print(f"fastdpo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
