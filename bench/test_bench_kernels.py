"""pytest-benchmark micro-benchmarks: forward + backward of each fused op and its oracle, on CPU.

    pytest bench/test_bench_kernels.py --benchmark-group-by=param:case       # the issue's shapes
    FASTDPO_BENCH_QUICK=1 pytest bench/test_bench_kernels.py                  # small shapes

pytest-benchmark reports times only; the memory ratios and the interleaved speed ratios live in
``python -m fastdpo.bench.kernels`` (same case builders).
"""
import os

import pytest
import torch

from fastdpo.bench.kernels import _linear_impls, _pair_impls, _seq_impls

QUICK = os.environ.get("FASTDPO_BENCH_QUICK") == "1"
SEQ_SHAPES = [(2, 128, 4099)] if QUICK else [(8, 512, 32768), (8, 1024, 50304)]
LIN_SHAPES = [(2, 128, 4099, 128)] if QUICK else [(8, 512, 32768, 768), (8, 1024, 50304, 768)]
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def _rounds(impl: str) -> int:
    return 1 if impl == "torch_lce" else 3  # torch_lce: tens of seconds per call at the full shapes


@pytest.mark.parametrize("impl", ["oracle", "fused", "fused_inplace"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", SEQ_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sequence_logprobs(benchmark, case, dtype, impl):
    impls, restore, _ = _seq_impls(*case, DTYPES[dtype])
    setup = (lambda: (restore(), ((), {}))[1]) if impl == "fused_inplace" else None
    benchmark.pedantic(impls[impl], setup=setup, rounds=_rounds(impl), iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("impl", ["oracle", "matmul+fused", "linear_fused", "torch_lce"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", LIN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_sequence_logprobs(benchmark, case, dtype, impl):
    impls, _, _ = _linear_impls(*case, DTYPES[dtype])
    benchmark.pedantic(impls[impl], rounds=_rounds(impl), iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("impl", ["recompute", "grad_in_forward"])
@pytest.mark.parametrize("layout", ["packed", "separate"])
def test_linear_pair_loss(benchmark, layout, impl):
    impls, _, _ = _pair_impls(*LIN_SHAPES[-1], layout)
    benchmark.pedantic(impls[impl], rounds=3, iterations=1, warmup_rounds=0)
