"""Fused log-prob kernels vs the naive oracle (and torch's chunked linear cross-entropy).

    python -m fastdpo.bench.kernels [--device auto|cpu|cuda] [--quick] [--reps N] [--threads N]
                                    [--json out.json]

Each case times forward + backward of every implementation *interleaved* in one process (the
machine is shared: absolute times swing, ratios measured side by side hold up) and reports
median time ratios against the case's baseline (the oracle; for the pair-loss case the recompute
op the trainer calls today), with each implementation's spread (max - min) / median. On CPU the
same ratio of process CPU seconds is shown too: it does not count time the process waited for a
core, so it holds up better than wall time on a busy machine (it does count memory stalls).

``--device``: ``auto`` is CUDA when available. Every row states its device; ``backend="auto"``
makes the fused ops run their Triton kernels on CUDA and the torch paths on CPU. Linear and
pair-loss rows also report achieved TFLOP/s of *useful* work (3 lm_head GEMMs over the rows
that predict a response token: logits, grad_hidden, grad_weight; the same count for every
implementation, so the column ranks them like the time does) and its fraction of the device's
measured bf16 matmul peak (``bench.peak``).

Cases: ``sequence_logprobs`` (fused log-softmax on given logits), ``linear_sequence_logprobs``
(fused lm_head vs matmul + fused logits op vs oracle), ``linear_pair_loss`` (gradient in forward
vs the recompute op + the same sigmoid DPO loss with cached reference log-probs, both layouts,
8 x 1024 rows, C = 768, V = 50304, bf16 autocast, half the rows predicting response tokens).

Threads and OpenMP: on a small CPU shared with other processes (2 cores, load average 5-8), libgomp's
default barrier *spins* before it sleeps. The chunked paths run hundreds of small parallel ops and
each one ends in a barrier whose spinning thread burns the core its descheduled partner (or another
process) needs; the oracle runs a handful of huge ops and barely notices. Measured, 8x512x32768 bf16
fwd+bwd, 2 threads: fused 8.2 s with OMP_WAIT_POLICY=ACTIVE, ~2.7-5.5 s with the default, 0.90 s with
PASSIVE (1 thread: 1.45 s); profiled at the default policy, ``amax`` 83 -> 551 ms and ``exp_``
54 -> 280 ms for the same work at 1 vs 2 threads. So this module sets OMP_WAIT_POLICY=PASSIVE
(unless already set) *before* importing torch, since libgomp reads it once when torch loads it; the
header line says whether that worked. ``--threads`` defaults to torch's own choice (all cores).

Peak memory on CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the run.
On CPU tracemalloc does not see torch's allocations, so this reads the kernel's own counter:
before each run the process' peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), glibc is
told to serve every allocation above 128 KB by mmap (returned to the OS on free, so RSS follows
live tensors instead of a heap high-water mark) and trimmed; after the run, ``VmHWM - VmRSS(before)``
is the peak *extra* resident memory of that forward + backward, including the gradients it returns.
The gradients are required outputs of every implementation (oracle included), so a second column
subtracts their size ("w/o grads": what the op allocates beyond its inputs and required outputs).
The in-place variant writes the logits gradient into the logits, so it returns no new tensor.
Without /proc (non-Linux) the memory columns are empty.

Finally every Triton kernel is compiled ahead of time for sm_80/89/90 and ptxas' register,
spill and shared-memory figures are printed (the static performance signal where no GPU is at hand).
The module is long because the three cases (logits op, fused linear op, pair-loss op) share its
timer, memory probe and table.
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
from fastdpo.bench.peak import datasheet_bf16_peak, device_name, measure_matmul_peak, resolve_device  # noqa: E402,F401
from fastdpo.kernels import reference  # noqa: E402

_M_MMAP_THRESHOLD = -3
# Implementations timed in the first round only (after their warm-up call): torch's chunked
# linear cross-entropy with reduction="none" takes seconds per call at the full shapes on a small CPU.
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


def measure(fn, device: torch.device | str = "cpu") -> tuple[float, float | None]:
    """(seconds, peak extra MB) of one call of ``fn``; the result is dropped before return.
    CUDA: synchronized wall time and allocator peak; CPU: resident memory (see the module doc)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        del out
        return dt, peak
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


