"""The vLLM generation backends checked for real, on a machine with a CUDA GPU and ``fastdpo[vllm]``.

1. Greedy answers of the in-process ``vllm`` backend against the built-in sampler on the same
   checkpoint: the fraction of rows with identical token ids and finish reasons (both in float32
   unless ``--dtype`` says otherwise; kernels differ, so a few late tokens may too).
2. With ``--sampler-url`` (a ``vllm serve`` of ``fastdpo export --hf --merge CKPT``): the same for
   the ``openai`` backend, and whether it returned token ids itself (``token_ids`` / ``logprobs``).
3. The mining rows of ``fastdpo.bench.mining_backends`` for every backend available.

    python -m fastdpo.bench.vllm_gpu --ckpt runs/sft/final [--sampler-url http://localhost:8001/v1]

Writes ``--json`` (default bench/results/vllm_gpu.json). Without a GPU or vLLM it says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.bench.mining_backends import _prompts, bench_mining_backends, format_rows
from fastdpo.errors import FastdpoError
from fastdpo.generation.backends import BuiltinSampler, GenerationConfig, make_backend
from fastdpo.models.checkpoint import load_policy


def agreement(reference, other, prompts, tok, max_new_tokens: int) -> dict:
    temps = [0.0] * len(prompts)
    ref_ids, ref_fin = reference.sample(prompts, temps, max_new_tokens, None, tok.eos_id, 0)
    ids, fin = other.sample(prompts, temps, max_new_tokens, None, tok.eos_id, 0)
    same = [a == b and f == g for a, b, f, g in zip(ref_ids, ids, ref_fin, fin)]
    return {"rows": len(prompts), "identical": sum(same), "identical_fraction": sum(same) / len(prompts),
            "truncated_builtin": ref_fin.count("length"), "truncated_other": fin.count("length"),
            "stats": other.stats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdpo.bench.vllm_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="policy checkpoint (default: a random demo-shaped model)")
    p.add_argument("--sampler-url", default=None, help="a vllm serve of the exported checkpoint")
    p.add_argument("--sampler-model", default=None)
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="timed mining runs per backend")
    p.add_argument("--json", default="bench/results/vllm_gpu.json")
    a = p.parse_args(argv)
    out: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as d:
        ckpt = a.ckpt or make_tiny_checkpoint(Path(d) / "demo-shaped", n_layer=4, n_embd=160, n_head=4,
                                              block_size=256, stop_logit=3.0)
        model, tok = load_policy(ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
        prompts = [tok.render_prompt(x) for x in _prompts(a.n_prompts)]
        builtin = BuiltinSampler(model)
        try:
            config = GenerationConfig(backend="vllm", dtype="float32",
                                      gpu_memory_utilization=a.gpu_memory_utilization)
            engine = make_backend(config, ckpt, tok)
        except FastdpoError as e:
            print(f"vllm_gpu: {e}", file=sys.stderr)
            return 2
        out["vllm_greedy"] = agreement(builtin, engine, prompts, tok, a.max_new_tokens)
        engine.close()
        if a.sampler_url:
            config = GenerationConfig(backend="openai", url=a.sampler_url, model=a.sampler_model)
            server = make_backend(config, ckpt, tok)
            out["openai_greedy"] = agreement(builtin, server, prompts, tok, a.max_new_tokens)
            server.close()
        del model, builtin
        torch.cuda.empty_cache()
        out["mining"] = bench_mining_backends(ckpt, sampler_url=a.sampler_url, sampler_model=a.sampler_model,
                                              n_prompts=a.n_prompts, repeats=a.repeats)
    print(json.dumps({k: v for k, v in out.items() if k != "mining"}, indent=2))
    print(format_rows(out["mining"]))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
