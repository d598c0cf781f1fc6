"""``fastdpo bench``: every phase of the preference loop, fastdpo vs the naive oracle and vs its
peers, on equal work, in one run.

Phases (each a module of its own, callable alone with ``python -m fastdpo.bench.<phase>``):

- ``sample``  KV-cached sampler vs the re-forward oracle and vs transformers' ``generate``, each
              pair on the same prompts and new tokens, timed end to end (``fastdpo.bench.sampler``);
- ``judge``   OpenAIJudge against a local ``fastdpo serve``: requests/s at concurrency 1/8/32, and
              pairs mined per minute end to end, one row per sampler backend (``fastdpo.bench.judge``);
- ``train``   DPO steps: fused log-prob kernels + cached reference log-probs vs naive log-probs +
              the reference model every step, per step and end to end (``fastdpo.bench.train``);
- ``eval``    position-swapped evaluation, prompts/s, with the fast sampler vs the oracle sampler;
- ``kernels`` the fused log-prob ops vs the oracle and torch's ``linear_cross_entropy``, TFLOP/s and
              % of the device's bf16 peak, and the sm_80/89/90 AOT report (``fastdpo.bench.kernels``);
- ``mining``  pairs/min per generation backend (the built-in sampler, an OpenAI-compatible server:
              ``fastdpo serve`` here or ``--sampler-url``, in-process vLLM) at equal prompts, K and
              lengths, the backends taking turns (``fastdpo.bench.mining_backends``);
- ``peers``   TRL ``DPOTrainer`` (``precompute_ref_log_probs``, with and without Liger) and Liger's
              fused DPO loss (compiled and not) on the same work (``fastdpo.bench.peers``).
- ``packing`` padded vs padding-free packed DPO steps (``train.packing``) on the same pairs and
              micro-batches, tokens/s, on demo-like and wide-spread pairs (``fastdpo.bench.packing``).

Every phase runs on ``--device`` (``auto``: CUDA when present); each row names its device, and
``% peak`` divides model FLOP/s by that device's peak in the row's dtype (``bench.peak``). Output:
a table, ``bench.json`` (rows, comparisons, machine, versions, command line, git revision, load
average before and after), ``bench.png`` (fastdpo's speed-up over each named baseline) and
``table.md`` (the README's table for this device). ``--full`` adds the long runs: the oracle
sampler on the headline workload (hours at 124M on a CPU), every kernel case, the train phase's
length scaling. The module is long because it drives every phase, records the machine and draws
the summary figure.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastdpo.bench.peak import matmul_peaks, resolve_device
from fastdpo.errors import ConfigError

PHASES = ("sample", "judge", "train", "eval", "kernels", "peers", "mining", "packing")
DEFAULT_PHASES = PHASES


def _row(phase, impl, rate, unit, *, preset, device, peak_MB=None, peak_fraction=None, **detail):
    return dict(
        phase=phase,
        impl=impl,
        preset=preset,
        device=device,
        rate=rate,
        unit=unit,
        peak_MB=peak_MB,
        peak_fraction=peak_fraction,
        detail=detail,
    )


def _compare(out, phase, fast, baseline, speedup, unit, **detail):
    """fastdpo's ``fast`` is ``speedup`` times faster than ``baseline`` (ratio of rates in ``unit``,
    or of times), measured on the same work."""
    if speedup is not None:
        out["comparisons"].append(
            dict(phase=phase, fast=fast, baseline=baseline, speedup=speedup, unit=unit, detail=detail)
        )


def _model_params(preset: str, vocab: int | None) -> tuple[int, int, int]:
    from fastdpo.models.gpt import GPT, config_from_preset

    cfg = config_from_preset(preset, **({} if vocab is None else {"vocab_size": vocab}))
    with torch.device("meta"):
        n = GPT(cfg).num_params()
    return n, cfg.n_layer, cfg.n_embd


def bench_sample(ctx, out):
    from fastdpo.bench.sampler import run_sampler_bench

    preset, dev = ctx["preset"], ctx["device"]
    dtypes = ("float32", "bfloat16") if preset == "tiny" or ctx["full"] else ("bfloat16",)
    rows = run_sampler_bench(
        preset, dtypes, full=ctx["full"], quick=ctx["quick"], hf=ctx["peers"], device=dev, verbose=True
    )
    out["raw"]["sample"] = rows
    n_params, _, _ = _model_params(preset, 2048 if preset == "tiny" else None)
    for r in rows:
        lo, hi = r["prompt_tokens"]
        work = f"{r['rows']} rows x {r['max_new_tokens']} new, prompts {lo}-{hi}"
        name = {
            "fast": "fastdpo sample",
            "oracle": "oracle sample_reforward",
            "hf_generate": "transformers generate",
        }[r["impl"]]
        out["summary"].append(
            _row(
                "sample",
                f"{name} [{r['comparison']} workload]",
                r["tokens_per_s"],
                "new tok/s",
                preset=preset,
                device=r["device"],
                peak_MB=r["peak_MB"],
                peak_fraction=2 * n_params * r["tokens_per_s"] / ctx["peaks"][r["dtype"]],
                dtype=r["dtype"],
                workload=work,
                method=r["method"],
            )
        )
        if "fast_speedup" in r:
            _compare(
                out,
                "sample",
                f"fastdpo sample {r['dtype']}",
                f"{name} ({work})",
                r["fast_speedup"],
                "new tok/s",
            )


def bench_train(ctx, out):
    from fastdpo.bench.train import run_train_bench

    preset = ctx["preset"]
    rows = run_train_bench(
        preset,
        rounds=2 if ctx["quick"] else 3,
        steps=2 if preset == "tiny" else 1,
        device=ctx["device"],
        **({"micro_batch_size": 2, "prompt": (8, 16), "answer": (8, 24)} if ctx["quick"] else {}),
    )
    out["raw"]["train"] = rows
    n_params, n_layer, n_embd = _model_params(preset, rows[0]["vocab_size"])
    by = {r["variant"]: r for r in rows}
    for r in rows:
        T = r["tokens_per_step"] / max(1, 2 * r["micro_batch_pairs"])
        flops = (6 * n_params + 12 * n_layer * n_embd * T) * r["tokens_per_s"]
        dtype = "bfloat16" if r["precision"] == "bf16" else "float32"
        name = {"fast": "fastdpo step", "naive": "naive step (reference model every step)"}[r["variant"]]
        out["summary"].append(
            _row(
                "train",
                name,
                r["tokens_per_s"],
                "tok/s",
                preset=preset,
                device=r["device"],
                peak_MB=r["peak_MB"],
                peak_fraction=flops / ctx["peaks"][dtype],
                precision=r["precision"],
                step_peak_MB=r["step_peak_MB"],
                resident_MB=r["resident_MB"],
            )
        )
        out["summary"].append(
            _row(
                "train",
                name.replace("step", "end to end", 1),
                r["e2e_tokens_per_s"],
                "tok/s",
                preset=preset,
                device=r["device"],
                seconds=r["e2e_s"],
                steps=r["e2e_steps"],
                note="setup (fastdpo: its reference pass) + the first pass over the steps",
            )
        )
    if "fast" in by and "naive" in by:
        _compare(
            out,
            "train",
            "fastdpo step",
            "naive step",
            by["fast"]["speedup_vs_naive"],
            "tok/s",
            memory_ratio=by["fast"].get("memory_vs_naive"),
        )
        _compare(
            out, "train", "fastdpo end to end", "naive end to end", by["fast"]["e2e_speedup_vs_naive"], "time"
        )
    if ctx["full"]:
        lengths = (32, 64, 128) if preset == "tiny" else (64, 128, 256, 512)
        for L in lengths:
            for r in run_train_bench(
                preset,
                rounds=1,
                steps=1,
                answer=(L, L),
                prompt=(L // 2, L // 2),
                verbose=False,
                device=ctx["device"],
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


def bench_judge(ctx, out):
    from fastdpo.bench.judge import format_rows, run_judge_bench

    # Pairs/min only means something on a policy that can answer: the demo's SFT model if it exists.
    mining_ckpt = out["settings"].get("mining_ckpt")
    if mining_ckpt is None and Path("runs/demo/sft/final/config.json").is_file():
        mining_ckpt = "runs/demo/sft/final"
    out["settings"]["mining_ckpt_used"] = mining_ckpt
    quick = ctx["quick"]
    rows = run_judge_bench(
        concurrencies=(1, 8, 32),
        n_requests=32 if quick else 64,
        n_prompts=16 if quick else 64,
        mining_ckpt=mining_ckpt,
        server_threads=1,
        device=ctx["device"].type,
    )
    out["raw"]["judge"] = rows
    print(format_rows(rows), flush=True)
    for r in rows:
        if "concurrency" in r:
            out["summary"].append(
                _row(
                    "judge",
                    f"OpenAIJudge, concurrency {r['concurrency']}",
                    r["items_per_s"],
                    "req/s",
                    preset="2-layer served model",
                    device="cpu",
                    note="client + HTTP + batching against fastdpo serve; no baseline",
                )
            )
        else:
            out["summary"].append(
                _row(
                    "judge",
                    f"mining ({r['backend']} sampler, {r['name']})",
                    r["pairs_per_min"],
                    "pairs/min",
                    preset="tiny",
                    device=r["device"],
                    prompts_per_s=r["prompts_per_s"],
                    kept_pct=r["kept_pct"],
                    trained_model=r["trained_model"],
                    note=r["note"],
                )
            )


def bench_eval(ctx, out):
    """Prompts/s of a full position-swapped evaluation (two models answer, every pair judged twice)."""
    from fastdpo.bench.kernels import measure
    from fastdpo.generation.evaluate import evaluate
    from fastdpo.generation.judge import ProgrammaticJudge
    from fastdpo.generation.sampler import sample, sample_reforward
    from fastdpo.models.gpt import GPT, config_from_preset
    from fastdpo.models.tokenizer import Tokenizer

    preset, quick, dev = ctx["preset"], ctx["quick"], ctx["device"]
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    tok = Tokenizer.train([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, vocab_size=300)
    torch.manual_seed(0)
    cfg = config_from_preset(preset, vocab_size=tok.vocab_size)
    a, b = GPT(cfg).eval().to(dev), GPT(cfg).eval().to(dev)
    n = 4 if quick else (32 if preset == "tiny" else 8)
    prompts = [f"Reverse the words: {' '.join(words[i % 7 : i % 7 + 3])}" for i in range(n)]
    judge = ProgrammaticJudge(lambda instruction, response: 1 + len(response) % 10, name="length-mod")
    max_new = 16 if quick else (64 if preset == "tiny" else 32)
    res = {}
    for name, sampler in (("fast", sample), ("oracle", sample_reforward)):
        def run(k=n, sampler=sampler):
            return evaluate(a, b, tok, prompts[:k], judge, max_new_tokens=max_new, batch_size=n,
                            progress=False, sampler=sampler)

        run(2)  # warm-up, untimed
        dt, peak = measure(run, dev)
        res[name] = (n / dt, peak)
        print(f"  eval {name:<7} {n} prompts x 2 models, {max_new} new tokens: {n / dt:8.2f} prompts/s",
              flush=True)
    n_params = a.num_params()
    names = {"fast": "fastdpo sampler", "oracle": "oracle sampler (sample_reforward)"}
    for name, (rate, peak) in res.items():
        out["summary"].append(
            _row(
                "eval",
                names[name],
                rate,
                "prompts/s",
                preset=preset,
                device=dev.type,
                peak_MB=peak,
                peak_fraction=2 * n_params * rate * 2 * max_new / ctx["peaks"]["float32"],
                max_new_tokens=max_new,
                prompts=n,
                note="upper bound on tokens: answers may stop early at <|end|>",
            )
        )
    _compare(
        out,
        "eval",
        names["fast"],
        names["oracle"],
        res["fast"][0] / res["oracle"][0],
        "prompts/s",
        prompts=n,
        max_new_tokens=max_new,
    )


_FAST_KERNELS = {"fused", "fused_inplace", "matmul+fused", "linear_fused", "grad_in_forward"}


def bench_mining_phase(ctx, out):
    from fastdpo.bench.mining_backends import bench_mining_backends, format_rows

    s = out["settings"]
    device = ctx["device"].type
    rows = bench_mining_backends(s.get("mining_ckpt"), sampler_url=s.get("sampler_url"),
                                 sampler_model=s.get("sampler_model"), n_prompts=32 if ctx["quick"] else 64,
                                 device=device)
    out["raw"]["mining"] = rows
    print(format_rows(rows), flush=True)
    for r in rows:
        if "skipped" in r:
            out["errors"][f"mining {r['backend']}"] = f"skipped: {r['skipped']}"
            continue
        out["summary"].append(_row("mining", f"{r['backend']} sampler", r["pairs_per_min"], "pairs/min",
                                   preset="tiny", device=device, prompts_per_min=r["prompts_per_min"],
                                   vs_builtin_prompts=r.get("vs_builtin_prompts"),
                                   vs_builtin_pairs=r.get("vs_builtin_pairs"),
                                   note="equal prompts, K, lengths and judge; median of interleaved runs"))


def bench_kernels(ctx, out):
    from fastdpo.bench.kernels import run_kernel_bench

    # the kernel cases have the 124M shape's vocabulary; the tiny preset runs them at small shapes
    quick = ctx["quick"] or (ctx["preset"] == "tiny" and not ctx["full"])
    # two timed rounds after the warm-up call keep the 124M cases within minutes on a small CPU
    rows = run_kernel_bench(quick=quick, device=ctx["device"].type, headline=not ctx["full"],
                            reps=None if ctx["full"] else 2, aot=True)
    out["raw"]["kernels"] = rows
    for r in rows:
        if r["op"] == "aot":
            continue
        case = f"{r['op']} {'x'.join(map(str, r['shape']))} {r['dtype']}" + (
            f" {r['layout']}" if "layout" in r else ""
        )
        out["summary"].append(
            _row(
                "kernels",
                f"{r['impl']}: {case}",
                1.0 / r["seconds"],
                "fwd+bwd/s",
                preset="x".join(map(str, r["shape"])),
                device=r["device"],
                peak_MB=r["peak_extra_MB"],
                peak_fraction=r.get("peak_fraction"),
                dtype=r["dtype"],
                tflops=r.get("tflops"),
                bf16_peak_flops=r.get("bf16_peak_flops"),
                peak_source=r.get("peak_source"),
            )
        )
        if r["impl"] in _FAST_KERNELS:
            _compare(
                out,
                "kernels",
                f"{r['impl']} ({case})",
                r["baseline"],
                r["speedup"],
                "time",
                memory_ratio=r.get("mem_vs_baseline"),
            )
        if r["impl"] == "linear_fused":
            lce = next(
                (
                    x
                    for x in rows
                    if x["op"] == r["op"]
                    and x["shape"] == r["shape"]
                    and x["dtype"] == r["dtype"]
                    and x["impl"] == "torch_lce"
                ),
                None,
            )
            if lce:
                _compare(
                    out,
                    "kernels",
                    f"linear_fused ({case})",
                    "torch linear_cross_entropy (same active rows)",
                    lce["seconds"] / r["seconds"],
                    "time",
                )
    aot = [r for r in rows if r["op"] == "aot"]
    out["settings"]["aot"] = aot


def bench_peers(ctx, out):
    from fastdpo.bench.peers import run_peer_bench

    rows = run_peer_bench(ctx["preset"], quick=ctx["quick"], device=ctx["device"].type)
    out["raw"]["peers"] = rows
    for r in rows:
        if r.get("rate") is None:
            out["errors"][f"peers: {r['impl']}"] = r.get("note", "skipped")
            continue
        out["summary"].append(
            _row(
                "peers",
                r["impl"],
                r["rate"],
                r["unit"],
                preset=ctx["preset"],
                device=r.get("device", ctx["device"].type),
                peak_MB=r.get("peak_MB"),
                **{
                    k: v
                    for k, v in r.items()
                    if k not in ("impl", "rate", "unit", "peak_MB", "device", "speedup")
                },
            )
        )
        if r.get("speedup") is not None:
            fast = (
                "fastdpo fused DPO loss"
                if r["unit"] == "fwd+bwd/s"
                else "fastdpo trainer " + ("end to end" if "end to end" in r["impl"] else "step")
            )
            _compare(
                out,
                "peers",
                fast,
                r["impl"],
                r["speedup"],
                r["unit"],
                memory_ratio=(1 / r["memory_vs_fastdpo"]) if r.get("memory_vs_fastdpo") else None,
            )


def bench_packing(ctx, out):
    from fastdpo.bench.packing import packing_phase

    packing_phase(ctx, out, _row, _compare)


RUNNERS = {
    "sample": bench_sample,
    "judge": bench_judge,
    "train": bench_train,
    "eval": bench_eval,
    "kernels": bench_kernels,
    "peers": bench_peers,
    "mining": bench_mining_phase,
    "packing": bench_packing,
}


# --------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("fastdpo", "torch", "triton", "transformers", "trl", "liger-kernel", "peft", "datasets"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _git() -> dict:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"revision": None, "dirty": None}
    if rev.returncode != 0:
        return {"revision": None, "dirty": None}
    return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def provenance(module: str, argv: list[str] | None,
               load_before: tuple[float, float, float] | None = None) -> dict:
    """Where a standalone benchmark's JSON came from: its command line (``python -m module`` with
    ``argv``, or this process's arguments when None), CPU, threads, versions, git revision (and
    whether the tree was dirty), load average before and after."""
    command = shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
    return {"command": command, "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu_half_flash_attention": _cpu_flash(),
            "versions": _versions(), "git": _git(),
            "load_average": {"before": load_before, "after": os.getloadavg()}}


def _cpu_flash() -> bool:
    """Whether the sampler's half-precision attention runs torch's CPU flash kernel (CPUs with AMX)
    rather than matmuls: which one ran changes the sampler's figures."""
    from fastdpo.models.decode_cache import CPU_HALF_FLASH
    return CPU_HALF_FLASH


