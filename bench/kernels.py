"""Fused log-prob kernels vs the naive oracle (and torch's chunked linear cross-entropy), on CPU.

    python -m fastdpo.bench.kernels [--quick] [--reps N] [--threads N] [--json out.json]

Each case times forward + backward of every implementation *interleaved* in one process (the
machine is shared: absolute times swing, ratios measured side by side hold up) and reports
median time ratios against the oracle, with each implementation's spread (max - min) / median.

Threads and OpenMP: on a small CPU shared with other processes (2 cores, load average 5-8), libgomp's
default barrier *spins* before it sleeps. The chunked paths run hundreds of small parallel ops and
each one ends in a barrier whose spinning thread burns the core its descheduled partner (or another
process) needs; the oracle runs a handful of huge ops and barely notices. Measured, 8x512x32768 bf16
fwd+bwd, 2 threads: fused 8.2 s with OMP_WAIT_POLICY=ACTIVE, ~2.7-5.5 s with the default, 0.90 s with
PASSIVE (1 thread: 1.45 s); profiled at the default policy, ``amax`` 83 -> 551 ms and ``exp_``
54 -> 280 ms for the same work at 1 vs 2 threads. So this module sets OMP_WAIT_POLICY=PASSIVE
(unless already set) *before* importing torch, since libgomp reads it once when torch loads it; the
header line says whether that worked. ``--threads`` defaults to torch's own choice (all cores).

Peak memory: tracemalloc does not see torch's allocations, so this reads the kernel's own counter:
before each run the process' peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), glibc is
told to serve every allocation above 128 KB by mmap (returned to the OS on free, so RSS follows
live tensors instead of a heap high-water mark) and trimmed; after the run, ``VmHWM - VmRSS(before)``
is the peak *extra* resident memory of that forward + backward, including the gradients it returns.
The gradients are required outputs of every implementation (oracle included), so a second column
subtracts their size ("w/o grads": what the op allocates beyond its inputs and required outputs).
The in-place variant writes the logits gradient into the logits, so it returns no new tensor.
Without /proc (non-Linux) the memory columns are empty.

Finally every Triton kernel is compiled ahead of time for sm_89 (RTX 4090) and ptxas' register,
spill and shared-memory figures are printed: without a CUDA device the GPU path cannot be timed.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import time

# before torch (and with it libgomp) is loaded; a process that imported torch earlier keeps its policy
_OMP_POLICY_APPLIED = "torch" not in sys.modules or "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastdpo import kernels  # noqa: E402
from fastdpo.kernels import reference  # noqa: E402

_M_MMAP_THRESHOLD = -3
# Implementations timed in the first round only: torch's chunked linear cross-entropy with
# reduction="none" takes tens of seconds per call at the full shapes on a small CPU.
ONE_ROUND = {"torch_lce"}


def _omp_policy() -> str:
    if _OMP_POLICY_APPLIED:
        return os.environ["OMP_WAIT_POLICY"]
    return "default (torch was loaded before bench.kernels: export OMP_WAIT_POLICY=PASSIVE before start)"


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        return libc
    except OSError:
        return None


_LIBC = _libc()


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(fn) -> tuple[float, float | None]:
    """(seconds, peak extra resident MB) of one call of ``fn``; the result is dropped before return."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        before = None
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if before is not None else None
    del out
    return dt, (None if peak is None else (peak - before) / 1024)