def _seq_impls(B, T, V, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(device, dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = dpo_mask(B, T).to(device)
    gout = torch.randn(B, generator=g).to(device)

    def run(f, **kw):
        def call():
            out = f(logits, ids, mask, **kw)
            return out, torch.autograd.grad(out, logits, gout)
        return call

    impls = {"oracle": run(reference.sequence_logprobs),
             "fused": run(kernels.sequence_logprobs),
             "fused_inplace": run(kernels.sequence_logprobs, inplace_backward=True)}
    # in-place overwrites the logits with their gradient: run it last in each round, refill after
    refill = logits.detach().clone()

    def restore():
        with torch.no_grad():
            logits.copy_(refill)

    grads_mb = logits.numel() * logits.element_size() / 2**20
    info = {"logits_f32_MB": B * T * V * 4 / 2**20, "grads_MB": grads_mb,
            "response_frac": float(mask.float().mean())}
    return impls, restore, info


def _linear_impls(B, T, V, C, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, C, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, C, generator=g) / C**0.5).to(device).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = dpo_mask(B, T).to(device)
    gout = torch.randn(B, generator=g).to(device)
    amp = dtype == torch.bfloat16  # bf16 = the trainer's setting: float32 params under bf16 autocast
    dev = torch.device(device).type

    def run(f):
        def call():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                out = f()
            return out, torch.autograd.grad(out, (hidden, weight), gout)
        return call

    def matmul_fused():
        return kernels.sequence_logprobs(hidden @ weight.t(), ids, mask, inplace_backward=True)

    # torch's linear cross-entropy on the same active rows the fused path computes: the positions
    # whose next token is a response token, selected once outside the timed call (as the fused
    # ops' row compaction is part of theirs, this gives torch the smaller share of the work).
    active = mask[:, 1:].reshape(-1).nonzero().squeeze(1)
    row_of = torch.arange(B, device=active.device).repeat_interleave(T - 1)[active]
    targets = ids[:, 1:].reshape(-1)[active]

    def torch_lce():
        h = hidden[:, :-1].reshape(-1, C).index_select(0, active)
        nll = F.linear_cross_entropy(h, weight, targets, reduction="none",
                                     options=torch.nn.LinearCrossEntropyOptions())
        return -torch.zeros(B, device=nll.device).index_add(0, row_of, nll.float())

    impls = {"oracle": run(lambda: reference.linear_sequence_logprobs(hidden, weight, ids, mask)),
             "matmul+fused": run(matmul_fused),
             "linear_fused": run(lambda: kernels.linear_sequence_logprobs(hidden, weight, ids, mask)),
             "torch_lce": run(torch_lce)}
    grads_mb = (hidden.numel() + weight.numel()) * 4 / 2**20
    return impls, None, {"logits_f32_MB": B * T * V * 4 / 2**20, "grads_MB": grads_mb,
                         "response_frac": float(mask.float().mean()),
                         "useful_flops": 6 * int(mask[:, 1:].sum()) * V * C}


def pair_batch(P: int, T: int, layout: str, seed: int = 0):
    """(ids, chosen_mask, rejected_mask) of P pairs: half of all rows predict a response token.
    packed: one row per pair, prompt ~ half the row, then chosen and rejected (a quarter each);
    separate: 2P rows (chosen rows, then rejected rows), prompt ~ half of each row."""
    g = torch.Generator().manual_seed(seed)
    cm = torch.zeros(P, T, dtype=torch.bool)
    rm = torch.zeros(P, T, dtype=torch.bool)
    for i in range(P):
        p = int(torch.randint(int(0.4 * T), int(0.6 * T) + 1, (1,), generator=g))
        if layout == "packed":   # prompt | chosen | copy of the prompt's last token | rejected
            c = (T - p) // 2
            cm[i, p:p + c] = True
            rm[i, p + c + 1:] = True
        else:
            cm[i, p:] = True
            rm[i, p:] = True
    rows = P if layout == "packed" else 2 * P
    return torch.randint(0, 50, (rows, T), generator=g), cm, rm


def _pair_impls(B, T, V, C, layout, device="cpu"):
    """The per-pair sigmoid DPO loss with cached reference log-probs, forward + backward, on B rows:
    gradient in forward (``linear_pair_loss``) vs the recompute op the trainer calls today."""
    P = B if layout == "packed" else B // 2
    g = torch.Generator().manual_seed(0)
    ids, cm, rm = pair_batch(P, T, layout)
    ids = torch.randint(0, V, ids.shape, generator=g).to(device)
    cm, rm = cm.to(device), rm.to(device)
    hidden = torch.randn(B, T, C, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, C, generator=g) / C**0.5).to(device).requires_grad_()
    ref_c, ref_r = (torch.randn(P, generator=g).to(device) * 10 - 300 for _ in range(2))
    beta, dev = 0.1, torch.device(device).type

    def pair_loss(c, r, pairs):
        z = (c - ref_c[pairs]) - (r - ref_r[pairs])
        return -F.logsigmoid(beta * z) / P

    def recompute():
        with torch.autocast(dev, dtype=torch.bfloat16):
            if layout == "packed":   # the trainer's call: one kernel over [rows; rows] with the two masks
                lp = kernels.linear_sequence_logprobs(torch.cat([hidden, hidden]), weight,
                                                      torch.cat([ids, ids]), torch.cat([cm, rm]))
            else:
                lp = kernels.linear_sequence_logprobs(hidden, weight, ids, torch.cat([cm, rm]))
        loss = pair_loss(lp[:P], lp[P:], torch.arange(P, device=device)).sum()
        return loss, torch.autograd.grad(loss, (hidden, weight))

    def grad_in_forward():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss, _, _ = kernels.linear_pair_loss(hidden, weight, ids, cm, rm, pair_loss)
        return loss, torch.autograd.grad(loss, (hidden, weight))

    n_act = int(cm[:, 1:].sum() + rm[:, 1:].sum())
    info = {"logits_f32_MB": B * T * V * 4 / 2**20, "grads_MB": (hidden.numel() + weight.numel()) * 4 / 2**20,
            "response_frac": n_act / (B * T), "useful_flops": 6 * n_act * V * C, "baseline": "recompute",
            "layout": layout}
    return {"recompute": recompute, "grad_in_forward": grad_in_forward}, None, info


