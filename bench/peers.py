"""Peer rows for ``fastdpo bench``: the same DPO work done the way users of the peer libraries run it.

Loss op (``liger``): the sigmoid DPO loss over a batch of chosen/rejected rows, forward + backward,
reference-free so every side computes the same number: fastdpo's ``linear_sequence_logprobs`` + the
loss, the naive path (full logits + float32 oracle), and Liger-Kernel's ``LigerFusedLinearDPOLoss``
both compiled (``torch.compile``, as its users run it; the compile is the untimed warm-up call and
its time is reported as ``first_call_s``) and uncompiled. Every side is warmed up once, then timed
interleaved; the losses must agree within ``LOSS_RTOL`` (bf16 inputs) or the phase fails.

Trainers: fastdpo's trainer vs TRL's ``DPOTrainer`` with ``precompute_ref_log_probs=True`` (TRL's
own cached-reference mode: no reference model during training) and a second TRL row that adds
``use_liger_kernel=True``. Same transformers GPT-2 shape and the same initial weights (fastdpo's
model exported under transformers' names), the same pairs tokenised the same way (TRL's
tokenisation: prompt, then prompt + answer + eos, split at the common prefix), the same batch,
bf16 autocast, no gradient checkpointing, dropout off. TRL takes the pairs in dataset order,
fastdpo shuffles its batches; both cover every pair once, and each side's step tokens/s counts
the tokens of its own timed steps. Each side runs in a
fresh subprocess of its own, one after the other (no side inherits the other's allocator state,
and peak memory is that process's alone):
- ``step``: tokens/s of the optimizer steps after the first (tokens = each pair's prompt twice plus
  both answers, for every side, so the ratio is pairs per second);
- ``end to end``: tokenisation + trainer setup + the reference pass (TRL's precompute, fastdpo's
  reference cache computed into a fresh directory) + every step including the first;
- memory: on CPU, the peak resident memory of the whole end-to-end run above the process's
  resident size just before it (model built, libraries imported; ``VmHWM`` reset through
  ``/proc/self/clear_refs``; large allocations mmap'd so freed memory leaves RSS); on CUDA,
  ``torch.cuda.max_memory_allocated`` above the allocation before.
The sides must agree: step-0 loss ln 2 within ``LN2_ATOL`` and the mean reference log-probs of the
chosen and rejected answers within ``REF_RTOL`` (same weights, same tokens, bf16).

Installed with ``pip install -e .[peers]``; a missing peer raises ImportError (the caller reports
"skipped"). The module is long because each trainer side (setup, timing, memory, the values checked
across sides) is spelled out in full, both for fastdpo and for TRL.

    python -m fastdpo.bench.peers [--preset tiny|gpt2-mid|gpt2-124m|llama-tiny|llama-124m] [--quick]
                                  [--device auto] [--json out.json]

Liger-Kernel has no kernels for GPT-2: on the GPT-2 presets ``use_liger_kernel=True`` changes nothing
in TRL's run (the row says so, ``liger_applied``); the Llama presets (RMSNorm, RoPE, SwiGLU) are
where it acts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

# libgomp reads its wait policy once, when torch loads it (see bench/kernels.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastdpo.bench.kernels import _status_kb, dpo_mask, measure  # noqa: E402
from fastdpo.bench.peak import resolve_device  # noqa: E402

# preset -> loss op shape (C, V, pairs, row length T) and trainer workload (pairs per step, words
# in prompts and answers)
SHAPES = {
    "tiny": dict(n_embd=160, vocab=2048, pairs=8, T=256, prompt_words=(10, 30), answer_words=(20, 60)),
    "gpt2-124m": dict(n_embd=768, vocab=50304, pairs=4, T=512, prompt_words=(32, 96), answer_words=(64, 160)),
    "gpt2-mid": dict(n_embd=512, vocab=32768, pairs=4, T=512, prompt_words=(32, 96), answer_words=(64, 160)),
}
LOSS_RTOL = 1e-3  # loss op: bf16 inputs, float32 log-sum-exp on every side
LN2_ATOL = 1e-3  # trainers: step-0 loss (policy == reference)
REF_RTOL = 2e-2  # trainers: mean reference log-prob per answer, bf16 forward on both sides
SIDES = ("fastdpo", "trl", "trl+liger")
SHAPES["llama-tiny"], SHAPES["llama-124m"] = SHAPES["tiny"], SHAPES["gpt2-124m"]
# timed steps, after one
TRAINER_STEPS = {"tiny": 4, "gpt2-124m": 3, "gpt2-mid": 3, "llama-tiny": 4, "llama-124m": 3}


def liger_patches(model_type: str) -> bool:
    """Whether Liger-Kernel has kernels for this transformers model type (``use_liger_kernel=True``
    does nothing to a model it has none for: GPT-2 among them)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


