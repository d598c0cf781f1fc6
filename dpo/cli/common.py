"""Arguments and helpers several subcommands share (judge selection, devices, precisions)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fastdpo.generation.judge import DEFAULT_RETRY_BUDGET

# Sampling precision flags -> autocast dtype (None: the weights' own float32).
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")


def add_judge_args(p: argparse.ArgumentParser) -> None:
    """--judge / --judge-url / --judge-model / --judge-concurrency / --judge-timeout /
    --judge-retry-budget."""
    g = p.add_argument_group("judge")
    g.add_argument("--judge", default=None,
                   help="judge by name: 'openai' (with --judge-url/--judge-model), 'task' (the demo "
                        "task's checker), or MODULE:FN, a function score(instruction: str, response: "
                        "str) -> int 1-10 (higher is better; None: no score) in MODULE, imported from "
                        "the working directory or the Python path (also a Judge subclass, instance or "
                        "factory)")
    g.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--judge-model", default=None,
                   help="model name served there, e.g. Qwen/Qwen2.5-7B-Instruct")
    g.add_argument("--judge-concurrency", type=int, default=16, help="requests in flight (openai judge)")
    g.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request (openai judge)")
    g.add_argument("--judge-retry-budget", type=float, default=DEFAULT_RETRY_BUDGET, metavar="SECONDS",
                   help="how long the judge may keep failing (timeouts, refused connections, 429, 5xx; "
                        "retried with backoff, honouring Retry-After) without one success before the "
                        "run stops, keeping what is done (openai judge; default %(default)g)")


def judge_from_args(args):
    """The judge the flags name; a ``module:fn`` judge is importable from the working directory, as
    with ``python -m`` (the installed ``fastdpo`` script's own path does not hold it)."""
    from fastdpo.generation.judge import make_judge
    module_judge = (args.judge and ":" in args.judge) or getattr(args, "rubric", None)
    if module_judge and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    from fastdpo.cli.rubrics import rubric_judge_from_args
    rubrics = rubric_judge_from_args(args, lambda spec: make_judge(spec))
    if rubrics is not None:
        return rubrics
    kw = {}
    if (args.judge or "openai") == "openai":
        kw = dict(concurrency=args.judge_concurrency, timeout=args.judge_timeout,
                  retry_budget=args.judge_retry_budget)
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
