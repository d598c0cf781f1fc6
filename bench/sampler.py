"""Sampling throughput: the KV-cached sampler vs the re-forward oracle (and transformers' generate).

Workload (issue 5): 16 prompts x K=4 rows (temperatures 0.7/0.9/1.1/1.3, top-k 50), random prompt
lengths in [20, 200] tokens, no eos (every row generates exactly ``max_new_tokens``), randomly
initialised weights of the ``tiny``, ``gpt2-124m``, ``llama-tiny`` or ``llama-124m`` shape (the Llama
ones: RoPE, grouped-query attention with 4 KV heads, SwiGLU; generate then runs transformers'
LlamaForCausalLM), block_size raised to fit prompt + answer.
Tokens/s = new tokens / wall time including the prefill.

How each row is timed (the ``method`` column):
- ``measured``: one full run, timed end to end.
- ``profile``: a whole run at every length would take hours on a shared 2-core CPU (the oracle at
  124M re-runs a forward over 64 x 200-700 tokens per step). A step's cost depends only on the rows'
  current length L, so it is timed at a few L and fitted with a polynomial in L (degree = points - 1,
  at most 2), then summed over the run's steps (plus, for the fast path, its measured prefill).
  Fast path: ``sample.decode_step`` + ``choose_tokens`` on caches filled with random keys/values up
  to L (contents do not change the cost); the oracle: single real oracle steps on prompts extended to
  L, optionally on a subset of ``oracle_rows`` rows scaled up linearly. Rows that are both measured
  and profiled show how good the estimate is (``profile_error``).
Fast path, oracle and generate run interleaved in one process; compare ratios, not absolute times.

    python -m fastdpo.bench.sampler --preset tiny --threads 1 --hf-max-new 64 256
    python -m fastdpo.bench.sampler --preset gpt2-124m --threads 1          # ~15 min on two busy cores
    python -m fastdpo.bench.sampler --preset llama-124m --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fastdpo.files import write_json
from fastdpo.generation.mining import DEFAULT_TEMPS as TEMPS
from fastdpo.generation.sampler import choose_tokens, decode_step, sample, sample_reforward
from fastdpo.models.families import PRESETS, build_model, config_from_preset
from fastdpo.models.kv_cache import KVCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Full runs up to measure_max_new; step-cost profiles at `points` lengths; the oracle profiled on
# `oracle_rows` rows (0 = all) and scaled up.
PRESET_DEFAULTS = {
    "tiny": dict(measure_max_new=64, points=3, oracle_rows=0),
    "gpt2-124m": dict(measure_max_new=64, points=2, oracle_rows=8),
}
PRESET_DEFAULTS["llama-tiny"] = PRESET_DEFAULTS["tiny"]
PRESET_DEFAULTS["llama-124m"] = PRESET_DEFAULTS["gpt2-124m"]


def make_workload(preset: str, n_prompts: int, k: int, prompt_lens: tuple[int, int], max_new: int,
                  seed: int):
    vocab = {"tiny": 2048, "llama-tiny": 2048}.get(preset)  # a tokenizer's (~2k); 124M shapes have theirs
    overrides = dict(block_size=max(1024, prompt_lens[1] + max_new))
    if vocab:
        overrides["vocab_size"] = vocab
    torch.manual_seed(seed)
    model = build_model(config_from_preset(preset, **overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (n_prompts,), generator=g).tolist()
    distinct = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lens]
    prompts = [p for p in distinct for _ in range(k)]
    temps = [TEMPS[j % len(TEMPS)] for _ in distinct for j in range(k)]
    return model, prompts, temps


def _timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def _offsets(max_new: int, points: int) -> list[int]:
    return sorted({round(i * (max_new - 1) / max(points - 1, 1)) for i in range(points)})


def _oracle_profile(model, prompts, temps, top_k, max_new: int, points: int, dtype,
                    rows: int | None) -> list[tuple[int, float]]:
    """(padded length, seconds) of single oracle steps at ``points`` offsets spread over the run."""
    g = torch.Generator().manual_seed(1)
    scale = 1.0
    if rows and rows < len(prompts):  # every k-th row keeps the spread of prompt lengths
        stride = len(prompts) // rows
        scale, prompts, temps = len(prompts) / len(prompts[::stride]), prompts[::stride], temps[::stride]
    out = []
    for s in _offsets(max_new, points):
        longer = [p + torch.randint(0, 100, (s,), generator=g).tolist() for p in prompts]
        seconds = _timed(sample_reforward, model, longer, temps, 1, top_k, None, 0, dtype=dtype)
        out.append((max(map(len, longer)), seconds * scale))
    return out


@torch.inference_mode(False)
@torch.no_grad()
def _fast_profile(model: torch.nn.Module, prompts, temps, top_k, max_new: int, points: int, dtype,
                  steps: int = 3) -> tuple[float, list[tuple[int, float]]]:
    """(prefill seconds, [(length, seconds per decode step)]) for the fast path."""
    stamps = []
    t0 = time.perf_counter()
    sample(model, prompts, temps, 1, top_k, None, 0, dtype=dtype,
           on_step=lambda *_: stamps.append(time.perf_counter()))
    prefill = stamps[0] - t0
    cfg, n = model.config, len(prompts)
    heads = getattr(cfg, "n_kv_head", cfg.n_head)   # the cache holds the key/value heads
    hd = getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head
    lens = torch.tensor([len(p) for p in prompts])
    cache_dtype = dtype if dtype != torch.float32 else next(model.parameters()).dtype
    temps_t, g = torch.tensor(temps), torch.Generator().manual_seed(2)
    out = []
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for s in _offsets(max_new, points):
            caches = []
            for _ in range(cfg.n_layer):
                c = KVCache(n, int(lens.max()) + max_new + steps)
                c.k = torch.randn(n, heads, c.max_len, hd, dtype=cache_dtype)
                c.v = torch.randn_like(c.k)
                caches.append(c)
            cur, tok = lens + s, torch.randint(0, cfg.vocab_size, (n,))
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                logits = decode_step(model, caches, tok, cur)
                tok = choose_tokens(logits, temps_t, torch.rand(n, generator=g), top_k)
                times.append(time.perf_counter() - t)
                cur = cur + 1
            out.append((int(cur.max()) - steps, sorted(times)[len(times) // 2]))
    return prefill, out


def _estimate(profile: list[tuple[int, float]], first_len: int, max_new: int) -> float:
    """Sum over the run's steps of the per-step cost fitted to the profile."""
    lengths = torch.tensor([p[0] for p in profile], dtype=torch.float64)
    secs = torch.tensor([p[1] for p in profile], dtype=torch.float64)
    degree = min(len(profile) - 1, 2)
    vander = torch.stack([lengths**d for d in range(degree + 1)], 1)
    coef = torch.linalg.lstsq(vander, secs[:, None]).solution[:, 0]
    steps = torch.arange(first_len, first_len + max_new, dtype=torch.float64)
    return float(sum(coef[d] * (steps**d).sum() for d in range(degree + 1)))


