"""DPO training-step throughput and memory: the fast path vs the naive reference path.

    python -m fastdpo.bench.train [--preset tiny|gpt2-124m|all] [--device auto|cpu|cuda] [--rounds N]
                                  [--steps K] [--json out.json]

- fast:  one packed row per pair (the prompt computed once for both answers), policy log-probs
         through ``kernels.linear_sequence_logprobs`` (no (2B, T, V) logits), and reference
         log-probs precomputed once and cached (no reference model in memory).
- naive: the seed's ``train_dpo.py`` recipe: chosen and rejected as separate rows, full logits +
         the float32 oracle ``kernels.reference.sequence_logprobs``, and a frozen reference model
         run forward every step.

tokens/s counts each pair's logical tokens (prompt + chosen, prompt + rejected) for both variants,
so the ratio is pairs per second.

Both train the same model from the same initial weights on the same synthetic pairs in the same
order, in the same precision, timed *interleaved* in one process (rounds alternate fast / naive:
the machine is shared, ratios measured side by side hold up, absolute times do not).

Each variant first runs its timed batches once untimed (warm caches, as in a long run). Memory:
``step_peak_MB`` is the peak extra resident memory of the timed steps (VmHWM reset before each,
see ``bench.kernels.measure``); ``resident_MB`` is what the variant keeps besides the policy
and its optimizer: the frozen reference model (naive) or the cached log-probs (fast). The ratio is
on their sum. On CUDA memory is ``torch.cuda.max_memory_allocated`` above the allocation before.

End to end (``e2e_*``): the trainer's setup (for ``fast`` this includes the reference pass that
fills its cache of reference log-probs, computed in a fresh directory: never a cache hit) plus the
first, cold pass over all the timed steps; tokens/s over the same tokens for every variant.

Memory-saving variants of the fast path (``--variants fast,checkpointing,lora``), each compared
with ``fast`` on the whole training footprint ``train_peak_MB`` = parameters + optimizer state +
the resident reference + the step's peak (activations, gradients, temporaries):
- checkpointing: ``gradient_checkpointing`` (each block's activations recomputed in backward);
- lora / lora+checkpointing: LoRA rank 16, alpha 32 on every projection (the LLaMA-Factory seed's
  setting): the base is frozen, so no base gradients and no optimizer state for it; the reference
  is the base with the adapters off.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

# libgomp's spinning barriers stall 2-thread torch on a busy machine (see bench/kernels.py); the
# policy must be set before torch loads, which importing bench.kernels first also does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fastdpo.bench.kernels import measure  # noqa: E402
from fastdpo.bench.peak import resolve_device  # noqa: E402
from fastdpo.models.gpt import GPT, config_from_preset
from fastdpo.training.batches import TokenizedPair
from fastdpo.training.config import DPOConfig, TrainingConfig
from fastdpo.training.dpo import prepare_dpo

# preset -> (vocab, micro-batch pairs, prompt length range, answer length range)
SHAPES = {
    "tiny": dict(vocab_size=2048, micro_batch_size=8, prompt=(16, 48), answer=(16, 80)),
    "gpt2-124m": dict(vocab_size=50304, micro_batch_size=2, prompt=(32, 96), answer=(64, 160)),
    "gpt2-mid": dict(vocab_size=32768, micro_batch_size=2, prompt=(32, 96), answer=(64, 160)),
}


def synthetic_pairs(n: int, vocab_size: int, prompt: tuple[int, int], answer: tuple[int, int],
                    seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(4, vocab_size, (k,), generator=g).tolist()

    return [TokenizedPair(seq(*prompt), seq(*answer), seq(*answer)) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


# variant -> (kernel setting, reference mode, TrainingConfig overrides)
VARIANTS = {
    "fast": ("auto", "cached", {}),
    "naive": ("oracle", "model", {}),
    "checkpointing": ("auto", "cached", {"gradient_checkpointing": True}),
    "lora": ("auto", "cached", {"finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32}),
    "lora+checkpointing": ("auto", "cached", {"finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32,
                                              "gradient_checkpointing": True}),
}


def run_train_bench(preset: str = "tiny", rounds: int = 3, steps: int = 2, precision: str = "auto",
                    micro_batch_size: int | None = None, prompt: tuple[int, int] | None = None,
                    answer: tuple[int, int] | None = None, seed: int = 0, verbose: bool = True,
                    variants: tuple[str, ...] = ("fast", "naive"), device: str = "cpu") -> list[dict]:
    """One row per variant with tokens/s and memory; the fast row carries the ratios vs naive, the
    memory-saving variants theirs vs fast. ``prompt``/``answer`` override the preset's (min, max)
    token lengths of the synthetic pairs."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    shape = dict(SHAPES[preset])
    for key, value in (("micro_batch_size", micro_batch_size), ("prompt", prompt), ("answer", answer)):
        if value:
            shape[key] = value
    mb = shape["micro_batch_size"]
    n_pairs = mb * steps * (rounds + 1)
    pairs = synthetic_pairs(n_pairs, shape["vocab_size"], shape["prompt"], shape["answer"], seed)
    torch.manual_seed(seed)
    base = GPT(config_from_preset(preset, vocab_size=shape["vocab_size"]))
    # length_bucket=1: batches drawn independently of lengths, so both variants train on exactly
    # the same pairs at every step (bucketing sorts by each layout's own row length).
    dev = resolve_device(device)
    common = dict(batch_size=mb, micro_batch_size=mb, learning_rate=1e-6,
                  max_steps=10**6, log_every=0, mixed_precision=precision, wandb="disabled", progress=False,
                  device=dev.type, seed=seed, length_bucket=1)
    trainers, info = {}, {}
    # Process warm-up, untimed: imports, lazy initialisation and first-call costs would otherwise
    # all be charged to whichever variant's end-to-end time comes first.
    for name in variants:
        kernel, reference, extra = VARIANTS[name]
        tc = TrainingConfig(run_name="warm-up", kernel=kernel, output_dir=tempfile.mkdtemp(), **common,
                            **extra)
        warm = prepare_dpo(copy.deepcopy(base), pairs[:mb], [], tc,
                           DPOConfig(reference=reference, shared_prompt=name != "naive"), pad_id=0,
                           tokenizer_hash="synthetic", device=dev, say=lambda *a, **k: None)
        warm.train(steps=1)
        del warm
    for name in variants:
        kernel, reference, extra = VARIANTS[name]
        tc = TrainingConfig(run_name=f"bench-{name}", kernel=kernel, output_dir=tempfile.mkdtemp(), **common,
                            **extra)
        # naive = the seed's recipe: chosen and rejected as separate rows (prompt run twice)
        dc = DPOConfig(reference=reference, shared_prompt=name != "naive")
        policy = copy.deepcopy(base)
        _sync(dev)
        t0 = time.perf_counter()
        trainer = prepare_dpo(policy, pairs, [], tc, dc, pad_id=0, tokenizer_hash="synthetic", device=dev)
        _sync(dev)
        setup = time.perf_counter() - t0
        task = trainer.task
        own = task.ref_model is None or task.ref_model is trainer.model   # LoRA: the policy's base view
        resident = (_mb(task.ref_model.parameters()) if not own
                    else _mb([task.ref_train]) if task.ref_train is not None else 0.0)
        params = list(trainer.model.parameters())
        info[name] = {"setup_s": setup, "resident_MB": resident, "precision": trainer.precision,
                      "params_MB": _mb(params),
                      "trainable_params": sum(p.numel() for p in params if p.requires_grad)}
        # Warm-up: the optimizer state, then one untimed pass over exactly the batches measured
        # below (the step counter is rewound), so the timed pass sees the steady state of a long
        # run: every batch shape has been seen once and oneDNN's primitive cache and the allocator
        # no longer grow. Measured cold, the first pass in a fresh process reported ~2x the step
        # memory of every later pass at the tiny shape.
        first_pass, _ = measure(lambda trainer=trainer: trainer.train(steps=1 + rounds * steps), dev)
        info[name]["e2e_s"] = setup + first_pass
        trainer.state.step = 1
        info[name]["optimizer_MB"] = _mb(t for st in trainer.optimizer.state.values() for t in st.values()
                                         if isinstance(t, torch.Tensor))
        trainers[name] = trainer
    tokens_per_step = statistics.mean(sum(p.n_tokens for p in pairs[i * mb:(i + 1) * mb])
                                      for i in range(n_pairs // mb))
    times = {k: [] for k in trainers}
    peaks = {k: [] for k in trainers}
    tokens = {k: [] for k in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            first = trainer.state.step
            dt, peak = measure(lambda trainer=trainer: trainer.train(steps=steps), dev)
            n_tok = sum(trainer.task.n_tokens(idx) for s in range(first, trainer.state.step)
                        for idx in trainer.micro_batches(s))
            times[name].append(dt)
            peaks[name].append(peak)
            tokens[name].append(n_tok)
    e2e_tokens = sum(trainers[next(iter(trainers))].task.n_tokens(idx) for s in range(1 + rounds * steps)
                     for idx in trainers[next(iter(trainers))].micro_batches(s))
    rows = []
    for name in trainers:
        tps = statistics.median(t / s for t, s in zip(tokens[name], times[name]))
        peak = max(peaks[name]) if peaks[name][0] is not None else None
        rows.append({"phase": "train", "preset": preset, "variant": name, "device": dev.type,
                     "threads": torch.get_num_threads(),
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "precision": info[name]["precision"],
                     "micro_batch_pairs": mb, "tokens_per_step": tokens_per_step, "rounds": rounds,
                     "vocab_size": shape["vocab_size"], "prompt_tokens": list(shape["prompt"]),
                     "answer_tokens": list(shape["answer"]),
                     "steps_per_round": steps, "tokens_per_s": tps,
                     "step_s": statistics.median(times[name]) / steps, "step_peak_MB": peak,
                     "resident_MB": info[name]["resident_MB"],
                     "peak_MB": None if peak is None else peak + info[name]["resident_MB"],
                     "setup_s": info[name]["setup_s"], "e2e_s": info[name]["e2e_s"],
                     "e2e_steps": 1 + rounds * steps, "e2e_tokens_per_s": e2e_tokens / info[name]["e2e_s"],
                     "gradient_checkpointing": trainers[name].cfg.gradient_checkpointing,
                     "finetuning_type": trainers[name].cfg.finetuning_type,
                     "trainable_params": info[name]["trainable_params"],
                     "params_MB": info[name]["params_MB"], "optimizer_MB": info[name]["optimizer_MB"],
                     "train_peak_MB": None if peak is None else (peak + info[name]["resident_MB"]
                                                                 + info[name]["params_MB"]
                                                                 + info[name]["optimizer_MB"])})
    by = {r["variant"]: r for r in rows}
    fast, naive = by.get("fast"), by.get("naive")
    if fast and naive:
        fast["speedup_vs_naive"] = fast["tokens_per_s"] / naive["tokens_per_s"]
        fast["e2e_speedup_vs_naive"] = naive["e2e_s"] / fast["e2e_s"]
        if fast["peak_MB"] is not None:
            fast["memory_vs_naive"] = fast["peak_MB"] / naive["peak_MB"]
    for r in rows:
        if fast and r["variant"] not in ("fast", "naive"):
            r["tokens_per_s_vs_fast"] = r["tokens_per_s"] / fast["tokens_per_s"]
            if r["train_peak_MB"] is not None:
                r["train_memory_vs_fast"] = r["train_peak_MB"] / fast["train_peak_MB"]
    if verbose:
        print(format_rows(rows), flush=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    out = []
    for r in rows:
        line = (f"train {r['preset']:<10} {r['variant']:<6} {r['precision']:<5} "
                f"{r['tokens_per_s']:9.0f} tok/s  "
                f"step {r['step_s']:7.3f}s  peak {r['peak_MB'] or float('nan'):8.1f} MB "
                f"(step +{r['step_peak_MB'] or float('nan'):.1f}, resident {r['resident_MB']:.1f})  "
                f"setup {r['setup_s']:.2f}s, end to end {r['e2e_s']:.2f}s")
        if "speedup_vs_naive" in r:
            mem = r.get("memory_vs_naive", float("nan"))
            line += f"  x{r['speedup_vs_naive']:.2f} tok/s, x{mem:.2f} memory"
        if r.get("train_peak_MB") is not None:
            line += (f"\n      training footprint {r['train_peak_MB']:8.1f} MB (params {r['params_MB']:.1f}, "
                     f"optimizer {r['optimizer_MB']:.1f}, trainable {r['trainable_params']:,})")
        if "tokens_per_s_vs_fast" in r:
            mem = r.get("train_memory_vs_fast", float("nan"))
            line += f"  vs fast: x{r['tokens_per_s_vs_fast']:.2f} tok/s, x{mem:.2f} footprint"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=[*SHAPES, "all"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="steps per round (default: 4 tiny, 1 gpt2-124m)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is steadier on a shared machine: no thread waits on a "
                         "descheduled peer)")
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="pairs per step (default: the preset's; a larger batch makes activations matter)")
    ap.add_argument("--variants", default="fast,naive",
                    help=f"comma-separated, from {','.join(VARIANTS)} (memory: fast,checkpointing,lora)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for preset in (SHAPES if args.preset == "all" else [args.preset]):
        steps = args.steps or (4 if preset == "tiny" else 1)
        rows += run_train_bench(preset, rounds=args.rounds, steps=steps, precision=args.precision,
                                micro_batch_size=args.micro_batch_size,
                                variants=tuple(v.strip() for v in args.variants.split(",")),
                                device=args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()
