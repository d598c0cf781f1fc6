"""Arguments and helpers several subcommands share (judge selection, devices, precisions)."""
from __future__ import annotations

import argparse

import torch

# Sampling precision flags -> autocast dtype (None: the weights' own float32).
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")


def add_judge_args(p: argparse.ArgumentParser) -> None:
    """--judge / --judge-url / --judge-model / --judge-concurrency / --judge-timeout."""
    g = p.add_argument_group("judge")
    g.add_argument("--judge", default=None,
                   help="judge by name: 'openai' (with --judge-url/--judge-model), 'task' (the demo "
                        "task's checker), or module:attr")
    g.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--judge-model", default=None,
                   help="model name served there, e.g. Qwen/Qwen2.5-7B-Instruct")
    g.add_argument("--judge-concurrency", type=int, default=16, help="requests in flight (openai judge)")
    g.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request (openai judge)")


def judge_from_args(args):
    from fastdpo.generation.judge import make_judge
    kw = {}
    if (args.judge or "openai") == "openai":
        kw = dict(concurrency=args.judge_concurrency, timeout=args.judge_timeout)
    return make_judge(args.judge, url=args.judge_url, model=args.judge_model, **kw)


def parse_floats(flag: str, s: str) -> list[float]:
    try:
        return [float(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {s!r}") from None


class MissingExtraError(ValueError):
    """An optional dependency of a command is not installed."""


def require_extra(command: str, extra: str, *modules: str) -> None:
    """One clear line naming the extra to install when a command's optional dependencies are missing."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"'fastdpo {command}' needs the optional '{extra}' dependencies (missing: "
                                f"{', '.join(missing)}); install them with: pip install 'fastdpo[{extra}]'")


API_KEY_ENV = "FASTDPO_API_KEY"


def add_access_args(p: argparse.ArgumentParser) -> None:
    """--api-key (or FASTDPO_API_KEY) and --allow-unauthenticated, for commands that serve HTTP."""
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health "
                        f"(default: ${API_KEY_ENV})")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow binding beyond loopback without an API key (prints a warning)")


def api_key_from_args(args) -> str | None:
    import os
    return args.api_key or os.environ.get(API_KEY_ENV) or None