def _hf_generate(model: torch.nn.Module, prompts, max_new: int, top_k: int, dtype):
    """transformers' own class for the model's family (GPT2LMHeadModel, LlamaForCausalLM), same shape,
    ``generate`` with its KV cache and left padding. It has one temperature per call, so it samples
    every row at 1.0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastdpo.models.hf_config import config_to_hf

    hf_config = config_to_hf(model.config)
    model_type = hf_config.pop("model_type")
    hf_config.pop("architectures")
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_config)).eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def run():
        # no_grad, not inference_mode: under inference_mode autocast re-casts the weights every call
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k,
                              temperature=1.0, max_new_tokens=max_new, min_new_tokens=max_new,
                              pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == width + max_new
    return run


def run_sampler_bench(preset: str = "tiny", n_prompts: int = 16, k: int = 4,
                      prompt_lens: tuple[int, int] = (20, 200),
                      max_new_tokens: tuple[int, ...] = (64, 128, 256, 512),
                      dtypes: tuple[str, ...] = ("float32", "bfloat16"), top_k: int = 50,
                      measure_max_new: int | None = None, points: int | None = None, oracle: bool = True,
                      oracle_rows: int | None = None, hf: bool = True, hf_max_new: tuple[int, ...] = (64,),
                      threads: int | None = None, seed: int = 0, verbose: bool = True) -> list[dict]:
    """One dict per (implementation, dtype, max_new_tokens, method): tokens/s and seconds; oracle
    and generate rows carry the fast path's speed-up over them (``fast_speedup``, same method for
    the fast path when it has one, else its profile). Full runs for max_new_tokens <=
    ``measure_max_new`` (fast path and oracle) and in ``hf_max_new`` (generate); profiles for all.
    ``measure_max_new``, ``points`` and ``oracle_rows`` default per preset (PRESET_DEFAULTS) so that
    the 124M shape finishes in ~15 minutes on two busy cores."""
    defaults = PRESET_DEFAULTS.get(preset, PRESET_DEFAULTS["tiny"])
    measure_max_new = defaults["measure_max_new"] if measure_max_new is None else measure_max_new
    points = defaults["points"] if points is None else points
    oracle_rows = defaults["oracle_rows"] if oracle_rows is None else oracle_rows or None
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    if threads:  # on an oversubscribed machine, 2 OpenMP threads stall each other at every op
        torch.set_num_threads(threads)
    horizon = max(max_new_tokens)
    model, prompts, temps = make_workload(preset, n_prompts, k, prompt_lens, horizon, seed)
    if hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            hf = False
    first_len = max(map(len, prompts))
    n = len(prompts)
    results: list[dict] = []

    def add(impl, dtype_name, n_new, seconds, method, fast=None, **extra):
        row = dict(phase="sample", preset=preset, impl=impl, dtype=dtype_name, max_new_tokens=n_new,
                   rows=n, new_tokens=n * n_new, seconds=round(seconds, 4),
                   tokens_per_s=round(n * n_new / seconds, 2), method=method,
                   threads=torch.get_num_threads(), **extra)
        if fast is not None:
            row["fast_speedup"] = round(seconds / fast, 2)
        results.append(row)
        if verbose:
            print(f"  {impl:12s} {dtype_name:9s} new={n_new:4d} {row['tokens_per_s']:10.1f} tok/s "
                  f"({seconds:.2f} s, {method})", flush=True)

    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        sample(model, prompts, temps, 2, top_k, None, 0, dtype=dtype)  # warm-up at full shape
        prefill, fast_prof = _fast_profile(model, prompts, temps, top_k, horizon, points, dtype)
        oracle_prof = (_oracle_profile(model, prompts, temps, top_k, horizon, points, dtype, oracle_rows)
                       if oracle else None)
        for n_new in sorted(max_new_tokens):
            fast_est = prefill + _estimate(fast_prof, first_len, n_new)
            fast_real = None
            if n_new <= measure_max_new:
                fast_real = _timed(sample, model, prompts, temps, n_new, top_k, None, seed, dtype=dtype)
                add("fast", dtype_name, n_new, fast_real, "measured")
            add("fast", dtype_name, n_new, fast_est, "profile",
                profile_error=round(fast_est / fast_real - 1, 3) if fast_real else None)
            if oracle:
                est = _estimate(oracle_prof, first_len, n_new)
                add("oracle", dtype_name, n_new, est, "profile", fast=fast_est,
                    profile=[[L, round(t, 4)] for L, t in oracle_prof])
                if n_new <= measure_max_new and not oracle_rows:
                    real = _timed(sample_reforward, model, prompts, temps, n_new, top_k, None, seed,
                                  dtype=dtype)
                    add("oracle", dtype_name, n_new, real, "measured", fast=fast_real,
                        profile_error=round(est / real - 1, 3))
            if hf and n_new in hf_max_new:
                secs = _timed(_hf_generate(model, prompts, n_new, top_k, dtype))
                add("hf_generate", dtype_name, n_new, secs, "measured", fast=fast_real or fast_est)
    return results


def scaling_exponents(results: list[dict]) -> dict[str, float]:
    """Slope of log(seconds) vs log(max_new_tokens) per (impl, dtype, method): 1 = linear, 2 = quadratic."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        groups.setdefault(f"{r['impl']}/{r['dtype']}/{r['method']}", []).append(
            (math.log(r["max_new_tokens"]), math.log(r["seconds"])))
    out = {}
    for key, pts in groups.items():
        if len(pts) >= 2:
            mx = sum(x for x, _ in pts) / len(pts)
            my = sum(y for _, y in pts) / len(pts)
            out[key] = round(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts), 3)
    return out


