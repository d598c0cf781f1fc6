"""K samples per prompt, end to end: the sampler with shared-prefix (cascade) attention on and off,
transformers' ``generate``, and optionally the sampler as it was at another git revision.

Workload: ``prompts`` distinct prompts of ``prompt_len`` random tokens, ``k`` rows each
(temperatures cycling 0.7/0.9/1.1/1.3, top-k 50), no eos: every row generates exactly ``max_new``
tokens. Randomly initialised weights of a preset shape (block_size raised to fit). Every side gets
the same prompts, the same number of new tokens, the same precision (autocast to ``dtype``; the
weights stay float32) and one warm-up call of a few tokens; each is then timed end to end (prefill
plus every step), the sides interleaved, ``repeats`` times, best time kept. ``generate`` runs
transformers' own class for the family with its KV cache (one temperature per call: 1.0).

    python -m fastdpo.bench.shared_prefix --preset gpt2-124m --threads 2 --dtype bfloat16
    python -m fastdpo.bench.shared_prefix --preset gpt2-124m --threads 2 --dtype bfloat16 \\
        --baseline-rev main      # also the sampler at git revision main (read with git show)

The first command is the shared-prefix sampler target's comparison: 16 prompts x K=8 x 200
tokens, 256 new tokens (the defaults). Output: a table, and JSON (default runs/bench/).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
import types
from pathlib import Path

# libgomp's spinning barriers stall 2-thread torch on a busy machine (see bench/kernels.py); the
# policy must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fastdpo.bench.run import provenance  # noqa: E402
from fastdpo.files import write_json  # noqa: E402
from fastdpo.generation.mining import DEFAULT_TEMPS as TEMPS  # noqa: E402
from fastdpo.generation.sampler import sample  # noqa: E402
from fastdpo.models.families import PRESETS, build_model, config_from_preset  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REPO = Path(__file__).resolve().parent.parent


def make_workload(preset: str, n_prompts: int, k: int, prompt_len: int, max_new: int, seed: int):
    overrides = dict(block_size=max(1024, prompt_len + max_new))
    if preset in ("tiny", "llama-tiny"):
        overrides["vocab_size"] = 2048   # a tokenizer's (~2k); the 124M shapes keep theirs
    torch.manual_seed(seed)
    model = build_model(config_from_preset(preset, **overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    distinct = [torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist()
                for _ in range(n_prompts)]
    prompts = [p for p in distinct for _ in range(k)]
    temps = [TEMPS[j % len(TEMPS)] for _ in distinct for j in range(k)]
    return model, prompts, temps


def sampler_at(rev: str) -> types.ModuleType:
    """``fastdpo.generation.sampler`` as it is at git revision ``rev`` of this repository, imported
    under another name (it runs on today's models and KV cache, which keep its interface)."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:dpo/generation/sampler.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"--baseline-rev {rev}: cannot read dpo/generation/sampler.py there ({e})") from None
    module = types.ModuleType(f"fastdpo.generation._sampler_at_{rev}")
    exec(compile(source, f"{rev}:dpo/generation/sampler.py", "exec"), module.__dict__)
    return module


def hf_generate(model: torch.nn.Module, prompts, max_new: int, top_k: int, dtype):
    """transformers' class for the model's family with the same shape and weights, ``generate``
    with its KV cache and left padding. Returns a callable running it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastdpo.models.hf_config import config_to_hf
    from fastdpo.models.hf_weights import hf_state_dict

    hf_config = config_to_hf(model.config)
    model_type = hf_config.pop("model_type")
    hf_config.pop("architectures")
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_config)).eval()
    loaded = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}, loaded  # tied head
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def run(n_new: int = max_new):
        # no_grad, not inference_mode: under inference_mode autocast re-casts the weights every call
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k,
                              temperature=1.0, max_new_tokens=n_new, min_new_tokens=n_new,
                              pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == width + n_new
        return None   # its own random draws: not comparable token for token
    return run


def run_shared_prefix_bench(preset: str = "gpt2-124m", n_prompts: int = 16, k: int = 8, prompt_len: int = 200,
                            max_new: int = 256, dtype: str = "bfloat16", top_k: int = 50, hf: bool = True,
                            baseline_rev: str | None = None, repeats: int = 1, threads: int | None = None,
                            seed: int = 0, verbose: bool = True) -> list[dict]:
    """One dict per side: seconds (best of ``repeats``), new tokens/s and ``cascade_speedup`` (the
    cascade side's speed-up over it)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    model, prompts, temps = make_workload(preset, n_prompts, k, prompt_len, max_new, seed)
    dt = DTYPES[dtype]
    sides = {
        "cascade": lambda n: sample(model, prompts, temps, n, top_k, None, seed, dtype=dt, cascade=True),
        "flat": lambda n: sample(model, prompts, temps, n, top_k, None, seed, dtype=dt, cascade=False),
    }
    if baseline_rev:
        old = sampler_at(baseline_rev)
        sides[f"sampler@{baseline_rev}"] = lambda n: old.sample(model, prompts, temps, n, top_k, None, seed,
                                                                dtype=dt)
    if hf:
        try:
            gen = hf_generate(model, prompts, max_new, top_k, dt)
            sides["hf_generate"] = gen
        except ImportError:
            pass
    for fn in sides.values():
        fn(4)   # warm-up: allocator, autocast weight casts, first-call overheads
    best = {name: float("inf") for name in sides}
    tokens = {}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            tokens[name] = fn(max_new)
            best[name] = min(best[name], time.perf_counter() - t0)
            if verbose:
                print(f"  {name:18s} {best[name]:9.2f} s", flush=True)
    n_rows, new_tokens = len(prompts), len(prompts) * max_new
    # The sampler sides draw from the same per-row random streams: equal logits give equal tokens
    # (in float32 they are equal; bf16 rounding may let a sample drift).
    return [dict(phase="sample", impl=name, preset=preset, dtype=dtype, prompts=n_prompts, k=k,
                 prompt_len=prompt_len, rows=n_rows, max_new_tokens=max_new, new_tokens=new_tokens,
                 seconds=round(secs, 3), tokens_per_s=round(new_tokens / secs, 2),
                 cascade_speedup=round(secs / best["cascade"], 3), threads=torch.get_num_threads(),
                 same_tokens_as_cascade=None if tokens[name] is None else tokens[name] == tokens["cascade"],
                 method="measured end to end")
            for name, secs in best.items()]


def format_table(rows: list[dict]) -> str:
    head = (f"{'impl':18s} {'dtype':9s} {'rows':>5s} {'new':>5s} {'seconds':>9s} {'tok/s':>9s} "
            f"{'cascade x':>10s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['impl']:18s} {r['dtype']:9s} {r['rows']:5d} {r['max_new_tokens']:5d} "
                     f"{r['seconds']:9.2f} {r['tokens_per_s']:9.1f} {r['cascade_speedup']:10.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS))
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    ap.add_argument("--k", type=int, default=8, help="rows (samples) per prompt")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--baseline-rev", default=None,
                    help="also time the sampler at this git revision (e.g. main), same process")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: runs/bench/shared-prefix-<preset>-<dtype>.json)")
    a = ap.parse_args(argv)
    load_before = os.getloadavg()
    rows = run_shared_prefix_bench(a.preset, a.prompts, a.k, a.prompt_len, a.max_new, a.dtype, hf=not a.no_hf,
                                   baseline_rev=a.baseline_rev, repeats=a.repeats, threads=a.threads,
                                   seed=a.seed)
    print(format_table(rows))
    out = a.out or Path("runs/bench") / f"shared-prefix-{a.preset}-{a.dtype}.json"
    meta = provenance("fastdpo.bench.shared_prefix", argv, load_before)
    write_json(out, {"results": rows, "meta": meta}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
