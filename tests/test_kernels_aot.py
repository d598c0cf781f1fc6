"""Every Triton kernel compiles ahead of time for sm_80, sm_89 and sm_90 without a GPU.

The interpreter forgives what the compiler does not (type mismatches across branches, pointer
arithmetic widths, layouts); this also reads ptxas' register/spill report for the block config
each kernel is launched with at GPT-2's vocabulary.
"""
import pytest

pytest.importorskip("triton")

from fastdpo.kernels import aot  # noqa: E402


@pytest.fixture(scope="module")
def reports():
    return aot.report(ccs=(80, 89, 90), dtypes=("float32", "bfloat16"), V=50304)


@pytest.mark.parametrize("cc", [80, 89, 90])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_compile_for_gpu(reports, cc, dtype):
    rows = [r for r in reports if r["cc"] == cc and r["dtype"] == dtype]
    assert {r["kernel"] for r in rows} == {"logprob_fwd", "logprob_bwd"}
    for r in rows:
        assert 0 < r["regs"] <= 255, r
        assert r["BLOCK_V"] == 4096 and r["num_warps"] == 8
        if cc == 89:  # the RTX 4090 target must not spill
            assert r["spills"] == 0 and r["stack"] == 0, r