class PeerMismatch(AssertionError):
    """Two sides of a peer comparison did not compute the same thing: their timings are not comparable."""


def _dpo_loss(logps: torch.Tensor, beta: float) -> torch.Tensor:
    chosen, rejected = logps.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def check_same(
    values: dict[str, float],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    what: str = "loss",
    reference: str | None = None,
) -> None:
    """Every value within ``atol + rtol * |reference|`` of the reference side's (default: the first)."""
    reference = reference or next(iter(values))
    ref = values[reference]
    for name, v in values.items():
        if not math.isfinite(v) or abs(v - ref) > atol + rtol * abs(ref):
            raise PeerMismatch(
                f"peers: {name} computed {what} {v!r}, {reference} {ref!r} "
                f"(tolerance {atol} + {rtol} x |{ref:.4g}|): not the same work"
            )


def liger_rows(preset: str = "tiny", rounds: int = 3, dtype=torch.bfloat16, device="cpu") -> list[dict]:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    from fastdpo.kernels import linear_sequence_logprobs
    from fastdpo.kernels.reference import sequence_logprobs

    dev = resolve_device(device)
    s = SHAPES[preset]
    B, T, C, V = 2 * s["pairs"], s["T"], s["n_embd"], s["vocab"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, C, generator=g).to(dev, dtype).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.02).to(dev, dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = dpo_mask(B, T).to(dev)
    target = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    liger = {
        True: LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=True),
        False: LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=False),
    }
    losses: dict[str, float] = {}

    def step(name, fn):
        def call():
            hidden.grad = weight.grad = None
            loss = fn()
            loss.backward()
            losses[name] = float(loss.detach())

        return call

    impls = {
        "fastdpo fused": step(
            "fastdpo fused", lambda: _dpo_loss(linear_sequence_logprobs(hidden, weight, ids, mask), 0.1)
        ),
        "naive": step("naive", lambda: _dpo_loss(sequence_logprobs(hidden @ weight.T, ids, mask), 0.1)),
        "liger compiled": step("liger compiled", lambda: _first(liger[True](weight, hidden[:, :-1], target))),
        "liger uncompiled": step(
            "liger uncompiled", lambda: _first(liger[False](weight, hidden[:, :-1], target))
        ),
    }
    first_call = {}
    for k, fn in impls.items():  # warm-up; for compiled Liger this is the compilation
        first_call[k], _ = measure(fn, dev)
    check_same(losses, rtol=LOSS_RTOL)
    times = {k: [] for k in impls}
    peaks = {k: [] for k in impls}
    for _ in range(rounds):
        for k, fn in impls.items():
            dt, peak = measure(fn, dev)
            times[k].append(dt)
            peaks[k].append(peak)
    check_same(losses, rtol=LOSS_RTOL)
    base = statistics.median(times["fastdpo fused"])
    rows = []
    for k in impls:
        t = statistics.median(times[k])
        rows.append(
            dict(
                impl=k,
                rate=1.0 / t,
                unit="fwd+bwd/s",
                seconds=t,
                first_call_s=first_call[k],
                baseline=None if k == "fastdpo fused" else k,
                speedup=t / base if k != "fastdpo fused" else None,
                peak_MB=max(peaks[k]) if peaks[k][0] is not None else None,
                shape=[B, T, C, V],
                dtype=str(dtype).replace("torch.", ""),
                device=dev.type,
                loss=losses[k],
                loss_rtol=LOSS_RTOL,
                rounds=rounds,
                note="speedup = fastdpo fused's speed-up over this row; first_call_s = the warm-up call "
                "(for compiled Liger: its compilation)",
            )
        )
    return rows


def _first(x):
    return x[0] if isinstance(x, tuple) else x


# --------------------------------------------------------------------------- trainers


def _text_pairs(n: int, prompt_words: tuple[int, int], answer_words: tuple[int, int], seed: int = 0):
    words = (
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
        "sigma tau upsilon phi chi psi omega"
    ).split()
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    corpus = [text(40) for _ in range(300)]
    rows = [
        dict(
            prompt=text(rng.randint(*prompt_words)),
            chosen=" " + text(rng.randint(*answer_words)),
            rejected=" " + text(rng.randint(*answer_words)),
        )
        for _ in range(n)
    ]
    return corpus, rows


