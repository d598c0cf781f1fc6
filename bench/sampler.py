"""Sampling throughput, measured end to end: the KV-cached sampler vs the re-forward oracle and vs
transformers' ``generate``, each pair on exactly the same prompts and the same number of new tokens.

A workload is (distinct prompts, K samples per prompt, prompt length range, new tokens). Every row
generates exactly ``max_new_tokens`` per sample (no eos), with the mining temperatures cycling over
the K samples and top-k 50, on randomly initialised weights of the preset's shape (``tiny``,
``gpt2-124m``, ``llama-tiny``, ``llama-124m``). Tokens/s = new tokens / wall time of the whole call,
prefill included. Each implementation first runs untimed on the same prompts for 4 new tokens
(warm caches and allocator at the prefill shape), then once timed; nothing is extrapolated.

Two comparisons per dtype:
- ``oracle``: fastdpo vs ``sample_reforward`` (re-runs the full forward over every row for every new
  token: quadratic). At the 124M shape a full oracle run of the headline workload takes hours on a
  small CPU, so the default oracle workload is small and says so; ``--full`` runs the oracle on the
  headline workload too.
- ``generate``: fastdpo vs ``transformers`` ``generate`` (KV cache, left padding, the model's own HF
  class with the same weights' shape) on the headline workload, same new-token count.

    python -m fastdpo.bench.sampler --preset gpt2-124m [--full] [--device auto] [--out FILE]
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import torch

from fastdpo.bench.kernels import measure
from fastdpo.files import write_json
from fastdpo.generation.mining import DEFAULT_TEMPS as TEMPS
from fastdpo.generation.sampler import sample, sample_reforward
from fastdpo.models.families import PRESETS, build_model, config_from_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# preset -> comparison -> (distinct prompts, K, (min, max) prompt tokens, new tokens). "headline" is
# issue's sampler target (K=8 samples of 16 prompts of ~200 tokens, 256 new tokens); the default
# runs are smaller so that `fastdpo bench` stays within minutes on two CPU cores.
WORKLOADS = {
    "tiny": {"oracle": (8, 4, (20, 200), 64), "generate": (16, 4, (20, 200), 64),
             "full": (16, 8, (200, 200), 256)},
    "gpt2-124m": {"oracle": (2, 4, (20, 100), 32), "generate": (8, 4, (20, 200), 64),
                  "full": (16, 8, (200, 200), 256)},
    "quick": {"oracle": (2, 2, (8, 24), 8), "generate": (2, 2, (8, 24), 8), "full": (2, 2, (8, 24), 8)},
}
WORKLOADS["llama-tiny"] = WORKLOADS["tiny"]
WORKLOADS["llama-124m"] = WORKLOADS["gpt2-mid"] = WORKLOADS["gpt2-124m"]


def make_workload(preset: str, n_prompts: int, k: int, prompt_lens: tuple[int, int], max_new: int,
                  seed: int, device: str | torch.device = "cpu"):
    vocab = {"tiny": 2048, "llama-tiny": 2048}.get(preset)  # a tokenizer's (~2k); 124M shapes have theirs
    overrides = dict(block_size=max(1024, prompt_lens[1] + max_new))
    if vocab:
        overrides["vocab_size"] = vocab
    torch.manual_seed(seed)
    model = build_model(config_from_preset(preset, **overrides)).eval().to(device)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (n_prompts,), generator=g).tolist()
    distinct = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lens]
    prompts = [p for p in distinct for _ in range(k)]
    temps = [TEMPS[j % len(TEMPS)] for _ in distinct for j in range(k)]
    return model, prompts, temps


def _timed(fn, device: torch.device, warmup_new: int) -> tuple[float, float | None]:
    """(seconds, peak extra MB) of the full run, after an untimed warm-up on the same prompts
    (prefill shapes, first decode steps). Memory as in ``bench.kernels.measure``: CUDA
    ``max_memory_allocated`` above the start, CPU peak RSS above the start."""
    fn(warmup_new)
    return measure(lambda: fn(None), device)


def hf_generate(model: torch.nn.Module, prompts, max_new: int, top_k: int, dtype):
    """transformers' own class for the model's family (GPT2LMHeadModel, LlamaForCausalLM), same
    shape and weights, ``generate`` with its KV cache and left padding. It takes one temperature
    per call, so it samples every row at 1.0 (the temperature does not change the work)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastdpo.models.hf_config import config_to_hf
    from fastdpo.models.hf_weights import hf_state_dict

    device = next(model.parameters()).device
    hf_config = config_to_hf(model.config)
    model_type = hf_config.pop("model_type")
    hf_config.pop("architectures")
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_config))
    hf.load_state_dict(hf_state_dict(model), strict=False)   # the same weights (lm_head tied, buffers)
    hf.tie_weights()
    hf = hf.eval().to(device)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def run(n_new=None):
        n_new = n_new or max_new
        # no_grad, not inference_mode: under inference_mode autocast re-casts the weights every call
        amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        with torch.no_grad(), amp:
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k,
                              temperature=1.0, max_new_tokens=n_new, min_new_tokens=n_new,
                              pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == width + n_new
    return run


