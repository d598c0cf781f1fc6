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


# sampler flag -> GenerationConfig field; a flag left out keeps the config file's value or the default
SAMPLER_FLAGS = {"sampler": "backend", "sampler_url": "url", "sampler_model": "model",
                 "sampler_concurrency": "concurrency", "sampler_token_ids": "token_ids",
                 "sampler_hf_dir": "hf_dir", "gpu_memory_utilization": "gpu_memory_utilization",
                 "sampler_reload": "reload", "sampler_reload_command": "reload_command"}


def add_sampler_args(p: argparse.ArgumentParser, reload: bool = False) -> None:
    """--sampler and its settings (``generation.backends.GenerationConfig``); ``reload``: also how
    a new policy reaches the sampler (the online loop)."""
    g = p.add_argument_group("sampler (what generates the answers)")
    g.add_argument("--sampler", choices=("builtin", "openai", "vllm"), default=None,
                   help="builtin (default): fastdpo's KV-cached sampler in this process; openai: an "
                        "OpenAI-compatible server serving the policy (vllm serve, fastdpo serve) at "
                        "--sampler-url; vllm: vllm.LLM in this process (needs the [vllm] extra and a "
                        "CUDA GPU)")
    g.add_argument("--sampler-url", default=None, help="openai: base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--sampler-model", default=None,
                   help="openai: the served model's name (default: the first the server lists)")
    g.add_argument("--sampler-concurrency", type=int, default=None, help="openai: requests in flight (8)")
    g.add_argument("--sampler-token-ids", choices=("auto", "token_ids", "logprobs", "text"), default=None,
                   help="openai: how the sampled token ids come back (auto, the default: what the server "
                        "offers; text: re-encode the answers, dropping those that do not round-trip)")
    g.add_argument("--sampler-hf-dir", default=None,
                   help="vllm: the exported model directory (default: export the checkpoint to a "
                        "temporary one)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vllm: the engine's share of GPU memory (0.5)")
    if reload:
        g.add_argument("--sampler-reload", choices=("none", "lora", "command"), default=None,
                       help="openai: how each promoted policy reaches the server: lora (vLLM's "
                            "/v1/load_lora_adapter; LoRA rounds) or command (--sampler-reload-command)")
        g.add_argument("--sampler-reload-command", default=None,
                       help="openai: a shell command that restarts the server on the new policy; "
                            "{policy} and {hf_dir} (the policy exported, merged) are filled in")


def add_sampler_b_args(p: argparse.ArgumentParser) -> None:
    """B's server and model, for commands that sample two checkpoints (eval, label)."""
    p.add_argument("--sampler-url-b", default=None, help="openai: B's server (default: --sampler-url)")
    p.add_argument("--sampler-model-b", default=None,
                   help="openai: B's served model name (needed when A and B share a server)")


def generation_config_from_args(args, side: str = "a", base: dict | None = None, where: str = "generation"):
    """The ``GenerationConfig`` of a config file's ``generation`` section (``base``) with the flags
    given on top (``side="b"``: with B's server and model)."""
    from fastdpo.errors import ConfigError
    from fastdpo.generation.backends import GenerationConfig
    from fastdpo.training.config import from_dict
    values = dict(base or {})
    for flag, name in SAMPLER_FLAGS.items():
        if getattr(args, flag, None) is not None:
            values[name] = getattr(args, flag)
    if side == "b":
        url = values.get("url")
        shared = args.sampler_url_b in (None, url)
        if values.get("backend") == "openai" and not args.sampler_model_b and shared:
            raise ConfigError("--sampler openai: name B's served model with --sampler-model-b "
                              "(or its server with --sampler-url-b)")
        values["url"], values["model"] = args.sampler_url_b or url, args.sampler_model_b
    try:
        return from_dict(GenerationConfig, values, where)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def policy_sampler(args, ckpt: str, tokenizer_path: str | None, device, dtype, side: str = "a"):
    """``(sampler, tokenizer)`` for the policy ``ckpt``: the built-in sampler on the loaded model, or
    the backend ``--sampler`` names (which only needs the checkpoint's tokenizer and config)."""
    from fastdpo.generation.backends import BuiltinSampler, make_backend
    from fastdpo.models.checkpoint import load_policy, load_tokenizer
    from fastdpo.models.tokenizer import open_tokenizer
    config = generation_config_from_args(args, side)
    if config.backend == "builtin":
        model, tok = load_policy(ckpt, tokenizer_path, device)
        return BuiltinSampler(model, dtype, device), tok
    tok = open_tokenizer(tokenizer_path) if tokenizer_path else load_tokenizer(ckpt)
    return make_backend(config, ckpt, tok, device=device, dtype=dtype), tok


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