def dpo_mask(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """A DPO-like batch: prompt, response, right padding (response ~ half the tokens)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(T // 8, T // 2, (1,), generator=g))
        end = int(torch.randint((6 * T) // 10, T + 1, (1,), generator=g))
        mask[b, start:end] = True
    return mask


# --------------------------------------------------------------------------- cases


def _seq_impls(B, T, V, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = dpo_mask(B, T)
    gout = torch.randn(B, generator=g)

    def run(f, **kw):
        def call():
            out = f(logits, ids, mask, **kw)
            return out, torch.autograd.grad(out, logits, gout)
        return call

    impls = {"oracle": run(reference.sequence_logprobs),
             "fused": run(kernels.sequence_logprobs, backend="torch"),
             "fused_inplace": run(kernels.sequence_logprobs, backend="torch", inplace_backward=True)}
    # in-place overwrites the logits with their gradient: run it last in each round, refill after
    refill = logits.detach().clone()

    def restore():
        with torch.no_grad():
            logits.copy_(refill)

    grads_mb = logits.numel() * logits.element_size() / 2**20
    info = {"logits_f32_MB": B * T * V * 4 / 2**20, "grads_MB": grads_mb,
            "response_frac": float(mask.float().mean())}
    return impls, restore, info


def _linear_impls(B, T, V, C, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, C, generator=g).requires_grad_()
    weight = (torch.randn(V, C, generator=g) / C**0.5).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = dpo_mask(B, T)
    gout = torch.randn(B, generator=g)
    amp = dtype == torch.bfloat16  # bf16 = the trainer's setting: float32 params under bf16 autocast

    def run(f):
        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = f()
            return out, torch.autograd.grad(out, (hidden, weight), gout)
        return call

    def matmul_fused():
        return kernels.sequence_logprobs(hidden @ weight.t(), ids, mask, backend="torch",
                                         inplace_backward=True)

    def torch_lce():
        # per-token -log p(next) of every position, then the same masked per-sequence sum
        nll = F.linear_cross_entropy(hidden[:, :-1].reshape(-1, C), weight, ids[:, 1:].reshape(-1),
                                     reduction="none", options=torch.nn.LinearCrossEntropyOptions())
        return -(nll.view(B, T - 1).float() * mask[:, 1:]).sum(-1)

    impls = {"oracle": run(lambda: reference.linear_sequence_logprobs(hidden, weight, ids, mask)),
             "matmul+fused": run(matmul_fused),
             "linear_fused": run(lambda: kernels.linear_sequence_logprobs(hidden, weight, ids, mask)),
             "torch_lce": run(torch_lce)}
    grads_mb = (hidden.numel() + weight.numel()) * 4 / 2**20
    return impls, None, {"logits_f32_MB": B * T * V * 4 / 2**20, "grads_MB": grads_mb,
                         "response_frac": float(mask.float().mean())}


def cases(quick: bool):
    if quick:
        shapes, C = [(2, 128, 4099)], 128
    else:
        shapes, C = [(8, 512, 32768), (8, 1024, 50304)], 768
    for B, T, V in shapes:
        for dt in (torch.float32, torch.bfloat16):
            yield "sequence_logprobs", (B, T, V), dt, lambda B=B, T=T, V=V, dt=dt: _seq_impls(B, T, V, dt)
    for B, T, V in shapes:
        for dt in (torch.float32, torch.bfloat16):
            yield ("linear_sequence_logprobs", (B, T, V, C), dt,
                   lambda B=B, T=T, V=V, dt=dt: _linear_impls(B, T, V, C, dt))


def run_kernel_bench(quick: bool = False, reps: int | None = None, aot: bool = True,
                     only: str | None = None) -> list[dict]:
    """One dict per (op, shape, dtype, implementation) plus one per AOT-compiled kernel."""
    results = []
    threads = torch.get_num_threads()
    for op, shape, dtype, build in cases(quick):
        if only and only not in op:
            continue
        impls, restore, info = build()
        n = reps if reps is not None else 3
        times = {k: [] for k in impls}
        peaks = {k: [] for k in impls}
        names = list(impls)
        for i in range(n):
            for name in names:
                if i and name in ONE_ROUND:
                    continue
                dt, peak = measure(impls[name])
                times[name].append(dt)
                peaks[name].append(peak)
                if name.endswith("inplace") and restore is not None:
                    restore()
        t_or = statistics.median(times["oracle"])
        p_or = max(peaks["oracle"]) if peaks["oracle"][0] is not None else None
        # what every implementation must return anyway; the in-place one returns the logits buffer
        required = {name: 0.0 if name.endswith("inplace") else info["grads_MB"] for name in names}
        po_wo = None if p_or is None else max(0.0, p_or - required["oracle"])
        rows = []
        for name in names:
            t = statistics.median(times[name])
            p = max(peaks[name]) if peaks[name][0] is not None else None
            row = {"op": op, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "impl": name,
                   "threads": threads, "omp_wait_policy": _omp_policy(), "reps": len(times[name]),
                   "seconds": t,
                   "spread": (max(times[name]) - min(times[name])) / t, "speedup_vs_oracle": t_or / t,
                   "peak_extra_MB": p, "mem_vs_oracle": (p / p_or) if (p is not None and p_or) else None,
                   "required_outputs_MB": required[name], **info}
            if p is not None:
                p_wo = max(0.0, p - required[name])
                row["peak_extra_wo_grads_MB"] = p_wo
                row["mem_wo_grads_vs_oracle"] = p_wo / po_wo if po_wo else None
                row["mem_vs_logits"] = p / info["logits_f32_MB"]
                row["mem_wo_grads_vs_logits"] = p_wo / info["logits_f32_MB"]
            if op.startswith("linear"):
                row["time_vs_matmul_fused"] = t / statistics.median(times["matmul+fused"])
            rows.append(row)
        results += rows
        print(format_rows(rows), flush=True)
        del impls, restore
    if aot:
        try:
            from fastdpo.kernels import aot as aot_mod

            for r in aot_mod.report(ccs=(80, 89, 90), dtypes=("float32", "bfloat16")):
                results.append({"op": "aot", **r})
        except Exception as e:  # no triton / no ptxas: say so in the output rather than fail the bench
            results.append({"op": "aot", "error": repr(e)})
    return results


def format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["op"] == "aot":
            continue
        mem = "n/a" if r["peak_extra_MB"] is None else f"{r['peak_extra_MB']:6.0f}"
        extra = ""
        if r.get("mem_vs_oracle") is not None:
            wo = r.get("mem_wo_grads_vs_oracle")
            wo = "-" if wo is None else f"{wo:5.3f}"
            extra = f"  mem/oracle {r['mem_vs_oracle']:5.3f} (w/o grads {wo})"
        if r["op"].startswith("linear") and "mem_vs_logits" in r:
            extra += (f"  mem/f32-logits {r['mem_vs_logits']:5.3f} "
                      f"(w/o grads {r['mem_wo_grads_vs_logits']:5.3f})"
                      f"  t/(mm+fused) {r['time_vs_matmul_fused']:.2f}")
        lines.append(f"{r['op'][:6]:<6} {str(tuple(r['shape'])):<22} {r['dtype']:<8} {r['impl']:<13} "
                     f"{r['seconds']:7.3f}s ±{r['spread'] * 100:3.0f}%  x{r['speedup_vs_oracle']:5.2f}  "
                     f"peak+ {mem} MB{extra}  (resp {r['response_frac']:.2f}, reps {r['reps']})")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, seconds instead of minutes")
    ap.add_argument("--reps", type=int, default=None, help="rounds per case (default 3; torch_lce: 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice; see the module doc)")
    ap.add_argument("--only", default=None, help="run ops whose name contains this")
    ap.add_argument("--no-aot", action="store_true")
    ap.add_argument("--json", default="bench_kernels.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, OMP_WAIT_POLICY={_omp_policy()}\n"
          "x = oracle time / impl time (median over rounds, interleaved), "
          "± = (max - min) / median of the impl's own times\n"
          "peak+ = peak extra resident memory of one fwd+bwd (VmHWM reset per run, mmap'd allocations), "
          "including returned gradients; 'w/o grads' subtracts the returned gradients (required outputs "
          "of every implementation; none for in-place); f32-logits = B*T*V*4 bytes")
    rows = run_kernel_bench(args.quick, args.reps, not args.no_aot, args.only)
    aot_rows = [r for r in rows if r["op"] == "aot"]
    if aot_rows and "error" not in aot_rows[0]:
        from fastdpo.kernels.aot import format_table

        print("\nAOT compile for sm_80/89/90 (ptxas -v):\n" + format_table(aot_rows))
    elif aot_rows:
        print("\nAOT compile skipped:", aot_rows[0]["error"])
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nwrote {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()
