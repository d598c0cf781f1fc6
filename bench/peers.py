"""Peer rows for ``fastdpo bench``: the same DPO work done by the libraries users would otherwise use.

- ``trl``: TRL's ``DPOTrainer`` optimizer steps (transformers GPT-2 of the same shape, explicit
  frozen reference copy, bf16 where fastdpo uses it, no gradient checkpointing) vs fastdpo's
  trainer steps on the same pairs, same batch; tokens/s counts each pair's prompt twice plus both
  answers, for both sides.
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (fused lm_head + DPO loss) forward+backward
  vs ``kernels.linear_sequence_logprobs`` + the sigmoid DPO loss, and vs the naive path (full
  logits + float32 oracle), reference-free so all three compute the same loss.

Installed with ``pip install -e .[peers]``; a missing peer raises ImportError (the caller reports
"skipped"). Interleaved in one process; only the ratios are meaningful on a shared machine.

    python -m fastdpo.bench.peers [--preset tiny] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from fastdpo.bench.kernels import dpo_mask, measure

# preset -> (C, V, pairs per batch, rows' length T for the loss bench)
SHAPES = {
    "tiny": dict(n_embd=160, vocab=2048, pairs=8, T=256),
    "gpt2-124m": dict(n_embd=768, vocab=50304, pairs=4, T=512),
}


def _dpo_loss(logps: torch.Tensor, beta: float) -> torch.Tensor:
    chosen, rejected = logps.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def liger_rows(preset: str = "tiny", rounds: int = 3, dtype=torch.bfloat16) -> list[dict]:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    from fastdpo.kernels import linear_sequence_logprobs
    from fastdpo.kernels.reference import sequence_logprobs

    s = SHAPES[preset]
    B, T, C, V = 2 * s["pairs"], s["T"], s["n_embd"], s["vocab"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, C, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.02).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = dpo_mask(B, T)
    target = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=False)
    losses = {}

    def step(name, fn):
        def call():
            hidden.grad = weight.grad = None
            loss = fn()
            loss.backward()
            losses[name] = float(loss)

        return call

    impls = {
        "fastdpo fused": step(
            "fastdpo fused", lambda: _dpo_loss(linear_sequence_logprobs(hidden, weight, ids, mask), 0.1)
        ),
        "naive": step("naive", lambda: _dpo_loss(sequence_logprobs(hidden @ weight.T, ids, mask), 0.1)),
        "liger LigerFusedLinearDPOLoss": step(
            "liger LigerFusedLinearDPOLoss", lambda: _first(liger(weight, hidden[:, :-1], target))
        ),
    }
    times = {k: [] for k in impls}
    peaks = {k: [] for k in impls}
    for fn in impls.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in impls.items():
            dt, peak = measure(fn)
            times[k].append(dt)
            peaks[k].append(peak)
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
                speedup=t / base if k != "fastdpo fused" else None,
                peak_MB=max(peaks[k]) if peaks[k][0] is not None else None,
                shape=[B, T, C, V],
                dtype=str(dtype).replace("torch.", ""),
                loss=losses[k],
                note="speedup = fastdpo's speed-up over this row",
            )
        )
    return rows


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _text_pairs(n: int, seed: int = 0):
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
            prompt=text(rng.randint(10, 30)),
            chosen=text(rng.randint(20, 60)),
            rejected=text(rng.randint(20, 60)),
        )
        for _ in range(n)
    ]
    return corpus, rows


def trl_rows(preset: str = "tiny", steps: int = 4) -> list[dict]:
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from fastdpo.models.gpt import GPT, config_from_preset
    from fastdpo.models.tokenizer import Tokenizer
    from fastdpo.training.batches import TokenizedPair
    from fastdpo.training.config import DPOConfig, TrainingConfig
    from fastdpo.training.dpo import prepare_dpo

    s = SHAPES[preset]
    batch = s["pairs"]
    corpus, rows = _text_pairs(batch * (steps + 1))
    tok = Tokenizer.train(corpus, vocab_size=512)
    pairs = [
        TokenizedPair(
            tok.encode(r["prompt"]),
            tok.render_answer(" " + r["chosen"]),
            tok.render_answer(" " + r["rejected"]),
        )
        for r in rows
    ]
    tokens_per_step = statistics.mean(
        sum(p.n_tokens for p in pairs[i * batch : (i + 1) * batch]) for i in range(steps + 1)
    )
    cfg = config_from_preset(preset, vocab_size=tok.vocab_size)
    bf16 = True
    result = {}

    # TRL
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok._hf, pad_token="<|pad|>", eos_token="<|end|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as d:
        args = TRLDPOConfig(
            output_dir=d,
            per_device_train_batch_size=batch,
            max_steps=steps + 1,
            report_to="none",
            use_cpu=True,
            bf16=bf16,
            logging_steps=10**6,
            save_strategy="no",
            max_length=cfg.block_size,
            gradient_checkpointing=False,
            learning_rate=1e-6,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model,
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=hf_tok,
            callbacks=[Clock()],
        )
        dt, peak = measure(trainer.train)
    trl_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    result["trl DPOTrainer"] = (tokens_per_step / trl_step, trl_step, peak)

    # fastdpo on the same pairs, same batch and precision
    torch.manual_seed(0)
    tc = TrainingConfig(
        run_name="bench-peer",
        output_dir=tempfile.mkdtemp(),
        batch_size=batch,
        micro_batch_size=batch,
        learning_rate=1e-6,
        max_steps=10**6,
        log_every=0,
        mixed_precision="bf16" if bf16 else "fp32",
        wandb="disabled",
        progress=False,
        device="cpu",
    )
    ours = prepare_dpo(
        GPT(cfg),
        pairs,
        [],
        tc,
        DPOConfig(reference="cached", reference_cache_dir=None),
        pad_id=tok.pad_id,
        tokenizer_hash=tok.hash,
    )
    ours.train(steps=1)
    times = []
    for _ in range(steps):
        dt, peak_ours = measure(lambda: ours.train(steps=1))
        times.append(dt)
    our_step = statistics.median(times)
    result["fastdpo trainer"] = (tokens_per_step / our_step, our_step, peak_ours)
    out = []
    for k, (rate, step, peak) in result.items():
        out.append(
            dict(
                impl=k,
                rate=rate,
                unit="tok/s",
                step_s=step,
                peak_MB=peak,
                pairs_per_step=batch,
                tokens_per_step=tokens_per_step,
                precision="bf16" if bf16 else "fp32",
                speedup=step / our_step if k != "fastdpo trainer" else None,
                note="speedup = fastdpo's speed-up over this row; TRL peak includes its setup",
            )
        )
    return out


def run_peer_bench(preset: str = "tiny", quick: bool = False) -> list[dict]:
    rows = []
    errors = []
    for name, fn in (
        ("liger", lambda: liger_rows(preset, rounds=2 if quick else 3)),
        ("trl", lambda: trl_rows(preset, steps=2 if quick else 4)),
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
        print(f"  {r['impl']:<32} {r['rate'] or float('nan'):10.2f} {r['unit']:<10} {speedup}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = run_peer_bench(args.preset, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