def machine(device: torch.device, peaks: dict) -> dict:
    return {
        "device": device.type,
        "device_name": peaks["device_name"],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "platform": platform.platform(),
        "matmul_peak_flops": {k: peaks[k] for k in ("float32", "bfloat16")},
        "peak_source": peaks["source"],
        "gpu": peaks["device_name"] if device.type == "cuda" else "not measured (no CUDA device used)",
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
    device: str = "auto",
    full: bool = False,
    argv: list[str] | None = None,
) -> dict:
    """Run the phases, print the table, write ``bench.json``, ``bench.png`` and ``table.md`` under
    ``out_dir``."""
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise ConfigError(f"unknown bench phases {unknown}; choose from {list(PHASES)}")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load_before = _loadavg()
    print(f"measuring the matmul peak on {dev} ...", flush=True)
    peaks = matmul_peaks(dev, quick=quick)
    out = {
        "machine": machine(dev, peaks),
        "versions": _versions(),
        "command": shlex.join(argv) if argv is not None else shlex.join(sys.argv),
        "argv": sys.argv,
        "git": _git(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "load_average": {"before": load_before},
        "preset": preset,
        "quick": quick,
        "full": full,
        "phases": list(phases),
        "summary": [],
        "comparisons": [],
        "scaling": [],
        "raw": {},
        "errors": {},
        "settings": {"mining_ckpt": None if mining_ckpt is None else str(mining_ckpt),
                     "sampler_url": sampler_url, "sampler_model": sampler_model},
    }
    ctx = {"preset": preset, "quick": quick, "full": full, "device": dev, "peaks": peaks, "peers": peers}
    for phase in phases:
        if phase == "peers" and not peers:
            continue
        print(f"\n== {phase} ==", flush=True)
        ts = time.time()
        try:
            RUNNERS[phase](ctx, out)
        except ImportError as e:  # a peer or optional dependency is missing: say so, keep going
            out["errors"][phase] = f"skipped: {e}"
            print(f"  {phase}: skipped ({e})", flush=True)
        out.setdefault("phase_seconds", {})[phase] = round(time.time() - ts, 1)
    out["seconds"] = round(time.time() - t0, 1)
    out["load_average"]["after"] = _loadavg()
    (out_dir / "bench.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (out_dir / "table.md").write_text(markdown_table(out, out_dir / "bench.json") + "\n")
    print("\n" + format_table(out))
    png = plot(out, out_dir / "bench.png")
    print(f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'table.md'}" + (f" and {png}" if png else ""))
    return out


# --------------------------------------------------------------------------- output


def _fmt(rate: float) -> str:
    """One decimal, or three significant digits for slow rates (a 124M kernel call: 0.0682/s)."""
    return f"{rate:,.1f}" if rate >= 10 else f"{rate:.3g}"


def format_table(out: dict) -> str:
    m, load = out["machine"], out["load_average"]
    peak = m["matmul_peak_flops"]
    lines = [
        f"fastdpo bench — {out['preset']} preset on {m['device']} ({m['device_name']}; cpu {m['cpu']}, "
        f"{m['threads']} threads); load average {load['before']} -> {load['after']}",
        f"% peak = model FLOP/s / peak of this device: {peak['float32'] / 1e9:.0f} GFLOP/s fp32, "
        f"{peak['bfloat16'] / 1e9:.0f} GFLOP/s bf16 ({m['peak_source']['bfloat16']})",
        f"{'phase':<8} {'implementation':<72} {'rate':>10} {'unit':<10} {'dev':<4} {'peak MB':>8} "
        f"{'% peak':>7}",
    ]
    for r in out["summary"]:
        rate = "n/a" if r["rate"] is None else _fmt(r["rate"])
        mem = "" if r["peak_MB"] is None else f"{r['peak_MB']:.0f}"
        pf = "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.2f}%"
        impl = r["impl"] + (
            f" {r['detail']['dtype']}" if "dtype" in r["detail"] and r["phase"] == "sample" else ""
        )
        lines.append(
            f"{r['phase']:<8} {impl[:72]:<72} {rate:>10} {r['unit']:<10} {r['device']:<4} {mem:>8} {pf:>7}"
        )
    lines.append("\nfastdpo's speed-up over each baseline (same work; ratio of rates, or of times):")
    for c in out["comparisons"]:
        mem = c["detail"].get("memory_ratio")
        mem = f"  memory x{mem:.2f}" if mem else ""
        lines.append(
            f"{c['phase']:<8} {c['fast'][:60]:<60} over {c['baseline'][:70]:<70} x{c['speedup']:7.2f}{mem}"
        )
    for r in out["summary"]:
        if r["detail"].get("note") and r["phase"] == "judge" and "mining" in r["impl"]:
            lines.append(f"{r['impl']}: {r['detail']['note']}")
        if r["detail"].get("liger_note") and "step" in r["impl"]:
            lines.append(f"{r['impl']}: {r['detail']['liger_note']}")
    if m["device"] == "cpu":
        lines.append("GPU figures: not measured (no CUDA device used); the Triton paths run only on CUDA.")
    for phase, err in out["errors"].items():
        lines.append(f"{phase}: {err}")
    return "\n".join(lines)


def markdown_table(out: dict, source: Path) -> str:
    """The README's table for this device: per phase fastdpo vs its baselines, the fused linear
    log-prob TFLOP/s and % of the device's bf16 peak, sampler tokens/s, DPO step tokens/s and peak memory."""
    m = out["machine"]
    lines = [
        f"{m['device_name']} ({m['device']}), {out['preset']} preset, `{out['command']}`, "
        f"git {str(out['git'].get('revision'))[:10]}; source: `{source}`",
        "",
        "| phase | fastdpo | baseline | fastdpo speed-up |",
        "|---|---|---|---|",
    ]
    for c in out["comparisons"]:
        lines.append(f"| {c['phase']} | {c['fast']} | {c['baseline']} | {c['speedup']:.2f}× |")
    lines += ["", "| measurement | rate | peak memory | % of device peak |", "|---|---|---|---|"]
    for r in out["summary"]:
        keep = (
            r["phase"] in ("sample", "train")
            or (r["phase"] == "peers" and "step" in r["impl"])
            or (r["phase"] == "kernels" and r["detail"].get("tflops") is not None)
        )
        if not keep or r["rate"] is None:
            continue
        rate = f"{_fmt(r['rate'])} {r['unit']}"
        if r["detail"].get("tflops") is not None:
            rate += f" ({r['detail']['tflops']:.3f} TFLOP/s)"
        mem = "" if r["peak_MB"] is None else f"{r['peak_MB']:,.0f} MB"
        pf = "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}%"
        lines.append(f"| {r['phase']}: {r['impl']} | {rate} | {mem} | {pf} |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> Path | None:
    """Left: fastdpo's speed-up over each named baseline. Right: peak memory of the DPO trainers."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = out["comparisons"]
    mems = [r for r in out["summary"] if r["peak_MB"] is not None and r["unit"] == "tok/s"]
    rows = max(len(comps), len(mems), 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(20, 0.55 * rows + 2), gridspec_kw={"width_ratios": [3, 2]})
    labels = ["\n".join(textwrap.wrap(f"{c['phase']}: {c['fast']} over {c['baseline']} ({c['unit']})", 90))
              for c in comps]
    bars = ax1.barh(range(len(comps)), [c["speedup"] for c in comps], color="tab:blue")
    ax1.bar_label(bars, labels=[f"x{c['speedup']:.2f}" for c in comps], fontsize=7, padding=2)
    ax1.set_yticks(range(len(comps)), labels, fontsize=6)
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_xscale("log")
    ax1.invert_yaxis()
    ax1.set_xlabel("x, log scale (> 1: fastdpo faster)")
    ax1.set_title("fastdpo speed-up over <named baseline>, same work", fontsize=10)
    bars = ax2.barh(range(len(mems)), [r["peak_MB"] for r in mems], color="tab:orange")
    ax2.bar_label(bars, labels=[f"{r['peak_MB']:,.0f}" for r in mems], fontsize=7, padding=2)
    names = ["\n".join(textwrap.wrap(f"{r['phase']}: {r['impl']}", 50)) for r in mems]
    ax2.set_yticks(range(len(mems)), names, fontsize=6)
    ax2.invert_yaxis()
    ax2.set_xlabel("MB (CPU: peak RSS above the start; CUDA: max_memory_allocated)")
    ax2.set_title("DPO training peak memory", fontsize=10)
    m = out["machine"]
    fig.suptitle(f"fastdpo bench ({out['preset']}, {m['device']}: {m['device_name']}, {m['threads']} "
                 f"threads, load average {out['load_average']['before']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