def format_table(results: list[dict]) -> str:
    head = f"{'preset':10s} {'impl':12s} {'dtype':9s} {'new':>5s} {'tok/s':>10s} {'seconds':>9s} " \
           f"{'fast x':>7s}  method"
    lines = [head, "-" * len(head)]
    for r in results:
        speed = f"{r['fast_speedup']:.1f}" if "fast_speedup" in r else ""
        lines.append(f"{r['preset']:10s} {r['impl']:12s} {r['dtype']:9s} {r['max_new_tokens']:5d} "
                     f"{r['tokens_per_s']:10.1f} {r['seconds']:9.2f} {speed:>7s}  {r['method']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    ap.add_argument("--k", type=int, default=4, help="rows (samples) per prompt")
    ap.add_argument("--max-new", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    ap.add_argument("--measure-max-new", type=int, default=None,
                    help="also time full runs (fast path, oracle) up to this max_new_tokens")
    ap.add_argument("--points", type=int, default=None, help="lengths at which step costs are profiled")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--oracle-rows", type=int, default=None,
                    help="profile the oracle on this many rows (0 = all) and scale up")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--hf-max-new", type=int, nargs="*", default=[64], help="generate only at these")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: runs/bench/sampler-<preset>.json)")
    a = ap.parse_args(argv)
    results = run_sampler_bench(
        preset=a.preset, n_prompts=a.prompts, k=a.k, max_new_tokens=tuple(a.max_new), dtypes=tuple(a.dtypes),
        measure_max_new=a.measure_max_new, points=a.points, oracle=not a.no_oracle,
        oracle_rows=a.oracle_rows, hf=not a.no_hf, hf_max_new=tuple(a.hf_max_new), threads=a.threads,
        seed=a.seed)
    exps = scaling_exponents(results)
    print(format_table(results))
    print("scaling exponents (seconds ~ max_new_tokens^x):", json.dumps(exps))
    out = a.out or Path("runs/bench") / f"sampler-{a.preset}.json"
    write_json(out, {"results": results, "scaling_exponents": exps}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