def _workload(preset: str, steps: int):
    """(rows of text, HF tokenizer, fastdpo model of the preset's shape), the same in every process."""
    from transformers import PreTrainedTokenizerFast

    from fastdpo.models.families import build_model, config_from_preset
    from fastdpo.models.tokenizer import Tokenizer

    s = SHAPES[preset]
    corpus, rows = _text_pairs(s["pairs"] * (steps + 1), s["prompt_words"], s["answer_words"])
    tok = Tokenizer.train(corpus, vocab_size=512)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok._hf, pad_token="<|pad|>", eos_token="<|end|>")
    torch.manual_seed(0)
    # the tiny shapes take the tokenizer's vocabulary, the 124M shapes keep their own
    vocab = tok.vocab_size if preset.endswith("tiny") else None
    cfg = config_from_preset(preset, **({"vocab_size": vocab} if vocab else {}))
    return rows, hf_tok, build_model(cfg)


def trl_tokenize(hf_tok, row: dict) -> tuple[list[int], list[int], list[int]]:
    """TRL's tokenisation of a text pair (eos appended to the answers; prompt + answer tokenised
    together and split at the common prefix with the prompt's tokens)."""
    eos = hf_tok.eos_token
    prompt = hf_tok(row["prompt"])["input_ids"]
    pc = hf_tok(row["prompt"] + row["chosen"] + eos)["input_ids"]
    pr = hf_tok(row["prompt"] + row["rejected"] + eos)["input_ids"]
    n = 0
    while n < min(len(prompt), len(pc), len(pr)) and prompt[n] == pc[n] == pr[n]:
        n += 1
    return prompt[:n], pc[n:], pr[n:]


def _pair_tokens(p, c, r) -> int:
    return 2 * len(p) + len(c) + len(r)


def _rss_mark() -> int | None:
    """Reset the peak-RSS mark; the resident size now (kB), or None without /proc."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def _peak_since(mark, dev) -> float | None:
    if dev.type == "cuda":
        return (torch.cuda.max_memory_allocated() - mark) / 2**20
    hwm = _status_kb("VmHWM") if mark is not None else None
    return None if hwm is None else (hwm - mark) / 1024


def run_side(side: str, preset: str, steps: int, device: str = "cpu") -> dict:
    """One trainer's run (called in its own process): timings, peak memory, loss and reference log-probs."""
    dev = resolve_device(device)
    rows, hf_tok, model = _workload(preset, steps)
    batch = SHAPES[preset]["pairs"]
    out: dict = {"side": side, "device": dev.type, "pairs_per_step": batch, "steps": steps + 1}
    if side != "fastdpo":  # the same weights under transformers' class, built before the memory mark
        model = _to_hf(model)
    model.to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mark = torch.cuda.memory_allocated()
    else:
        mark = _rss_mark()
    if side == "fastdpo":
        out.update(_fastdpo_side(rows, hf_tok, model, batch, steps, dev))
    else:
        out.update(_trl_side(rows, hf_tok, model, batch, steps, dev, liger=side == "trl+liger"))
    out["peak_MB"] = _peak_since(mark, dev)
    return out


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _fastdpo_side(rows, hf_tok, model, batch, steps, dev) -> dict:
    # torch.optim imports torch._dynamo on first use (seconds); TRL's side has it imported before its
    # clock starts (transformers imports it), so import it here too: libraries load outside the timing.
    import torch._dynamo  # noqa: F401

    from fastdpo.training.batches import TokenizedPair
    from fastdpo.training.config import DPOConfig, TrainingConfig
    from fastdpo.training.dpo import prepare_dpo

    stamps, losses = [], []
    _sync(dev)
    t0 = time.perf_counter()
    pairs = [TokenizedPair(*trl_tokenize(hf_tok, r)) for r in rows]
    with tempfile.TemporaryDirectory() as d:
        tc = TrainingConfig(
            run_name="bench-peer",
            output_dir=d,
            batch_size=batch,
            micro_batch_size=batch,
            learning_rate=1e-6,
            max_steps=steps + 1,
            log_every=1,
            mixed_precision="bf16",
            wandb="disabled",
            progress=False,
            device=dev.type,
            length_bucket=1,
        )
        trainer = prepare_dpo(
            model,
            pairs,
            [],
            tc,
            DPOConfig(reference="cached"),
            pad_id=hf_tok.pad_token_id,
            tokenizer_hash="peers",
            device=dev,
            say=lambda *a, **k: None,
        )
        ref = trainer.task.ref_train.float().cpu()
        for _ in range(steps + 1):
            trainer.train(steps=1)
            _sync(dev)
            stamps.append(time.perf_counter())
        e2e = stamps[-1] - t0
        timed = [sum(trainer.task.n_tokens(i) for i in trainer.micro_batches(s)) for s in range(1, steps + 1)]
        losses = [h["loss"] for h in trainer.state.history if h.get("split", "train") == "train"]
    return {
        "step_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "timed_tokens": sum(timed),
        "e2e_s": e2e,
        "e2e_tokens": sum(_pair_tokens(p.prompt, p.chosen, p.rejected) for p in pairs),
        "step0_loss": losses[0],
        "ref_chosen_mean": float(ref[:, 0].mean()),
        "ref_rejected_mean": float(ref[:, 1].mean()),
    }