# The cases `fastdpo bench` runs by default: the README's kernel rows (all cases: --full).
HEADLINE = {("sequence_logprobs", (8, 512, 32768), torch.float32),
            ("linear_sequence_logprobs", (8, 1024, 50304, 768), torch.bfloat16),
            ("linear_pair_loss", (8, 1024, 50304, 768), torch.bfloat16)}


def cases(quick: bool, device="cpu", headline: bool = False):
    if headline and not quick:
        yield from (c for c in cases(quick, device) if c[:3] in HEADLINE)
        return
    if quick:
        shapes, C = [(2, 128, 4099)], 128
    else:
        shapes, C = [(8, 512, 32768), (8, 1024, 50304)], 768
    for B, T, V in shapes:
        for dt in (torch.float32, torch.bfloat16):
            yield ("sequence_logprobs", (B, T, V), dt,
                   lambda B=B, T=T, V=V, dt=dt: _seq_impls(B, T, V, dt, device))
    for B, T, V in shapes:
        for dt in (torch.float32, torch.bfloat16):
            yield ("linear_sequence_logprobs", (B, T, V, C), dt,
                   lambda B=B, T=T, V=V, dt=dt: _linear_impls(B, T, V, C, dt, device))
    B, T, V = shapes[-1]
    for layout in ("packed", "separate"):
        yield ("linear_pair_loss", (B, T, V, C), torch.bfloat16,
               lambda layout=layout: _pair_impls(B, T, V, C, layout, device))


