"""Padding-free packing vs the padded layout: DPO training-step tokens/s at equal work.

    python -m fastdpo.bench.packing [--data demo|wide|all] [--preset tiny|llama-tiny|gpt2-124m|llama-124m]
                                    [--precision auto|bf16|fp32] [--rounds N] [--steps K] [--json out.json]

Variants (``--variants``; the first is the baseline of the ratios):
- padded:          one shared-prompt row per pair, padded to the micro-batch's longest (the default layout);
- packed:          the same rows end to end in one flat row (``train.packing: true``);
- separate:        the seed's chosen rows + rejected rows, padded;
- separate-packed: those rows packed.

Data (``--data``):
- demo: the embedded task's prompts (``fastdpo.demo.task``, the demo config's families and word
  counts), chosen = the reference answer, rejected = a sloppy-teacher demonstration (the chatty
  habit at 0.6, a slip at 0.3): the shape of the pairs the demo mines; the demo's tiny model
  (block 64), micro-batches of 32, plain shuffles (length_bucket 1) as the demo runs;
- wide: synthetic pairs with a wide length spread (prompts 8-96, answers 4-150 tokens), micro-batches
  of 8, as users run it (``length_bucket`` 64, the default) and shuffled (``--length-bucket 1``).

Equal work: every variant trains a copy of the same model on the same pairs in the same
micro-batches (the batches are drawn from lengths that do not depend on the layout) in the same
precision with cached reference log-probs; each first runs its timed steps once untimed (warm
caches), then rounds alternate the variants (the machine is shared: ratios measured side by side
hold up, absolute times do not). tokens/s counts each pair's real tokens (prompt + chosen,
prompt + rejected), the same count for every variant.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench/train.py

import torch  # noqa: E402

from fastdpo.bench.kernels import measure  # noqa: E402
from fastdpo.bench.train import synthetic_pairs  # noqa: E402
from fastdpo.models.families import PRESETS, build_model, config_from_preset  # noqa: E402
from fastdpo.training.batches import TokenizedPair  # noqa: E402
from fastdpo.training.config import DPOConfig, TrainingConfig  # noqa: E402
from fastdpo.training.dpo import prepare_dpo  # noqa: E402

VARIANTS = {"padded": (True, False), "packed": (True, True), "separate": (False, False),
            "separate-packed": (False, True)}   # name -> (shared_prompt, packing)
# data -> model overrides, micro-batch pairs, length bucket
DATA = {"demo": dict(block_size=64, micro_batch_size=32, length_bucket=1),
        "wide": dict(block_size=256, micro_batch_size=8, length_bucket=64)}


def demo_pairs(n: int, seed: int = 0) -> tuple[list[TokenizedPair], int]:
    """(pairs, vocabulary size): the demo task's prompts with the reference answer as chosen and a
    sloppy-teacher demonstration as rejected, in the demo's chat template and tokenizer kind."""
    from fastdpo.demo import task
    from fastdpo.models.tokenizer import Tokenizer
    from fastdpo.training.batches import tokenize_pairs
    from fastdpo.training.data import DataStats, PreferenceExample

    cfg = task.TaskConfig(n_sft=2000, n_mine=n, n_eval=0, min_words=3, max_words=4,
                          families=("reverse", "sort", "count"))
    data = task.build(seed, cfg)
    tok = Tokenizer.train(data.corpus, vocab_size=512)
    rng = random.Random(seed)
    examples = [PreferenceExample(turns=[("user", it.instruction)], chosen=it.answer,
                                  rejected=task.demonstration(rng, it, habit_rate=0.6, slip_rate=0.3),
                                  source=f"demo:{i}")
                for i, it in enumerate(data.mine)]
    return tokenize_pairs(examples, tok, 64, 64, 64, DataStats()), tok.vocab_size


def wide_pairs(n: int, seed: int = 0) -> tuple[list[TokenizedPair], int]:
    return synthetic_pairs(n, 2048, (8, 96), (4, 150), seed), 2048


