"""Every Triton kernel compiles ahead of time for sm_80, sm_89 and sm_90 without a GPU.

The interpreter forgives what the compiler does not (type mismatches across branches, pointer
arithmetic widths, layouts); this also reads ptxas' register/spill report and the shared memory
of the tiles each kernel is launched with on each target at GPT-2's vocabulary.
"""
import pytest

pytest.importorskip("triton")

from fastdpo.kernels import aot  # noqa: E402

KERNELS = {"logprob_fwd", "logprob_bwd",
           # the linear ops' kernels, in each mode they are launched in
           "linear_fwd", "linear_keep", "linear_dlogits", "dlogits_inplace", "grad_hidden", "grad_weight"}


@pytest.fixture(scope="module")
def reports():
    return aot.report(ccs=(80, 89, 90), dtypes=("float32", "bfloat16"), V=50304)


@pytest.mark.parametrize("cc", [80, 89, 90])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_compile_for_gpu(reports, cc, dtype):
    rows = [r for r in reports if r["cc"] == cc and r["dtype"] == dtype]
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        assert 0 < r["regs"] <= 255, r
        assert r["spills"] == 0 and r["stack"] == 0, r           # no spills on any target
        assert r["smem"] <= aot.SMEM_PER_BLOCK[cc], r           # fits one block's shared memory
        if r["kernel"].startswith("logprob"):
            assert r["tiles"] == {"BLOCK_V": 4096} and r["num_warps"] == 8


def test_table_names_every_kernel(reports):
    table = aot.format_table(reports)
    assert all(k in table for k in KERNELS) and "spills" in table and "smem KB" in table
