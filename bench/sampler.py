"""Sampling throughput: the KV-cached sampler vs the re-forward oracle (and transformers' generate).

Workload (issue 5): 16 prompts x K=4 rows (temperatures 0.7/0.9/1.1/1.3, top-k 50), random prompt
lengths in [20, 200] tokens, no eos (every row generates exactly ``max_new_tokens``), randomly
initialised weights of the ``tiny`` or ``gpt2-124m`` shape, block_size raised to fit prompt + answer.
Tokens/s = new tokens / wall time including the prefill.

How each row is timed (the ``method`` column):
- ``measured``: one full run, timed end to end.
- ``profile``: the oracle re-runs one full forward per step, so a whole run at 124M scale would take
  hours. Its cost per step is a function of the padded length L only; it is measured at a few L
  (one real oracle step each), fitted with a polynomial in L (degree = points - 1) and summed over
  the run's steps. ``validate=True`` also runs the oracle for real at the smallest max_new_tokens so
  the estimate can be checked against a measurement.
Fast path, oracle and generate run interleaved in one process; compare ratios, not absolute times.

    python -m bench.sampler --preset tiny
    python -m bench.sampler --preset gpt2-124m --max-new 64 128 256 512 --oracle-max-new 256
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from dpo.model import GPT, config_from_preset
from dpo.sampler import TEMPS, sample, sample_reforward

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_workload(preset: str, n_prompts: int, k: int, prompt_lens: tuple[int, int], max_new: int,
                  seed: int):
    vocab = {"tiny": 2048}.get(preset)  # tiny's vocabulary is the tokenizer's (~2k); 124M has its own
    overrides = dict(block_size=max(1024, prompt_lens[1] + max_new))
    if vocab:
        overrides["vocab_size"] = vocab
    torch.manual_seed(seed)
    model = GPT(config_from_preset(preset, **overrides)).eval()
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


def _oracle_profile(model, prompts, temps, top_k, max_new: int, points: int,
                    dtype) -> list[tuple[int, float]]:
    """(padded length, seconds) of single oracle steps at ``points`` offsets spread over the run."""
    offsets = sorted({round(i * (max_new - 1) / max(points - 1, 1)) for i in range(points)})
    g = torch.Generator().manual_seed(1)
    out = []
    for s in offsets:
        # the same s extra tokens for every row of a prompt; values do not matter for timing
        ext = {}
        longer = [p + ext.setdefault(tuple(p), torch.randint(0, 100, (s,), generator=g).tolist())
                  for p in prompts]
        seconds = _timed(sample_reforward, model, longer, temps, 1, top_k, None, 0, dtype=dtype)
        out.append((max(map(len, longer)), seconds))
    return out


def _oracle_estimate(profile: list[tuple[int, float]], first_len: int, max_new: int) -> float:
    lengths = torch.tensor([p[0] for p in profile], dtype=torch.float64)
    secs = torch.tensor([p[1] for p in profile], dtype=torch.float64)
    degree = min(len(profile) - 1, 2)
    vander = torch.stack([lengths**d for d in range(degree + 1)], 1)
    coef = torch.linalg.lstsq(vander, secs[:, None]).solution[:, 0]
    steps = torch.arange(first_len, first_len + max_new, dtype=torch.float64)
    return float(sum(coef[d] * (steps**d).sum() for d in range(degree + 1)))


def _hf_generate(model: GPT, prompts, max_new: int, top_k: int, dtype):
    """transformers' GPT2LMHeadModel.generate on the same shapes (KV cache, left padding). It has one
    temperature per call, so it samples every row at 1.0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def run():
        ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.inference_mode()
        with torch.inference_mode(), ctx:
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k,
                              temperature=1.0, max_new_tokens=max_new, min_new_tokens=max_new,
                              pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == width + max_new
    return run


