"""The machine's practical matmul roofline, so each phase can report its achieved fraction of it.

A phase's useful work is counted in model FLOPs (6·N per trained token, 2·N per sampled token,
plus attention); dividing its FLOP/s by the measured matmul peak in the dtype it runs in says how
far from the hardware it is, which absolute tokens/s alone cannot.
"""
from __future__ import annotations

import time

import torch


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, device: str = "cpu",
                        min_seconds: float = 0.5) -> float:
    """Best observed FLOP/s of an n×n×n matmul (the max over repeats filters out noise from
    other processes on a shared machine)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool, allocator, kernel selection
    best, spent = 0.0, 0.0
    while spent < min_seconds:
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2 * n**3 / dt)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peaks(device: str = "cpu", quick: bool = False) -> dict[str, float]:
    """FLOP/s for float32 and bf16 (the two dtypes fastdpo computes in)."""
    n = 1024 if quick else 2048
    t = 0.2 if quick else 0.5
    return {"float32": measure_matmul_peak(torch.float32, n, device, t),
            "bfloat16": measure_matmul_peak(torch.bfloat16, n, device, t)}
