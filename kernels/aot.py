"""Ahead-of-time compilation of the Triton kernels for real GPUs, on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole pipeline to a
cubin with no device. Triton only fills ``n_regs``/``n_spills`` when it loads the cubin on a GPU,
so the register and spill figures come from running Triton's bundled ``ptxas -v`` on the PTX it
produced (the same assembler, options and architecture Triton used for the cubin).

A process that imported triton under ``TRITON_INTERPRET=1`` (the test suite) holds interpreted
kernels that cannot be compiled, so ``report`` then runs ``python -m fastdpo.kernels.aot`` in a clean
subprocess and reads its JSON.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from . import logprob  # noqa: E402

_TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def kernel_signatures(dtype: str = "float32") -> dict:
    """Signatures of the package's kernels as launched for logits of ``dtype``."""
    x = "*" + _TORCH_TO_TRITON[dtype]
    fwd = {"x_ptr": x, "lab_ptr": "*i64", "coef_ptr": "*fp32", "tok_ptr": "*fp32", "stats_ptr": "*fp32",
           "T": "i32", "V": "i32", "stride_xb": "i64", "stride_xt": "i64", "BLOCK_V": "constexpr"}
    bwd = {"x_ptr": x, "lab_ptr": "*i64", "gcoef_ptr": "*fp32", "stats_ptr": "*fp32", "dx_ptr": x,
           "T": "i32", "V": "i32", "stride_xb": "i64", "stride_xt": "i64", "stride_db": "i64",
           "stride_dt": "i64", "BLOCK_V": "constexpr"}
    return {"logprob_fwd": (logprob._fwd_kernel, fwd), "logprob_bwd": (logprob._bwd_kernel, bwd)}


def _ptxas(cc: int) -> str:
    try:  # the assembler Triton itself picks per architecture (a newer one for sm_90+)
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cc).path
    except ImportError:
        return knobs.nvidia.ptxas.path


def _ptxas_report(ptx: str, arch: str, cc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(cc), "-v", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"ptxas failed for {arch}:\n{log}")

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {"regs": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "static_smem": grab(r"(\d+) bytes smem"),
            "stack": grab(r"(\d+) bytes stack frame")}


def compile_kernel(fn, signature: dict, constexprs: dict, cc: int, num_warps: int = 4) -> dict:
    """Compile ``fn`` for sm_``cc``; returns regs, spills, shared memory and the compiled kernel."""
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # e.g. sm_90a: what Triton targeted
    report = _ptxas_report(ptx, arch, cc)
    report.update(cc=cc, num_warps=num_warps, shared=compiled.metadata.shared,
                  spills=report["spill_stores"] + report["spill_loads"], compiled=compiled)
    return report


def compile_all(cc: int, dtype: str = "float32", V: int = 50304) -> list[dict]:
    """Every kernel of the package, with the block config it gets at vocabulary size ``V``."""
    block, warps = logprob.block_config(V)
    rows = []
    for name, (fn, sig) in kernel_signatures(dtype).items():
        rep = compile_kernel(fn, sig, {"BLOCK_V": block}, cc, warps)
        rep.update(kernel=name, dtype=dtype, BLOCK_V=block)
        rows.append(rep)
    return rows


def report(ccs=(80, 89, 90), dtypes=("float32", "bfloat16"), V: int = 50304) -> list[dict]:
    """JSON-able compile reports for every kernel x cc x dtype, in-process when possible."""
    if isinstance(logprob._fwd_kernel, JITFunction):
        rows = [r for cc in ccs for dt in dtypes for r in compile_all(cc, dt, V)]
        for r in rows:
            del r["compiled"]
        return rows
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastdpo.kernels.aot", "--json", "--V", str(V), "--cc", *map(str, ccs),
           "--dtype", *dtypes]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if out.returncode:
        raise RuntimeError(f"AOT compile subprocess failed:\n{out.stderr}")
    return json.loads(out.stdout)


def format_table(rows: list[dict]) -> str:
    head = (f"{'kernel':<12} {'dtype':<9} {'cc':>3} {'BLOCK_V':>7} {'warps':>5} {'regs':>4} "
            f"{'spills':>6} {'shared':>6}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['kernel']:<12} {r['dtype']:<9} {r['cc']:>3} {r['BLOCK_V']:>7} {r['num_warps']:>5} "
                     f"{r['regs']:>4} {r['spills']:>6} {r['shared'] + r['static_smem']:>6}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="AOT-compile the fastdpo Triton kernels (no GPU needed)")
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 89, 90])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--V", type=int, default=50304, help="vocabulary size that picks the block config")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = report(args.cc, args.dtype, args.V)
    print(json.dumps(rows) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