def run_sampler_bench(preset: str = "tiny", n_prompts: int = 16, k: int = 4,
                      prompt_lens: tuple[int, int] = (20, 200),
                      max_new_tokens: tuple[int, ...] = (64, 128, 256, 512),
                      dtypes: tuple[str, ...] = ("float32", "bfloat16"), top_k: int = 50,
                      oracle: bool = True, oracle_max_new: int | None = None, oracle_points: int = 3,
                      validate: bool = True, hf: bool = True, hf_max_new: tuple[int, ...] | None = None,
                      seed: int = 0, verbose: bool = True) -> list[dict]:
    """One dict per (implementation, dtype, max_new_tokens): tokens/s, seconds, how it was timed,
    and for the oracle and generate rows the fast path's speed-up over them."""
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    model, prompts, temps = make_workload(preset, n_prompts, k, prompt_lens, max(max_new_tokens), seed)
    if hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            hf = False
    first_len = max(map(len, prompts))
    results: list[dict] = []

    def add(impl, dtype_name, n_new, seconds, method, **extra):
        row = dict(phase="sample", preset=preset, impl=impl, dtype=dtype_name, max_new_tokens=n_new,
                   rows=len(prompts), new_tokens=len(prompts) * n_new, seconds=round(seconds, 4),
                   tokens_per_s=round(len(prompts) * n_new / seconds, 2), method=method, **extra)
        results.append(row)
        if verbose:
            print(f"  {impl:12s} {dtype_name:9s} new={n_new:4d} {row['tokens_per_s']:10.1f} tok/s "
                  f"({seconds:.2f} s, {method})", flush=True)
        return row

    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        sample(model, prompts, temps, 2, top_k, None, 0, dtype=dtype)  # warm-up at full shape
        profile = None
        for n_new in sorted(max_new_tokens):
            secs = _timed(sample, model, prompts, temps, n_new, top_k, None, seed, dtype=dtype)
            fast = add("fast", dtype_name, n_new, secs, "measured")
            if oracle and (oracle_max_new is None or n_new <= oracle_max_new):
                if profile is None:
                    horizon = min(max(max_new_tokens), oracle_max_new or max(max_new_tokens))
                    profile = _oracle_profile(model, prompts, temps, top_k, horizon, oracle_points, dtype)
                est = _oracle_estimate(profile, first_len, n_new)
                add("oracle", dtype_name, n_new, est, "profile",
                    fast_speedup=round(fast["tokens_per_s"] * est / (len(prompts) * n_new), 2),
                    profile=[[L, round(s, 4)] for L, s in profile])
                if validate and n_new == min(max_new_tokens):
                    real = _timed(sample_reforward, model, prompts, temps, n_new, top_k, None, seed,
                                  dtype=dtype)
                    add("oracle", dtype_name, n_new, real, "measured",
                        fast_speedup=round(fast["tokens_per_s"] * real / (len(prompts) * n_new), 2),
                        profile_error=round(est / real - 1, 3))
            if hf and (hf_max_new is None or n_new in hf_max_new):
                secs = _timed(_hf_generate(model, prompts, n_new, top_k, dtype))
                add("hf_generate", dtype_name, n_new, secs, "measured",
                    fast_speedup=round(fast["tokens_per_s"] * secs / (len(prompts) * n_new), 2))
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
    ap.add_argument("--preset", default="tiny", choices=["tiny", "gpt2-124m"])
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    ap.add_argument("--k", type=int, default=4, help="rows (samples) per prompt")
    ap.add_argument("--max-new", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--oracle-max-new", type=int, default=None, help="skip the oracle above this")
    ap.add_argument("--oracle-points", type=int, default=3)
    ap.add_argument("--no-validate", action="store_true", help="skip the one real oracle run")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--hf-max-new", type=int, nargs="+", default=None, help="generate only at these")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: runs/bench/sampler-<preset>.json)")
    a = ap.parse_args(argv)
    results = run_sampler_bench(
        preset=a.preset, n_prompts=a.prompts, k=a.k, max_new_tokens=tuple(a.max_new), dtypes=tuple(a.dtypes),
        oracle=not a.no_oracle, oracle_max_new=a.oracle_max_new, oracle_points=a.oracle_points,
        validate=not a.no_validate, hf=not a.no_hf,
        hf_max_new=tuple(a.hf_max_new) if a.hf_max_new else None, seed=a.seed)
    exps = scaling_exponents(results)
    print(format_table(results))
    print("scaling exponents (seconds ~ max_new_tokens^x):", json.dumps(exps))
    out = a.out or Path("runs/bench") / f"sampler-{a.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"results": results, "scaling_exponents": exps}, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
