"""``fastdpo bench``: every phase of the preference loop, fast path vs the naive oracle, in one run.

Phases (each a module of its own, callable alone with ``python -m fastdpo.bench.<phase>``):

- ``sample``  KV-cached ragged sampler vs the re-forward oracle (``fastdpo.bench.sampler``), new tokens/s,
              plus its scaling with ``max_new_tokens`` and transformers' ``generate`` when installed;
- ``judge``   OpenAIJudge against a local ``fastdpo serve``: requests/s at concurrency 1/8/32, and
              pairs mined per minute end to end (``fastdpo.bench.judge``);
- ``train``   one DPO step: fused log-prob kernels + cached reference vs naive log-probs + reference
              forward every step (``fastdpo.bench.train``), plus its scaling with sequence length;
- ``eval``    position-swapped evaluation, prompts/s, with the fast sampler vs the oracle sampler;
- ``kernels`` the fused log-prob micro-benchmarks and the sm_89 AOT report (``fastdpo.bench.kernels``);
- ``mining``  pairs mined per minute per generation backend (built-in sampler, an OpenAI-compatible
              server, in-process vLLM) at equal prompts, K and lengths (``fastdpo.bench.mining_backends``);
- ``peers``   TRL ``DPOTrainer`` steps and Liger-Kernel's ``LigerFusedLinearDPOLoss`` on the same
              shapes, when installed (``pip install -e .[peers]``; ``fastdpo.bench.peers``).

Every ratio is measured inside this one process with the two sides interleaved: the machine may
be shared, so absolute times are only indicative. The machine's matmul peak (float32 and bf16) is
measured first and each phase reports the fraction of it its model FLOPs achieve.
On CUDA the same command runs the Triton paths; on CPU, GPU figures are reported as unmeasured.
The module is long because it drives every phase and draws the summary figure.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from fastdpo.bench.peak import matmul_peaks

PHASES = ("sample", "judge", "train", "eval", "kernels", "peers", "mining")
DEFAULT_PHASES = ("sample", "judge", "train", "eval", "peers")


def _summary(phase, impl, rate, unit, *, preset, speedup=None, peak_MB=None, peak_fraction=None, **detail):
    return dict(
        phase=phase,
        impl=impl,
        preset=preset,
        rate=rate,
        unit=unit,
        speedup=speedup,
        peak_MB=peak_MB,
        peak_fraction=peak_fraction,
        detail=detail,
    )


def _model_flops(preset: str, vocab: int) -> tuple[int, int, int]:
    from fastdpo.models.gpt import GPT, config_from_preset

    cfg = config_from_preset(preset, vocab_size=vocab)
    with torch.device("meta"):
        n = GPT(cfg).num_params()
    return n, cfg.n_layer, cfg.n_embd


def bench_sample(preset, quick, peaks, peers, out):
    from fastdpo.bench.sampler import run_sampler_bench

    max_new = (32, 64) if quick else (64, 128, 256, 512)
    rows = run_sampler_bench(
        preset,
        n_prompts=8 if quick else 16,
        k=4,
        max_new_tokens=max_new,
        dtypes=("float32", "bfloat16"),
        measure_max_new=32 if quick else None,  # None: the preset's default (bench.sampler)
        hf=peers,
        hf_max_new=(max_new[0],),
        verbose=True,
    )
    out["raw"]["sample"] = rows
    n_params, n_layer, n_embd = _model_flops(preset, 2048 if preset == "tiny" else 50304)
    headline = max_new[-2] if len(max_new) > 2 else max_new[-1]
    # One row per (impl, dtype) in the table: the headline length, a full run where there is one
    # (the profile estimate otherwise); generate is measured at its own, shorter length.
    best: dict = {}
    for r in rows:
        if r["impl"] != "hf_generate" and r["max_new_tokens"] != headline:
            continue
        key = (r["impl"], r["dtype"])
        if key not in best or (r["method"] == "measured" and best[key]["method"] != "measured"):
            best[key] = r
    for r in best.values():
        flops = 2 * n_params * r["tokens_per_s"]
        out["summary"].append(
            _summary(
                "sample", f"{r['impl']} @{r['max_new_tokens']} ({r['method']})", r["tokens_per_s"],
                "new tok/s", preset=preset, speedup=r.get("fast_speedup"),
                peak_fraction=flops / peaks[r["dtype"]], dtype=r["dtype"],
                max_new_tokens=r["max_new_tokens"], method=r["method"],
            )
        )
    for r in rows:
        if r["impl"] in ("fast", "oracle"):
            out["scaling"].append(
                dict(
                    phase="sample",
                    impl=r["impl"],
                    dtype=r["dtype"],
                    x="max_new_tokens",
                    x_value=r["max_new_tokens"],
                    rate=r["tokens_per_s"],
                    unit="new tok/s",
                    method=r["method"],
                )
            )


def bench_train(preset, quick, peaks, peers, out):
    from fastdpo.bench.train import run_train_bench

    rows = run_train_bench(preset, rounds=2 if quick else 3, steps=2 if preset == "tiny" else 1)
    out["raw"]["train"] = rows
    n_params, n_layer, n_embd = _model_flops(
        preset, rows[0].get("vocab_size", 2048 if preset == "tiny" else 50304)
    )
    for r in rows:
        T = r["tokens_per_step"] / max(1, 2 * r["micro_batch_pairs"])
        flops = (6 * n_params + 12 * n_layer * n_embd * T) * r["tokens_per_s"]
        dtype = "bfloat16" if r["precision"] == "bf16" else "float32"
        out["summary"].append(
            _summary(
                "train",
                r["variant"],
                r["tokens_per_s"],
                "tok/s",
                preset=preset,
                speedup=r.get("speedup_vs_naive"),
                peak_MB=r["peak_MB"],
                peak_fraction=flops / peaks[dtype],
                precision=r["precision"],
                memory_vs_naive=r.get("memory_vs_naive"),
            )
        )
    # Answers of L tokens after prompts of L/2, up to what the preset's context holds.
    lengths = {"tiny": (32, 64, 128), "gpt2-124m": (64, 128, 256, 512)}[preset]
    lengths = lengths[:2] if quick else lengths
    for L in lengths:
        for r in run_train_bench(
            preset, rounds=1, steps=1, answer=(L, L), prompt=(L // 2, L // 2), verbose=False
        ):
            out["scaling"].append(
                dict(
                    phase="train",
                    impl=r["variant"],
                    dtype=r["precision"],
                    x="answer_tokens",
                    x_value=L,
                    rate=r["tokens_per_s"],
                    unit="tok/s",
                    peak_MB=r["peak_MB"],
                )
            )


def bench_judge(preset, quick, peaks, peers, out):
    from fastdpo.bench.judge import run_judge_bench

    # Pairs/min only means something on a policy that can answer: the demo's SFT model if it exists.
    mining_ckpt = out["settings"].get("mining_ckpt")
    if mining_ckpt is None and Path("runs/demo/sft/final/config.json").is_file():
        mining_ckpt = "runs/demo/sft/final"
    out["settings"]["mining_ckpt_used"] = mining_ckpt

    rows = run_judge_bench(
        concurrencies=(1, 8, 32),
        n_requests=32 if quick else 64,
        n_prompts=16 if quick else 64,
        mining_ckpt=mining_ckpt,
        server_threads=1,
    )
    out["raw"]["judge"] = rows
    base = next((r["items_per_s"] for r in rows if r.get("concurrency") == 1), None)
    for r in rows:
        if "concurrency" in r:
            out["summary"].append(
                _summary(
                    "judge",
                    f"concurrency {r['concurrency']}",
                    r["items_per_s"],
                    "req/s",
                    preset="tiny",
                    speedup=(r["items_per_s"] / base) if base else None,
                )
            )
        else:
            out["summary"].append(
                _summary(
                    "judge",
                    f"mining ({r.get('judge', r.get('name'))})",
                    r.get("pairs_per_min"),
                    "pairs/min",
                    preset="tiny",
                    prompts_per_s=r.get("prompts_per_s"),
                )
            )


def bench_eval(preset, quick, peaks, peers, out):
    """Prompts/s of a full position-swapped evaluation (two models answer, every pair judged twice)."""
    from fastdpo.bench.kernels import measure
    from fastdpo.generation.evaluate import evaluate
    from fastdpo.generation.judge import ProgrammaticJudge
    from fastdpo.generation.sampler import sample, sample_reforward
    from fastdpo.models.gpt import GPT, config_from_preset
    from fastdpo.models.tokenizer import Tokenizer

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    tok = Tokenizer.train([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, vocab_size=300)
    torch.manual_seed(0)
    cfg = config_from_preset(preset, vocab_size=tok.vocab_size)
    a, b = GPT(cfg).eval(), GPT(cfg).eval()
    n = 4 if quick else 32
    prompts = [f"Reverse the words: {' '.join(words[i % 7 : i % 7 + 3])}" for i in range(n)]
    judge = ProgrammaticJudge(lambda instruction, response: 1 + len(response) % 10, name="length-mod")
    max_new = 16 if quick else 64
    res = {}
    for name, sampler in (("fast", sample), ("oracle", sample_reforward)):
        dt, peak = measure(
            lambda sampler=sampler: evaluate(
                a,
                b,
                tok,
                prompts,
                judge,
                max_new_tokens=max_new,
                batch_size=n,
                progress=False,
                sampler=sampler,
            )
        )
        res[name] = (n / dt, peak)
    n_params = a.num_params()
    for name, (rate, peak) in res.items():
        out["summary"].append(
            _summary(
                "eval",
                name,
                rate,
                "prompts/s",
                preset=preset,
                speedup=(rate / res["oracle"][0]) if name == "fast" else None,
                peak_MB=peak,
                peak_fraction=2 * n_params * rate * 2 * max_new / peaks["float32"],
                max_new_tokens=max_new,
                note="upper bound on tokens: answers may stop early at <|end|>",
            )
        )


def bench_mining_phase(preset, quick, peaks, peers, out):
    from fastdpo.bench.mining_backends import bench_mining_backends

    s = out["settings"]
    rows = bench_mining_backends(s.get("mining_ckpt"), sampler_url=s.get("sampler_url"),
                                 sampler_model=s.get("sampler_model"), n_prompts=32 if quick else 64)
    out["raw"]["mining"] = rows
    for r in rows:
        if "skipped" in r:
            out["errors"][f"mining {r['backend']}"] = f"skipped: {r['skipped']}"
            continue
        out["summary"].append(_summary("mining", r["backend"], r["pairs_per_min"], "pairs/min", preset="tiny",
                                       speedup=r.get("vs_builtin_prompts"),
                                       prompts_per_min=r["prompts_per_min"]))


def bench_kernels(preset, quick, peaks, peers, out):
    from fastdpo.bench.kernels import run_kernel_bench

    rows = run_kernel_bench(quick=quick)
    out["raw"]["kernels"] = rows
    for r in rows:
        if r["op"] == "aot" or r["impl"] == "oracle":
            continue
        out["summary"].append(
            _summary(
                "kernels",
                f"{r['op']} {r['impl']}",
                1.0 / r["seconds"],
                "calls/s",
                preset="x".join(map(str, r["shape"])),
                speedup=r["speedup_vs_oracle"],
                peak_MB=r["peak_extra_MB"],
                dtype=r["dtype"],
                mem_vs_oracle=r.get("mem_vs_oracle"),
            )
        )


def bench_peers(preset, quick, peaks, peers, out):
    from fastdpo.bench.peers import run_peer_bench

    rows = run_peer_bench(preset, quick=quick)
    out["raw"]["peers"] = rows
    for r in rows:
        out["summary"].append(
            _summary(
                "peers",
                r["impl"],
                r["rate"],
                r["unit"],
                preset=preset,
                speedup=r.get("speedup"),
                peak_MB=r.get("peak_MB"),
                **{k: v for k, v in r.items() if k not in ("impl", "rate", "unit", "speedup", "peak_MB")},
            )
        )


RUNNERS = {
    "sample": bench_sample,
    "judge": bench_judge,
    "train": bench_train,
    "eval": bench_eval,
    "kernels": bench_kernels,
    "peers": bench_peers,
    "mining": bench_mining_phase,
}


def run_bench(
    preset: str = "tiny",
    phases=DEFAULT_PHASES,
    quick: bool = False,
    out_dir: str | Path = "runs/bench",
    peers: bool = True,
    threads: int | None = None,
    mining_ckpt: str | Path | None = None,
    sampler_url: str | None = None,
    sampler_model: str | None = None,
) -> dict:
    """Run the phases, print the table, write ``bench.json`` and ``bench.png`` under ``out_dir``."""
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise ValueError(f"unknown bench phases {unknown}; choose from {list(PHASES)}")
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"measuring the matmul peak on {device} ...", flush=True)
    peaks = matmul_peaks(device, quick=quick)
    out = {
        "machine": {
            "device": device,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "matmul_peak_flops": peaks,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "not measured (no CUDA device)",
        },
        "preset": preset,
        "quick": quick,
        "phases": list(phases),
        "summary": [],
        "scaling": [],
        "raw": {},
        "errors": {},
        "settings": {"mining_ckpt": None if mining_ckpt is None else str(mining_ckpt),
                     "sampler_url": sampler_url, "sampler_model": sampler_model},
    }
    for phase in phases:
        if phase == "peers" and not peers:
            continue
        print(f"\n== {phase} ==", flush=True)
        ts = time.time()
        try:
            RUNNERS[phase](preset, quick, peaks, peers, out)
        except ImportError as e:  # a peer or optional dependency is missing: say so, keep going
            out["errors"][phase] = f"skipped: {e}"
            print(f"  {phase}: skipped ({e})", flush=True)
        out.setdefault("phase_seconds", {})[phase] = round(time.time() - ts, 1)
    out["seconds"] = round(time.time() - t0, 1)
    (out_dir / "bench.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print("\n" + format_table(out))
    png = plot(out, out_dir / "bench.png")
    print(f"\nwrote {out_dir / 'bench.json'}" + (f" and {png}" if png else ""))
    return out


def format_table(out: dict) -> str:
    m = out["machine"]
    lines = [
        f"fastdpo bench — {out['preset']} preset on {m['device']} ({m['cpu']}, {m['threads']} threads); "
        f"matmul peak {m['matmul_peak_flops']['float32'] / 1e9:.0f} GFLOP/s fp32, "
        f"{m['matmul_peak_flops']['bfloat16'] / 1e9:.0f} GFLOP/s bf16",
        f"{'phase':<8} {'impl':<34} {'rate':>12} {'unit':<11} {'speedup':>8} {'peak MB':>9} {'% peak':>7}",
    ]
    for r in out["summary"]:
        rate = "n/a" if r["rate"] is None else f"{r['rate']:.1f}"
        sp = "" if r["speedup"] is None else f"x{r['speedup']:.2f}"
        mem = "" if r["peak_MB"] is None else f"{r['peak_MB']:.0f}"
        pf = "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}%"
        impl = r["impl"] + (f" {r['detail']['dtype']}" if "dtype" in r["detail"] else "")
        lines.append(f"{r['phase']:<8} {impl:<34} {rate:>12} {r['unit']:<11} {sp:>8} {mem:>9} {pf:>7}")
    if m["device"] == "cpu":
        lines.append("GPU figures: not measured (no CUDA device here); the Triton paths run only on CUDA.")
    for phase, err in out["errors"].items():
        lines.append(f"{phase}: {err}")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> Path | None:
    """Speed-ups per phase, and the scaling curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    sp = [r for r in out["summary"] if r["speedup"] is not None]
    ax1.barh([f"{r['phase']}: {r['impl']}" for r in sp], [r["speedup"] for r in sp], color="tab:blue")
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_xlabel("speed-up vs oracle (x, log scale)")
    ax1.set_title("fast path vs naive oracle")
    for ax, phase, xlabel in ((ax2, "sample", "max_new_tokens"), (ax3, "train", "answer tokens")):
        series: dict = {}
        for r in out["scaling"]:
            if r["phase"] == phase:
                series.setdefault(f"{r['impl']} {r['dtype']}", []).append((r["x_value"], r["rate"]))
        for name, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel(xlabel)
        units = {r["unit"] for r in out["scaling"] if r["phase"] == phase}
        ax.set_ylabel(units.pop() if len(units) == 1 else "")
        ax.set_title(f"{phase} scaling")
        if series:
            ax.legend(fontsize=7)
            ax.set_yscale("log")
    fig.suptitle(f"fastdpo bench ({out['preset']}, {out['machine']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
