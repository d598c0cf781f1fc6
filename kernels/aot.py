"""Ahead-of-time compilation of the Triton kernels for real GPUs, on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole pipeline to a
cubin with no device. Triton only fills ``n_regs``/``n_spills`` when it loads the cubin on a GPU,
so the register and spill figures come from running Triton's bundled ``ptxas -v`` on the PTX it
produced (the same assembler, options and architecture Triton used for the cubin).

A process that imported triton under ``TRITON_INTERPRET=1`` (the test suite) holds interpreted
kernels that cannot be compiled, so ``report`` then runs ``python -m fastdpo.kernels.aot`` in a clean
subprocess and reads its JSON.

Each kernel is compiled with the tiles, warps and pipeline stages it is launched with on that
target (``linear_logprob.tile_config``) and the argument alignment a launch at GPT-2 shapes
specializes on; the table shows registers per thread, spilled bytes and shared memory per block
against the target's limit.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from . import linear_logprob as lin  # noqa: E402
from . import logprob  # noqa: E402

_TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Largest shared memory one block may use (opt-in), bytes: A100, RTX 4090 (and other sm_86/89), H100.
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _logprob_specs(dtype: str, V: int) -> list[dict]:
    x = "*" + _TORCH_TO_TRITON[dtype]
    fwd = {"x_ptr": x, "lab_ptr": "*i64", "coef_ptr": "*fp32", "tok_ptr": "*fp32", "stats_ptr": "*fp32",
           "T": "i32", "V": "i32", "stride_xb": "i64", "stride_xt": "i64", "BLOCK_V": "constexpr"}
    bwd = {"x_ptr": x, "lab_ptr": "*i64", "gcoef_ptr": "*fp32", "stats_ptr": "*fp32", "dx_ptr": x,
           "T": "i32", "V": "i32", "stride_xb": "i64", "stride_xt": "i64", "stride_db": "i64",
           "stride_dt": "i64", "BLOCK_V": "constexpr"}
    block, warps = logprob.block_config(V)
    opts = {"constexprs": {"BLOCK_V": block}, "num_warps": warps, "num_stages": 3, "aligned": ()}
    return [dict(kernel="logprob_fwd", fn=logprob._fwd_kernel, signature=fwd, **opts),
            dict(kernel="logprob_bwd", fn=logprob._bwd_kernel, signature=bwd, **opts)]


def _linear_specs(cc: int, dtype: str) -> list[dict]:
    """The linear ops' kernels in every mode they are launched in, with their per-target tiles."""
    x = "*" + _TORCH_TO_TRITON[dtype]
    tdtype = getattr(torch, dtype)
    precision = "ieee" if dtype == "float32" else "tf32"
    f32, i32 = "*fp32", "*i32"
    logits = {"h_ptr": x, "w_ptr": x, "lab_ptr": i32, "n_ptr": i32, "g_ptr": f32,
              "stats_ptr": f32, "z_ptr": x, "part_ptr": f32, "C": "i32", "V": "i32", "n_max": "i32",
              "stride_h": "i32", "stride_w": "i32", "stride_z": "i32", "tiles_per_split": "i32"}
    dlogits = {"z_ptr": x, "lab_ptr": i32, "n_ptr": i32, "g_ptr": f32, "stats_ptr": f32, "V": "i32",
               "n_max": "i32", "stride_z": "i32"}
    grad_h = {"dl_ptr": x, "w_ptr": x, "n_ptr": i32, "out_ptr": f32, "C": "i32", "V": "i32",
              "n_max": "i32", "stride_dl": "i32", "stride_w": "i32", "tiles_per_split": "i32"}
    grad_w = {"dl_ptr": x, "h_ptr": x, "n_ptr": i32, "gw_ptr": f32, "C": "i32",
              "V": "i32", "stride_dl": "i32", "stride_h": "i32"}
    specs = []

    def add(name, fn, sig, kernel, **flags):
        cfg = lin.tile_config(kernel, cc, tdtype)
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
        const = {**blocks, **flags, "INTERPRETED": False}
        if "EVEN_K" in fn.arg_names:
            const["EVEN_K"] = True   # C = 768
        if "PRECISION" in fn.arg_names:
            const["PRECISION"] = precision
        sig = {**sig, **{k: "constexpr" for k in const}}
        # what a launch at GPT-2 shapes specializes on: 16-byte aligned pointers, sizes and strides
        # that are multiples of 16 (C = 768, V = 50304)
        aligned = [k for k, t in sig.items() if t.startswith("*") or k in ("C", "V", "stride_h", "stride_w",
                                                                             "stride_z", "stride_dl")]
        specs.append(dict(kernel=name, fn=fn, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"], aligned=aligned))

    add("linear_fwd", lin._logits_kernel, logits, "logits", STATS=True, OUT=0)
    add("linear_keep", lin._logits_kernel, logits, "logits", STATS=True, OUT=1)
    add("linear_dlogits", lin._logits_kernel, logits, "logits", STATS=False, OUT=2)
    add("dlogits_inplace", lin._dlogits_kernel, dlogits, "dlogits")
    add("grad_hidden", lin._grad_hidden_kernel, grad_h, "grad_hidden")
    add("grad_weight", lin._grad_weight_kernel, grad_w, "grad_weight")
    return specs


def kernel_specs(cc: int, dtype: str = "float32", V: int = 50304) -> list[dict]:
    """Every kernel of the package (and mode) as launched for ``dtype`` operands on sm_``cc``."""
    return _logprob_specs(dtype, V) + _linear_specs(cc, dtype)


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


def compile_kernel(fn, signature: dict, constexprs: dict, cc: int, num_warps: int = 4,
                   num_stages: int = 3, aligned=()) -> dict:
    """Compile ``fn`` for sm_``cc``; returns regs, spills, shared memory and the compiled kernel.
    ``aligned``: arguments the launch specializes as multiples of 16 (pointers: 16-byte aligned)."""
    names = list(signature)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # e.g. sm_90a: what Triton targeted
    report = _ptxas_report(ptx, arch, cc)
    report.update(cc=cc, num_warps=num_warps, num_stages=num_stages, shared=compiled.metadata.shared,
                  spills=report["spill_stores"] + report["spill_loads"], compiled=compiled)
    report["smem"] = report["shared"] + report["static_smem"]
    return report


def compile_all(cc: int, dtype: str = "float32", V: int = 50304) -> list[dict]:
    """Every kernel of the package, with the tiles it gets on sm_``cc`` at vocabulary size ``V``."""
    rows = []
    for spec in kernel_specs(cc, dtype, V):
        rep = compile_kernel(spec["fn"], spec["signature"], spec["constexprs"], cc, spec["num_warps"],
                             spec["num_stages"], spec["aligned"])
        tiles = {k: v for k, v in spec["constexprs"].items() if k.startswith("BLOCK")}
        rep.update(kernel=spec["kernel"], dtype=dtype, tiles=tiles, smem_limit=SMEM_PER_BLOCK.get(cc))
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
    # this module's own import name (kernels.aot in a checkout, or the installed package's)
    cmd = [sys.executable, "-m", __spec__.name, "--json", "--V", str(V), "--cc", *map(str, ccs),
           "--dtype", *dtypes]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if out.returncode:
        raise RuntimeError(f"AOT compile subprocess failed:\n{out.stderr}")
    return json.loads(out.stdout)


def format_table(rows: list[dict]) -> str:
    short = {"BLOCK_M": "M", "BLOCK_V": "V", "BLOCK_K": "K", "BLOCK_C": "C"}
    head = (f"{'kernel':<16} {'dtype':<9} {'cc':>3} {'tiles':<18} {'warps':>5} {'stages':>6} {'regs':>4} "
            f"{'spills':>6} {'smem KB':>7} {'limit':>5}")
    lines = [head]
    for r in rows:
        tiles = " ".join(f"{short[k]}{v}" for k, v in r["tiles"].items())
        limit = "-" if r.get("smem_limit") is None else f"{r['smem_limit'] / 1024:.0f}"
        lines.append(f"{r['kernel']:<16} {r['dtype']:<9} {r['cc']:>3} {tiles:<18} {r['num_warps']:>5} "
                     f"{r['num_stages']:>6} {r['regs']:>4} {r['spills']:>6} {r['smem'] / 1024:>7.1f} "
                     f"{limit:>5}")
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