def device_peak(device: torch.device, quick: bool, C: int = 768, V: int = 50304) -> dict:
    """The device's name and bf16 peak (FLOP/s) for the TFLOP/s columns: the datasheet figure of
    a known GPU, else the best measured bf16 GEMM: a square 2048^3 one, or on CPU also one shaped
    like these ops' lm_head GEMMs (1024 x C x V), which oneDNN runs faster than the square one."""
    name = device_name(device)
    sheet = datasheet_bf16_peak(name) if device.type == "cuda" else None
    if sheet:
        return {"device_name": name, "bf16_peak_flops": sheet, "peak_source": "datasheet"}
    n, t = (1024, 0.2) if quick else (2048, 0.5)
    best = measure_matmul_peak(torch.bfloat16, n, device.type, t)
    if device.type == "cpu":
        a = torch.randn(1024, C, dtype=torch.bfloat16)
        b = torch.randn(C, V, dtype=torch.bfloat16)
        for _ in range(2 if quick else 4):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * 1024 * C * V / (time.perf_counter() - t0))
    return {"device_name": name, "bf16_peak_flops": best, "peak_source": "measured"}


def run_kernel_bench(quick: bool = False, reps: int | None = None, aot: bool = True,
                     only: str | None = None, device: str = "auto", headline: bool = False) -> list[dict]:
    """One dict per (op, shape, dtype, implementation) plus one per AOT-compiled kernel.
    ``headline``: only the cases in ``HEADLINE``. Every implementation is called once untimed
    before the timed rounds (warm-up: allocator, oneDNN primitives, Triton compilation)."""
    results = []
    dev = resolve_device(device)
    threads = torch.get_num_threads()
    peak_info = None
    for op, shape, dtype, build in cases(quick, dev, headline):
        if only and only not in op:
            continue
        if op.startswith("linear") and peak_info is None:
            peak_info = device_peak(dev, quick, shape[3], shape[2])
        impls, restore, info = build()
        base = info.pop("baseline", "oracle")
        n = reps if reps is not None else 3
        times = {k: [] for k in impls}
        cpu = {k: [] for k in impls}
        peaks = {k: [] for k in impls}
        names = list(impls)
        for name in names:
            impls[name]()
            if name.endswith("inplace") and restore is not None:
                restore()
        for i in range(n):
            for name in names:
                if i and name in ONE_ROUND:
                    continue
                c0 = time.process_time()
                dt, peak = measure(impls[name], dev)
                cpu[name].append(time.process_time() - c0)
                times[name].append(dt)
                peaks[name].append(peak)
                if name.endswith("inplace") and restore is not None:
                    restore()
        t_or = statistics.median(times[base])
        p_or = max(peaks[base]) if peaks[base][0] is not None else None
        # what every implementation must return anyway; the in-place one returns the logits buffer
        required = {name: 0.0 if name.endswith("inplace") else info["grads_MB"] for name in names}
        po_wo = None if p_or is None else max(0.0, p_or - required[base])
        rows = []
        for name in names:
            t = statistics.median(times[name])
            p = max(peaks[name]) if peaks[name][0] is not None else None
            row = {"op": op, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "impl": name,
                   "device": dev.type, "threads": threads, "omp_wait_policy": _omp_policy(),
                   "reps": len(times[name]), "seconds": t,
                   "spread": (max(times[name]) - min(times[name])) / t,
                   "baseline": base, "speedup": t_or / t,
                   "speedup_vs_oracle": t_or / t if base == "oracle" else None,
                   "peak_extra_MB": p, "mem_vs_baseline": (p / p_or) if (p is not None and p_or) else None,
                   "required_outputs_MB": required[name], **info}
            row["mem_vs_oracle"] = row["mem_vs_baseline"] if base == "oracle" else None
            if dev.type == "cpu":   # CPU seconds: what descheduling by other processes does not inflate
                row["cpu_seconds"] = statistics.median(cpu[name])
                row["cpu_speedup"] = statistics.median(cpu[base]) / row["cpu_seconds"]
            if p is not None:
                p_wo = max(0.0, p - required[name])
                row["peak_extra_wo_grads_MB"] = p_wo
                row["mem_wo_grads_vs_oracle"] = p_wo / po_wo if (po_wo and base == "oracle") else None
                row["mem_vs_logits"] = p / info["logits_f32_MB"]
                row["mem_wo_grads_vs_logits"] = p_wo / info["logits_f32_MB"]
            if op == "linear_sequence_logprobs":
                row["time_vs_matmul_fused"] = t / statistics.median(times["matmul+fused"])
            if "useful_flops" in info and peak_info is not None:
                row.update(peak_info)
                row["tflops"] = info["useful_flops"] / t / 1e12
                row["peak_fraction"] = info["useful_flops"] / t / peak_info["bf16_peak_flops"]
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
        elif r.get("mem_vs_baseline") is not None:
            extra = f"  mem/{r['baseline']} {r['mem_vs_baseline']:5.3f}"
        if r["op"].startswith("linear") and "mem_vs_logits" in r:
            extra += (f"  mem/f32-logits {r['mem_vs_logits']:5.3f} "
                      f"(w/o grads {r['mem_wo_grads_vs_logits']:5.3f})")
        if "time_vs_matmul_fused" in r:
            extra += f"  t/(mm+fused) {r['time_vs_matmul_fused']:.2f}"
        if "tflops" in r:
            extra += f"  {r['tflops']:6.3f} TFLOP/s {100 * r['peak_fraction']:4.1f}% of bf16 peak"
        what = r["op"][:6] + (f"/{r['layout']}" if "layout" in r else "")
        cpu = f"(cpu x{r['cpu_speedup']:5.2f})" if r.get("cpu_speedup") else ""
        lines.append(f"{r['device']:<4} {what:<15} {str(tuple(r['shape'])):<22} {r['dtype']:<8} "
                     f"{r['impl']:<15} {r['seconds']:7.3f}s ±{r['spread'] * 100:3.0f}%  "
                     f"x{r['speedup']:5.2f} vs {r['baseline']:<9} {cpu:<13} "
                     f"peak+ {mem} MB{extra}  (resp {r['response_frac']:.2f}, reps {r['reps']})")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CUDA when available (Triton kernels), else CPU (torch paths)")
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
    dev = resolve_device(args.device)
    print(f"device: {dev.type}, torch threads: {torch.get_num_threads()}, OMP_WAIT_POLICY={_omp_policy()}\n"
          "x = baseline time / impl time (median over rounds, interleaved), "
          "± = (max - min) / median of the impl's own times\n"
          "peak+ = peak extra resident memory of one fwd+bwd (VmHWM reset per run, mmap'd allocations), "
          "including returned gradients; 'w/o grads' subtracts the returned gradients (required outputs "
          "of every implementation; none for in-place); f32-logits = B*T*V*4 bytes")
    rows = run_kernel_bench(args.quick, args.reps, not args.no_aot, args.only, args.device)
    if any("bf16_peak_flops" in r for r in rows):
        r = next(r for r in rows if "bf16_peak_flops" in r)
        print(f"TFLOP/s = 3 useful lm_head GEMMs over active rows / time; bf16 peak of {r['device_name']}: "
              f"{r['bf16_peak_flops'] / 1e12:.2f} TFLOP/s ({r['peak_source']})")
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
