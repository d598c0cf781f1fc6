"""Mining throughput per generation backend: prompts/min and pairs/min at equal work.

Every backend mines the same prompts with the same K temperatures, ``max_new_tokens``, ``top_k``,
batch size, seed and judge; only what samples the answers changes:

- ``builtin``  the KV-cached sampler in this process;
- ``openai``   ``/v1/completions`` against ``fastdpo serve`` on the same checkpoint, started here as
               a subprocess with the same torch thread count (or against ``--sampler-url``, e.g.
               ``vllm serve`` of the exported model on a GPU machine);
- ``vllm``     ``vllm.LLM`` in this process (only with the ``[vllm]`` extra and a CUDA GPU; otherwise
               the row says why it was skipped).

Each backend mines once untimed (warm-up: the server's first batch, connections, the engine),
then the backends take turns mining ``repeats`` times and the median run is reported; the ratio to
``builtin`` is the figure to read (on CPU, the HTTP path should keep >= 80% of the built-in
sampler's prompts/min). The judge is a score-spreading stand-in by default so a random model still
yields pairs: the figures measure the sampling pipeline, not a kept rate.

    python -m fastdpo.bench.mining_backends [--ckpt DIR] [--sampler-url URL --sampler-model NAME]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from fastdpo.bench.judge import _task_prompts, make_tiny_checkpoint, start_server, stop_server
from fastdpo.generation.backends import BuiltinSampler, GenerationConfig, make_backend
from fastdpo.generation.judge import ProgrammaticJudge
from fastdpo.generation.mining import DEFAULT_TEMPS, mine_pairs
from fastdpo.models.checkpoint import load_policy


def _prompts(n: int) -> list[str]:
    return _task_prompts(n) or [f"Reverse the words: fox dog {i}" for i in range(n)]


def _judge(kind: str) -> ProgrammaticJudge:
    if kind == "task":
        from fastdpo.demo.task import score
        return ProgrammaticJudge(score, name="task")
    return ProgrammaticJudge(lambda _i, r: 1 + (7 * len(r)) % 10, name="spread")


def mine_once(sampler, tok, prompts, judge, settings: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        stats = mine_pairs(sampler, tok, prompts, judge, Path(d) / "pairs.jsonl", progress=False, **settings)
        seconds = time.perf_counter() - t0
    return {"prompts": stats.prompts_done, "pairs": stats.pairs_kept, "seconds": seconds,
            "prompts_per_min": 60 * stats.prompts_done / seconds,
            "pairs_per_min": 60 * stats.pairs_kept / seconds,
            "samples_truncated": stats.samples_truncated, "samples_unverified": stats.samples_unverified,
            "sample_s": stats.sample_s, "judge_s": stats.judge_s}


def bench_mining_backends(ckpt: str | Path | None = None, *, backends=("builtin", "openai", "vllm"),
                          sampler_url: str | None = None, sampler_model: str | None = None,
                          n_prompts: int = 64, batch_size: int = 16, max_new_tokens: int = 32,
                          top_k: int = 50, temps=DEFAULT_TEMPS, judge: str = "spread",
                          dtype: torch.dtype | None = None, concurrency: int = 8, seed: int = 0,
                          repeats: int = 3, device: str = "cpu") -> list[dict]:
    """One row per backend (see the module docstring): the median of ``repeats`` timed runs, the
    backends taking turns within each repeat so a busy neighbour hits them alike. ``ckpt`` defaults
    to a random model of the demo's shape (4 layers, 160 wide, block 256) that ends most of its turns."""
    settings = dict(temps=list(temps), max_new_tokens=max_new_tokens, top_k=top_k, batch_size=batch_size,
                    seed=seed, dtype=dtype)
    prompts = _prompts(n_prompts)
    rows: dict[str, dict] = {}
    samplers, procs = {}, []
    with tempfile.TemporaryDirectory() as d:
        if ckpt is None:
            ckpt = make_tiny_checkpoint(Path(d) / "demo-shaped", n_layer=4, n_embd=160, n_head=4,
                                        block_size=256, stop_logit=3.0)
        model, tok = load_policy(ckpt, device=device)   # builtin and fastdpo serve run where users run them
        common = {"phase": "mining", "n_prompts": n_prompts, "k": len(temps),
                  "max_new_tokens": max_new_tokens, "batch_size": batch_size, "judge": judge,
                  "threads": torch.get_num_threads(), "repeats": repeats, "device": device,
                  "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
                  "model_params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)}
        try:
            for name in backends:
                rows[name] = row = {**common, "name": f"mining_{name}", "backend": name}
                try:
                    samplers[name] = _sampler(name, ckpt, model, tok, row, procs, sampler_url, sampler_model,
                                              concurrency, dtype, batch_size * len(temps), device)
                    mine_once(samplers[name], tok, prompts[:batch_size], _judge(judge), settings)   # warm-up
                except ValueError as e:   # unavailable here (no vllm, no GPU, no server)
                    row["skipped"] = str(e)
            runs: dict[str, list[dict]] = {name: [] for name in samplers}
            for _ in range(repeats):
                for name, sampler in samplers.items():
                    runs[name].append(mine_once(sampler, tok, prompts, _judge(judge), settings))
            for name, sampler in samplers.items():
                timed = sorted(runs[name], key=lambda r: r["seconds"])
                rows[name].update(timed[len(timed) // 2])
                rows[name]["seconds_all"] = [round(r["seconds"], 3) for r in runs[name]]
                rows[name]["sampler_stats"] = sampler.stats
        finally:
            for sampler in samplers.values():
                sampler.close()
            for proc in procs:
                stop_server(proc)
    base = rows.get("builtin") if "skipped" not in rows.get("builtin", {"skipped": 1}) else None
    for r in rows.values():
        if base and "skipped" not in r:
            r["vs_builtin_prompts"] = r["prompts_per_min"] / base["prompts_per_min"]
            r["vs_builtin_pairs"] = (r["pairs_per_min"] / base["pairs_per_min"]
                                     if base["pairs_per_min"] else None)
    return list(rows.values())


def _sampler(name, ckpt, model, tok, row, procs, url, served, concurrency, dtype, rows_per_batch, device):
    if name == "builtin":
        return BuiltinSampler(model, dtype)
    if name == "vllm":
        return make_backend(GenerationConfig(backend="vllm"), ckpt, tok)
    if url is None:       # fastdpo serve on the same checkpoint, same threads, one mining batch a batch
        extra = ("--threads", str(torch.get_num_threads()), "--max-batch-rows", str(rows_per_batch),
                 "--device", device)
        if dtype is not None:
            extra += ("--dtype", "bf16")
        proc, url, _ = start_server(ckpt, extra_args=extra)
        procs.append(proc)
        row["server"] = "fastdpo serve (subprocess, same machine)"
    row.setdefault("server", url)
    return make_backend(GenerationConfig(backend="openai", url=url, model=served, concurrency=concurrency),
                        ckpt, tok)


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'backend':<10} {'prompts/min':>12} {'pairs/min':>10} {'vs builtin':>11}  notes"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['backend']:<10} {'-':>12} {'-':>10} {'-':>11}  skipped: {r['skipped']}")
            continue
        ratio = r.get("vs_builtin_prompts")
        lines.append(f"{r['backend']:<10} {r['prompts_per_min']:>12.1f} {r['pairs_per_min']:>10.1f} "
                     f"{(f'{ratio:.2f}x' if ratio else '-'):>11}  {r.get('server', '')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdpo.bench.mining_backends",
                                description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="policy checkpoint (default: a random demo-shaped model)")
    p.add_argument("--backends", default="builtin,openai,vllm")
    p.add_argument("--sampler-url", default=None,
                   help="openai: a running server (default: start fastdpo serve)")
    p.add_argument("--sampler-model", default=None)
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--judge", choices=("spread", "task"), default="spread")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per backend (the median is kept)")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = bench_mining_backends(a.ckpt, backends=tuple(a.backends.split(",")), sampler_url=a.sampler_url,
                                 sampler_model=a.sampler_model, n_prompts=a.n_prompts,
                                 batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, judge=a.judge,
                                 repeats=a.repeats)
    print(format_rows(rows))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