def _compare(preset, name, workload, dtype_name, baseline, device, seed, top_k, hf_ok, verbose):
    """[fast row, baseline row] on one workload, both timed end to end."""
    n_prompts, k, prompt_lens, max_new = workload
    model, prompts, temps = make_workload(preset, n_prompts, k, prompt_lens, max_new, seed, device)
    dtype = DTYPES[dtype_name]
    runs = {"fast": lambda m: sample(model, prompts, temps, m or max_new, top_k, None, seed, dtype=dtype)}
    if baseline == "oracle":
        runs["oracle"] = lambda m: sample_reforward(model, prompts, temps, m or max_new, top_k, None, seed,
                                                    dtype=dtype)
    elif hf_ok:
        runs["hf_generate"] = hf_generate(model, prompts, max_new, top_k, dtype)
    timed = {impl: _timed(fn, device, min(4, max_new)) for impl, fn in runs.items()}
    seconds = {impl: t for impl, (t, _) in timed.items()}
    n = len(prompts)
    rows = []
    for impl, s in seconds.items():
        row = dict(phase="sample", preset=preset, comparison=name, impl=impl, dtype=dtype_name,
                   device=device.type, prompts=n_prompts, k=k, rows=n, prompt_tokens=list(prompt_lens),
                   max_new_tokens=max_new, new_tokens=n * max_new, seconds=round(s, 4),
                   tokens_per_s=round(n * max_new / s, 2), method="measured", threads=torch.get_num_threads(),
                   peak_MB=timed[impl][1])
        if impl != "fast":
            row["fast_speedup"] = round(s / seconds["fast"], 3)
        rows.append(row)
        if verbose:
            print(f"  {name:<8} {impl:12s} {dtype_name:9s} {n:3d} rows x {max_new:4d} new "
                  f"{row['tokens_per_s']:10.1f} tok/s ({s:.2f} s)", flush=True)
    return rows


def run_sampler_bench(preset: str = "tiny", dtypes: tuple[str, ...] = ("float32", "bfloat16"), *,
                      full: bool = False, quick: bool = False, oracle: bool = True, hf: bool = True,
                      device: str | torch.device = "cpu", top_k: int = 50, seed: int = 0,
                      workloads: dict | None = None, verbose: bool = True) -> list[dict]:
    """Rows of measured tokens/s: per dtype, fast vs oracle and fast vs ``generate`` (when
    transformers is installed), each pair on the same workload. ``full`` runs both comparisons on
    the headline workload (the oracle then takes hours at 124M); ``quick`` uses seconds-long ones."""
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    device = torch.device(device)
    w = workloads or WORKLOADS["quick" if quick else preset]
    if hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            hf = False
    rows: list[dict] = []
    for dtype_name in dtypes:
        if oracle:
            rows += _compare(preset, "oracle", w["full" if full else "oracle"], dtype_name, "oracle",
                             device, seed, top_k, hf, verbose)
        if hf:
            rows += _compare(preset, "generate", w["full" if full else "generate"], dtype_name,
                             "hf_generate", device, seed, top_k, hf, verbose)
    return rows


def format_table(results: list[dict]) -> str:
    head = (f"{'preset':10s} {'vs':8s} {'impl':12s} {'dtype':9s} {'rows':>5s} {'new':>5s} {'tok/s':>10s} "
            f"{'seconds':>9s} {'fast x':>7s}")
    lines = [head, "-" * len(head)]
    for r in results:
        speed = f"{r['fast_speedup']:.2f}" if "fast_speedup" in r else ""
        lines.append(f"{r['preset']:10s} {r['comparison']:8s} {r['impl']:12s} {r['dtype']:9s} {r['rows']:5d} "
                     f"{r['max_new_tokens']:5d} {r['tokens_per_s']:10.1f} {r['seconds']:9.2f} {speed:>7s}")
    return "\n".join(lines)


def main(argv=None) -> None:
    from fastdpo.bench.peak import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    ap.add_argument("--full", action="store_true",
                    help="both comparisons on the headline workload (16 prompts x K=8, 200-token prompts, "
                         "256 new tokens): the oracle takes hours at 124M on a CPU")
    ap.add_argument("--quick", action="store_true", help="seconds-long workloads (a smoke run)")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: runs/bench/sampler-<preset>.json)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    results = run_sampler_bench(a.preset, tuple(a.dtypes), full=a.full, quick=a.quick, oracle=not a.no_oracle,
                                hf=not a.no_hf, device=resolve_device(a.device), seed=a.seed)
    print(format_table(results))
    out = a.out or Path("runs/bench") / f"sampler-{a.preset}.json"
    write_json(out, {"results": results}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
