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


TRACEBACK_ENV = "FASTDPO_TRACEBACK"
_HINT = f"(set {TRACEBACK_ENV}=1 for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure ends as one line on stderr, ``fastdpo COMMAND: error: ...``:
    anticipated ones (``FastdpoError``, any bad value, a file that cannot be read) with status 2,
    anything else as an internal error with status 1; ``FASTDPO_TRACEBACK=1`` re-raises instead."""
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
    except (ValueError, OSError, RecursionError, MemoryError) as e:
        if os.environ.get(TRACEBACK_ENV):
            raise
        _close_progress_bars()
        print(f"fastdpo {args.command}: error: {one_line(e)} {_HINT}", file=sys.stderr)
        return 2
    except Exception as e:   # a bug, not bad input: still one line, and the way to see more
        if os.environ.get(TRACEBACK_ENV):
            raise
        _close_progress_bars()
        print(f"fastdpo {args.command}: internal error: {type(e).__name__}: {one_line(e)} {_HINT}",
              file=sys.stderr)
        return 1


def _close_progress_bars() -> None:
    """A bar the error interrupted would otherwise hold the start of the error's line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.leave = False   # cleared: the error is the last thing on screen
        bar.close()
    sys.stderr.flush()


def one_line(e: BaseException) -> str:
    """An exception's message on one line (YAML, pydantic and OS errors span several)."""
    text = str(e)
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{text} ({e.filename})"
    if isinstance(e, RecursionError):
        text = f"input nested too deeply ({text})"
    return " ".join(text.split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