def run_packing_bench(data: str = "demo", preset: str = "tiny", rounds: int = 3,
                      steps: int = 2, precision: str = "auto", length_bucket: int | None = None,
                      micro_batch_size: int | None = None,
                      variants: tuple[str, ...] = ("padded", "packed"), seed: int = 0,
                      verbose: bool = True, device: str = "cpu") -> list[dict]:
    """One row per variant: tokens/s, step seconds, peak step memory; every row after the first
    carries ``speedup`` over the first."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or data not in DATA:
        raise ValueError(f"variants from {list(VARIANTS)}, data from {list(DATA)}; got {variants}, {data!r}")
    shape = dict(DATA[data])
    mb = micro_batch_size or shape["micro_batch_size"]
    bucket = length_bucket or shape["length_bucket"]
    n_pairs = mb * steps * (rounds + 2)
    pairs, vocab = (demo_pairs if data == "demo" else wide_pairs)(n_pairs, seed)
    torch.manual_seed(seed)
    block = max(shape["block_size"], max(p.packed_length for p in pairs))
    base = build_model(config_from_preset(preset, vocab_size=vocab, block_size=block))
    common = dict(output_dir="/tmp/fastdpo-bench", batch_size=mb, micro_batch_size=mb, learning_rate=1e-6,
                  max_steps=10**6, log_every=0, mixed_precision=precision, wandb="disabled", progress=False,
                  device=device, seed=seed, length_bucket=bucket, report_to="none")
    trainers = {}
    for name in variants:
        shared, packing = VARIANTS[name]
        tc = TrainingConfig(run_name=f"bench-packing-{name}", packing=packing, **common)
        trainer = prepare_dpo(copy.deepcopy(base), pairs, [], tc, DPOConfig(reference="cached",
                                                                            shared_prompt=shared),
                              pad_id=0, tokenizer_hash=f"bench-packing-{data}", say=lambda *a, **k: None)
        # one batching for every variant: the shared-prompt rows' lengths (the separate rows'
        # would bucket other pairs together)
        trainer.task.lengths = [p.packed_length for p in pairs]
        trainer.train(steps=1)                  # the optimizer state
        start = trainer.state.step
        trainer.train(steps=rounds * steps)     # warm-up over exactly the timed batches
        trainer.state.step = start
        trainers[name] = trainer
    first = trainers[variants[0]]
    batches = [first.micro_batches(s) for s in range(first.state.step, first.state.step + rounds * steps)]
    for t in trainers.values():
        assert [t.micro_batches(s) for s in range(t.state.step, t.state.step + rounds * steps)] == batches, \
            "variants must train on the same micro-batches"
    times, peaks, tokens = ({k: [] for k in trainers} for _ in range(3))
    for _ in range(rounds):
        for name, trainer in trainers.items():
            s0 = trainer.state.step
            dt, peak = measure(lambda trainer=trainer: trainer.train(steps=steps), trainer.device)
            times[name].append(dt)
            peaks[name].append(peak)
            tokens[name].append(sum(trainer.task.n_tokens(idx) for s in range(s0, trainer.state.step)
                                    for idx in trainer.micro_batches(s)))
    rows = []
    for name, trainer in trainers.items():
        padded_tokens = statistics.mean(_padded_tokens(trainer, b) for b in batches)
        rows.append({"phase": "packing", "data": data, "preset": preset, "variant": name,
                     "device": trainer.device.type,
                     "precision": trainer.precision, "threads": torch.get_num_threads(),
                     "micro_batch_pairs": mb, "length_bucket": bucket, "rounds": rounds,
                     "steps_per_round": steps, "real_tokens_per_step": statistics.mean(tokens[name]) / steps,
                     "model_tokens_per_step": padded_tokens,
                     "tokens_per_s": statistics.median(t / s for t, s in zip(tokens[name], times[name])),
                     "step_s": statistics.median(times[name]) / steps,
                     "step_peak_MB": None if peaks[name][0] is None else max(peaks[name]),
                     "load_average": os.getloadavg()[0]})
    for r in rows[1:]:
        r["speedup"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    if verbose:
        print(format_rows(rows), flush=True)
    return rows


def _padded_tokens(trainer, micro: list[list[int]]) -> int:
    """Tokens the model runs on in a step: the padded rows' R x T, or the packed rows' slots (their
    bins' rows x width; the real tokens where the flat row runs as one varlen call)."""
    from fastdpo.models.segments import varlen_usable
    from fastdpo.training.packing import flat_pairs

    task, total = trainer.task, 0
    for idx in micro:
        ps = [task.train[i] for i in idx]
        if task.packing:
            segments = flat_pairs(ps, 0, task.shared_prompt)[3].segments
            dtype = torch.bfloat16 if trainer.precision == "bf16" else next(trainer.model.parameters()).dtype
            if varlen_usable(trainer.device, dtype):
                total += segments.n_tokens
            else:
                bins = segments.bins()
                total += bins.n * bins.width
        elif task.shared_prompt:
            total += len(ps) * max(p.packed_length for p in ps)
        else:
            total += 2 * len(ps) * max(p.length for p in ps)
    return total


def format_rows(rows: list[dict]) -> str:
    out = []
    for r in rows:
        line = (f"packing {r['data']:<5} {r['preset']:<10} {r['variant']:<16} {r['precision']:<5} "
                f"{r['tokens_per_s']:9.0f} tok/s  step {r['step_s']:7.3f}s  model tokens/step "
                f"{r['model_tokens_per_step']:7.0f} (real {r['real_tokens_per_step']:.0f})  "
                f"peak +{r['step_peak_MB'] or float('nan'):.1f} MB")
        if "speedup" in r:
            line += f"  x{r['speedup']:.2f} vs {rows[0]['variant']}"
        out.append(line)
    return "\n".join(out)


def packing_phase(ctx: dict, out: dict, row, compare) -> None:
    """The ``packing`` phase of ``fastdpo bench``: padded vs packed on the demo's pairs and on
    wide-spread pairs, at the tiny shape whatever the preset (the phase compares layouts; the
    module's ``--preset`` runs larger shapes). ``row`` and ``compare`` are ``bench.run``'s."""
    quick, device = ctx["quick"], ctx["device"].type
    for data in DATA:
        rows = run_packing_bench(data, "tiny", rounds=2 if quick else 3, steps=1 if quick else 2,
                                 device=device)
        out["raw"].setdefault("packing", []).extend(rows)
        name = {r["variant"]: f"{r['variant']} ({data} pairs)" for r in rows}
        for r in rows:
            out["summary"].append(row("packing", name[r["variant"]], r["tokens_per_s"], "tok/s",
                                      preset="tiny", device=r["device"], peak_MB=r["step_peak_MB"],
                                      precision=r["precision"],
                                      model_tokens_per_step=r["model_tokens_per_step"]))
            if "speedup" in r:
                compare(out, "packing", name[r["variant"]], name[rows[0]["variant"]], r["speedup"], "tok/s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="all", choices=[*DATA, "all"])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (and family)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per round")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--length-bucket", type=int, default=None, help="default: the data's (demo 1, wide 64)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", default="padded,packed", help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--json", default=None, help="write the rows and where they came from (command, CPU, "
                    "versions, git revision, load average) here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    t0, load_before = time.time(), os.getloadavg()
    for data in (DATA if args.data == "all" else [args.data]):
        rows += run_packing_bench(data, args.preset, args.rounds, args.steps, args.precision,
                                  args.length_bucket, args.micro_batch_size,
                                  tuple(v.strip() for v in args.variants.split(",")))
    print(f"({time.time() - t0:.0f}s, load average {os.getloadavg()[0]:.2f})")
    if args.json:
        from fastdpo.bench.run import provenance
        from fastdpo.files import write_json
        write_json(args.json, {"meta": provenance("fastdpo.bench.packing", argv, load_before), "rows": rows},
                   indent=1)
        print(f"wrote {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()