def _to_hf(model):
    """fastdpo's GPT as transformers' own class, same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastdpo.models.hf_config import config_to_hf
    from fastdpo.models.hf_weights import hf_state_dict

    hf_config = config_to_hf(model.config)
    model_type = hf_config.pop("model_type")
    hf_config.pop("architectures")
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_config))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or any(not k.endswith(("lm_head.weight", "attn.bias", "masked_bias")) for k in missing):
        raise PeerMismatch(
            f"peers: fastdpo weights do not map onto {type(hf).__name__}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    hf.tie_weights()
    return hf


def _checkpointing_field() -> str:
    """transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing``."""
    import dataclasses

    from trl import DPOConfig as TRLDPOConfig

    names = {f.name for f in dataclasses.fields(TRLDPOConfig)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _trl_side(rows, hf_tok, hf, batch, steps, dev, *, liger: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    checkpointing = _checkpointing_field()
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _sync(dev)
            stamps.append(time.perf_counter())

    _sync(dev)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        args = TRLDPOConfig(
            output_dir=d,
            per_device_train_batch_size=batch,
            max_steps=steps + 1,
            report_to="none",
            use_cpu=dev.type == "cpu",
            bf16=True,
            logging_steps=1,
            save_strategy="no",
            max_length=getattr(hf.config, "n_positions", None) or hf.config.max_position_embeddings,
            **{checkpointing: False},
            learning_rate=1e-6,
            disable_tqdm=True,
            precompute_ref_log_probs=True,
            use_liger_kernel=liger,
            train_sampling_strategy="sequential",
            dataloader_pin_memory=dev.type == "cuda",
        )
        trainer = DPOTrainer(
            hf,
            ref_model=None,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=hf_tok,
            callbacks=[Clock()],
        )
        trainer.train()
        e2e = stamps[-1] - t0
        ds = trainer.train_dataset
        toks = [
            _pair_tokens(p, c, r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
        ]
        ref_c, ref_r = ds["ref_chosen_logps"], ds["ref_rejected_logps"]
        loss0 = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return {
        "liger_applied": liger and liger_patches(hf.config.model_type),
        "model_type": hf.config.model_type,
        "step_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "timed_tokens": sum(toks[batch:]),
        "e2e_s": e2e,
        "e2e_tokens": sum(toks),
        "step0_loss": float(loss0),
        "ref_chosen_mean": float(sum(ref_c) / len(ref_c)),
        "ref_rejected_mean": float(sum(ref_r) / len(ref_r)),
    }


def _spawn_side(side: str, preset: str, steps: int, device: str, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "side.json")
        cmd = [
            sys.executable,
            "-m",
            "fastdpo.bench.peers",
            "--side",
            side,
            "--preset",
            preset,
            "--steps",
            str(steps),
            "--device",
            device,
            "--json",
            out,
        ]
        env = {
            "OMP_WAIT_POLICY": "PASSIVE",
            **os.environ,
            "TQDM_DISABLE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            if "ModuleNotFoundError" in proc.stderr or "ImportError" in proc.stderr:
                raise ImportError(f"{side}: {tail[0]}")
            raise RuntimeError(f"peers: the {side} side failed: {proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def trainer_rows(preset: str = "tiny", steps: int = 4, device: str = "cpu", sides=SIDES) -> list[dict]:
    """Step and end-to-end rows per trainer, each side in its own subprocess; fastdpo's speed-up
    (and memory ratio) over each TRL row."""
    dev = resolve_device(device)
    threads = torch.get_num_threads()
    results = {}
    model_type = "llama" if preset.startswith("llama") else "gpt2"
    for side in sides:
        if side == "trl+liger" and dev.type == "cpu" and liger_patches(model_type):
            results[side] = {"skipped": f"Liger-Kernel's {model_type} kernels are Triton: they need a GPU"}
            continue
        try:
            results[side] = _spawn_side(side, preset, steps, dev.type, threads)
        except ImportError as e:
            if side == "fastdpo":
                raise
            results[side] = {"skipped": str(e)}
    ran = {k: v for k, v in results.items() if "skipped" not in v}
    check_same(
        {k: v["step0_loss"] for k, v in ran.items()} | {"ln 2": math.log(2)},
        atol=LN2_ATOL,
        what="step-0 loss",
        reference="ln 2",
    )
    for key in ("ref_chosen_mean", "ref_rejected_mean"):
        check_same({k: v[key] for k, v in ran.items()}, rtol=REF_RTOL, what=key, reference="fastdpo")
    ours = ran["fastdpo"]
    out = []
    for side, r in results.items():
        if "skipped" in r:
            out.append(dict(impl=f"{_name(side)} (skipped)", rate=None, unit="", note=r["skipped"]))
            continue
        step = sum(r["step_s"])
        rate = r["timed_tokens"] / step
        e2e_rate = r["e2e_tokens"] / r["e2e_s"]
        ours_rate = ours["timed_tokens"] / sum(ours["step_s"])
        ours_e2e = ours["e2e_tokens"] / ours["e2e_s"]
        common = dict(
            pairs_per_step=r["pairs_per_step"],
            precision="bf16",
            device=r["device"],
            step0_loss=r["step0_loss"],
            ref_chosen_mean=r["ref_chosen_mean"],
            ref_rejected_mean=r["ref_rejected_mean"],
        )
        if side == "trl+liger":
            common["liger_applied"] = r["liger_applied"]
            if not r["liger_applied"]:
                common["liger_note"] = (
                    f"Liger-Kernel has no kernels for {r['model_type']}: this row runs what the plain TRL "
                    "row runs (a Llama-family preset, e.g. llama-124m, exercises them)"
                )
        is_ours = side == "fastdpo"
        out.append(
            dict(
                impl=f"{_name(side)} step",
                rate=rate,
                unit="tok/s",
                baseline=None if is_ours else _name(side),
                speedup=None if is_ours else ours_rate / rate,
                peak_MB=r["peak_MB"],
                memory_vs_fastdpo=None if is_ours or not ours["peak_MB"] else r["peak_MB"] / ours["peak_MB"],
                step_s=step / len(r["step_s"]),
                timed_steps=len(r["step_s"]),
                **common,
                note="steps after the first; peak_MB = peak RSS (CUDA: allocated) of the whole run "
                "above the process before it",
            )
        )
        out.append(
            dict(
                impl=f"{_name(side)} end to end",
                rate=e2e_rate,
                unit="tok/s",
                baseline=None if is_ours else _name(side),
                speedup=None if is_ours else ours_e2e / e2e_rate,
                seconds=r["e2e_s"],
                steps=r["steps"],
                **common,
                note="tokenisation + setup + reference pass + every step",
            )
        )
    return out


def _name(side: str) -> str:
    return {
        "fastdpo": "fastdpo trainer",
        "trl": "TRL DPOTrainer (precompute_ref_log_probs)",
        "trl+liger": "TRL DPOTrainer (precompute_ref_log_probs, use_liger_kernel)",
    }[side]


def run_peer_bench(preset: str = "tiny", quick: bool = False, device: str = "cpu") -> list[dict]:
    rows = []
    errors = []
    for name, fn in (
        ("liger", lambda: liger_rows(preset, rounds=2 if quick else 3, device=device)),
        ("trl", lambda: trainer_rows(preset, steps=2 if quick else TRAINER_STEPS[preset], device=device)),
    ):
        try:
            rows += fn()
        except ImportError as e:
            errors.append(f"{name}: {e}")
    if errors and not rows:
        raise ImportError("; ".join(errors))
    for e in errors:
        rows.append(dict(impl=e.split(":")[0], rate=None, unit="", note=f"skipped: {e}"))
    for r in rows:
        speedup = "" if r.get("speedup") is None else f"fastdpo x{r['speedup']:.2f}"
        print(f"  {r['impl']:<64} {r['rate'] or float('nan'):10.2f} {r['unit']:<10} {speedup}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--side", choices=SIDES, default=None, help="run one trainer side (used by the bench itself)"
    )
    ap.add_argument(
        "--steps", type=int, default=4, help="timed steps per trainer side (after one warm-up step)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        result = run_side(args.side, args.preset, args.steps, args.device)
    else:
        result = run_peer_bench(args.preset, args.quick, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
