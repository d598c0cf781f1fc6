"""The device every bench phase runs on, and that device's peak, so each phase can report its
achieved fraction of it.

A phase's useful work is counted in model FLOPs (6·N per trained token, 2·N per sampled token,
plus attention); dividing its FLOP/s by the peak of the device it ran on, in the dtype it ran in,
says how far from the hardware it is, which absolute tokens/s alone cannot. On a known GPU the bf16
peak is the datasheet's dense tensor-core figure; elsewhere (CPUs, unknown GPUs) it is the best
measured GEMM.
"""
from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks with float32 accumulation (TFLOP/s, vendor datasheets), matched
# against torch.cuda.get_device_name in this order; other GPUs use their measured cuBLAS peak.
GPU_BF16_PEAK = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                 ("RTX 4090", 165.2), ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0), ("RTX 3090", 71.0))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; a device this machine lacks is a ``ConfigError``."""
    from fastdpo.runtime import resolve_device as resolve

    return resolve(str(device))


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


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def datasheet_bf16_peak(name: str) -> float | None:
    for key, tflops in GPU_BF16_PEAK:
        if key in name:
            return tflops * 1e12
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def matmul_peaks(device: str | torch.device = "cpu", quick: bool = False) -> dict:
    """FLOP/s for float32 and bf16 (the two dtypes fastdpo computes in) on ``device``, with where
    each figure comes from: bf16 on a known GPU is its datasheet peak, the rest is measured."""
    device = torch.device(device)
    n = 1024 if quick else 2048
    t = 0.2 if quick else 0.5
    out = {"float32": measure_matmul_peak(torch.float32, n, device.type, t),
           "bfloat16": measure_matmul_peak(torch.bfloat16, n, device.type, t),
           "device": device.type, "device_name": device_name(device),
           "source": {"float32": "measured", "bfloat16": "measured"}}
    sheet = datasheet_bf16_peak(out["device_name"]) if device.type == "cuda" else None
    if sheet:
        out["bfloat16"], out["source"]["bfloat16"] = sheet, "datasheet"
    return out
