"""Fused log-softmax + label gather + response mask (+ per-sequence sum), forward and backward.

Every function here works on *rows*: one row is the vocabulary vector of logits at one position.
A row r carries a label (the token it should predict) and a coefficient (the response-mask value
of that label; 0 means "skip this row"). ``sequence_logprobs`` builds the shifted labels and
coefficients from ``ids``/``mask`` as two tiny (B, T) tensors, so the shift costs no copy of the
(B, T, V) logits: row (b, T-1) simply gets coefficient 0.

Forward stores two float32 per row, the row max ``m`` and ``log(sum(exp(x - m)))`` (their sum is
the log-sum-exp; kept apart so that ``x - m`` is exact even at |x| ~ 1e4, where a float32 lse alone
has a resolution of ~1e-3), nothing of size V. Backward recomputes ``softmax = exp(x - m - logsum)``
and writes ``g * coef * (onehot(label) - softmax)`` in the logits' dtype,
optionally straight into the logits buffer (``inplace_backward=True``: the caller promises it
never reads the logits again, e.g. they came from an lm_head matmul whose backward does not need them).

Two implementations share that contract:
- Triton kernels (``_fwd_kernel``/``_bwd_kernel``): one program per row, streaming (online)
  log-sum-exp over vocabulary blocks, all math in float32. On CPU tensors they run under
  ``TRITON_INTERPRET=1`` (that is how the tests exercise them).
- a torch path for CPU: contiguous chunks of rows, trimmed to the rows that carry a response token,
  float32 only inside one chunk at a time. Its forward uses torch's fused ``log_softmax`` kernel per
  chunk (one vectorized pass, bitwise the oracle's numbers in float32) and reads the row's log-sum
  back as ``-max(log_softmax(x))``.

Per-row results are summed per sequence with a (B, T) torch sum rather than atomics in the kernel:
the sum is B*T floats (negligible) and stays deterministic run to run.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # triton is Linux-only; the torch path does not need it
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch", "reference")


class DtypeError(TypeError, ValueError):
    """A tensor of the wrong dtype. A TypeError by nature, and also a ValueError, which is what
    every other bad input to these ops raises (callers and the CLI catch one class)."""

# Bytes of float32 scratch one torch-path chunk may use; ~8 MB keeps a chunk's passes in L2/L3.
# Measured at 8x512x32768 bf16, fwd+bwd, 1 thread: 8 MB 0.96 s, 32 MB 1.29 s, 128 MB 2.40 s. With 2
# threads, other processes competing for the 2 cores and libgomp's default spinning barriers the
# order flips (8 MB 2.7 s, 32 MB 1.7 s: every op's barrier spins while its partner thread is
# descheduled, and smaller chunks mean more ops); with OMP_WAIT_POLICY=PASSIVE, 8 MB at 2 threads
# takes 0.9 s (bench/kernels.py).
TORCH_CHUNK_BYTES = 8 * 2**20
# Largest Triton vocabulary block (see block_config); tests lower it to exercise the streaming loop.
MAX_BLOCK_V = 4096


# --------------------------------------------------------------------------- validation, rows


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` means for tensors on ``device`` (``auto`` resolved); raises
    ValueError for a backend that cannot run there."""
    return _check_backend(backend, device)


def _check_backend(backend: str, device: torch.device) -> str:
    # ValueError, not RuntimeError: these are choices a user made (the CLI prints them as one line)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if device.type == "cpu" and not interpreter_enabled():
            raise ValueError(
                "backend='triton' on CPU tensors runs only under the Triton interpreter: set "
                "TRITON_INTERPRET=1 in the environment before triton is first imported (or use "
                "backend='torch' / 'auto' on CPU)")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports cuda (and cpu via the interpreter), not {device}")
    return backend


def interpreter_enabled() -> bool:
    """Triton decides at *import* time whether ``triton.jit`` (its own library functions such as
    ``tl.max`` included) builds interpreted or compiled kernels, so the environment variable must
    have been set before triton was first imported."""
    env = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
    return env and HAS_TRITON and not isinstance(_fwd_kernel, JITFunction)


def check_inputs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, shift: bool,
                 what: str = "logits") -> None:
    """Shape/dtype/range checks with messages that say which argument is wrong."""
    if not logits.is_floating_point():
        raise DtypeError(f"{what} must be a floating point tensor, got {logits.dtype}")
    if shift and logits.dim() != 3:
        raise ValueError(f"{what} must be (B, T, V), got shape {tuple(logits.shape)}")
    if logits.dim() < 2:
        raise ValueError(f"{what} must have a vocabulary dimension, got shape {tuple(logits.shape)}")
    name = "ids" if shift else "labels"
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise DtypeError(f"{name} must be an integer tensor (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{name} shape {tuple(labels.shape)} must equal {what}.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    if tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal {name} shape {tuple(labels.shape)}")
    if mask.is_complex():
        raise DtypeError(f"mask must be bool or real, got {mask.dtype}")
    if labels.device != logits.device or mask.device != logits.device:
        raise ValueError(f"{what}, {name} and mask must be on one device, got "
                         f"{logits.device}, {labels.device}, {mask.device}")
    used = labels[:, 1:] if shift else labels
    V = logits.shape[-1]
    if not used.numel():
        return
    if not range_check_on_host(used.device):
        # Reading min/max on the host would wait for the device at every call: the check runs
        # on the device instead, and a bad id stops the process at the next synchronization.
        torch._assert_async(((used >= 0) & (used < V)).all(),
                            f"{name} contains a token id outside the vocabulary [0, {V}) of {what}")
        return
    lo, hi = int(used.min()), int(used.max())
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains token id {bad}, outside the vocabulary [0, {V}) "
                         f"of {what} (V = {V})")


def range_check_on_host(device: torch.device) -> bool:
    """Whether ``check_inputs`` reads the id range on the host (a clear ValueError): on CPU, where
    that costs nothing; elsewhere it asserts on the device (no host sync)."""
    return device.type == "cpu"


def shifted_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row labels and coefficients for the next-token shift: row (b, t) predicts ids[b, t+1]."""
    labels = torch.zeros_like(ids, dtype=torch.int64)
    coef = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    labels[:, :-1] = ids[:, 1:]
    coef[:, :-1] = mask[:, 1:].to(torch.float32)
    return labels, coef


def _active_spans(active: torch.Tensor, chunk_rows: int) -> list[tuple[int, int]]:
    """[start, end) row ranges, one per chunk of ``chunk_rows`` rows, trimmed to its active rows.

    Chunks with no active row are dropped, so prompt and padding rows cost nothing; inactive rows
    inside a span are computed and multiplied by a zero coefficient (cheaper than gathering rows).
    """
    nz = torch.nonzero(active.cpu()).flatten()
    if nz.numel() == 0:
        return []
    _, counts = torch.unique_consecutive(nz // chunk_rows, return_counts=True)
    ends = counts.cumsum(0)
    firsts, lasts = nz[ends - counts], nz[ends - 1] + 1
    return list(zip(firsts.tolist(), lasts.tolist()))


def _chunk_rows(V: int) -> int:
    return max(1, TORCH_CHUNK_BYTES // (4 * V))


# --------------------------------------------------------------------------- torch path


def _torch_forward(x2: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor):
    N, V = x2.shape
    tok = torch.zeros(N, dtype=torch.float32, device=x2.device)
    stats = torch.zeros(N, 2, dtype=torch.float32, device=x2.device)
    for s, e in _active_spans(coef != 0, _chunk_rows(V)):
        xf = x2[s:e].float()
        lp = torch.log_softmax(xf, dim=-1)
        stats[s:e, 0] = xf.amax(-1)
        stats[s:e, 1] = lp.amax(-1).neg_()
        c = coef[s:e]   # inactive rows inside a span may have a -inf label logit: -inf * 0 = nan
        tok[s:e] = torch.where(c != 0, lp.gather(1, labels[s:e, None]).squeeze(1) * c, 0.0)
    return tok, stats


def _torch_backward(x2: torch.Tensor, labels: torch.Tensor, gcoef: torch.Tensor, stats: torch.Tensor,
                    out2: torch.Tensor) -> None:
    """out2 = gcoef * (onehot(labels) - softmax(x2)); out2 may be x2 itself (in-place)."""
    N, V = x2.shape
    done = 0
    # softmax * -g = exp(x - m) * (-g * exp(-logsum)): the log-sum folds into the per-row factor,
    # and for bf16 the float32 promotion rides on the subtraction (3 elementwise passes, not 5)
    neg_scale = -gcoef * torch.exp(-stats[:, 1])
    for s, e in _active_spans(gcoef != 0, _chunk_rows(V)):
        out2[done:s].zero_()
        if x2.dtype == torch.float32:
            buf = torch.sub(x2[s:e], stats[s:e, 0:1], out=out2[s:e])
        else:
            buf = torch.sub(x2[s:e], stats[s:e, 0:1])
        buf.exp_().mul_(neg_scale[s:e, None]).scatter_add_(1, labels[s:e, None], gcoef[s:e, None])
        if buf.dtype != out2.dtype:
            out2[s:e].copy_(buf)
        done = e
    out2[done:].zero_()


# --------------------------------------------------------------------------- Triton kernels


if HAS_TRITON:
    # The kernels sit under this guard because their annotations need triton.language.
    @triton.jit
    def _fwd_kernel(x_ptr, lab_ptr, coef_ptr, tok_ptr, stats_ptr, T, V, stride_xb, stride_xt,
                        BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        coef = tl.load(coef_ptr + row)
        tok = 0.0
        m = 0.0
        logsum = 0.0
        if coef != 0.0:  # prompt, padding and the last position: no work at all
            x_row = x_ptr + (row // T) * stride_xb + (row % T) * stride_xt
            m = -float("inf")
            s = 0.0
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                x = tl.load(x_row + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
            logsum = tl.log(s)
            label = tl.load(lab_ptr + row)
            tok = coef * ((tl.load(x_row + label).to(tl.float32) - m) - logsum)
        tl.store(tok_ptr + row, tok)
        tl.store(stats_ptr + 2 * row, m)
        tl.store(stats_ptr + 2 * row + 1, logsum)

    @triton.jit
    def _bwd_kernel(x_ptr, lab_ptr, gcoef_ptr, stats_ptr, dx_ptr, T, V, stride_xb, stride_xt,
                        stride_db, stride_dt, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        t = row % T
        dx_row = dx_ptr + b * stride_db + t * stride_dt
        gc = tl.load(gcoef_ptr + row)
        if gc == 0.0:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                zero = tl.zeros([BLOCK_V], dtype=tl.float32)
                tl.store(dx_row + cols, zero.to(dx_ptr.dtype.element_ty), mask=cols < V)
        else:
            x_row = x_ptr + b * stride_xb + t * stride_xt
            m = tl.load(stats_ptr + 2 * row)
            logsum = tl.load(stats_ptr + 2 * row + 1)
            label = tl.load(lab_ptr + row)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                valid = cols < V
                # each element is read before it is written by the same thread: dx_ptr may alias x_ptr
                x = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
                grad = gc * (tl.where(cols == label, 1.0, 0.0) - tl.exp((x - m) - logsum))
                tl.store(dx_row + cols, grad.to(dx_ptr.dtype.element_ty), mask=valid)


def block_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). 4096 floats per block over 8 warps is 16 values per thread: enough
    in flight to stream a 50k vocabulary at full bandwidth, few enough registers to never spill
    (checked by the sm_89 AOT compile in tests and bench)."""
    block = min(MAX_BLOCK_V, triton.next_power_of_2(max(V, 16)))
    return block, (8 if block >= 2048 else 4)


def _triton_forward(x3: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor):
    B, T, V = x3.shape
    N = B * T
    tok = torch.empty(N, dtype=torch.float32, device=x3.device)
    stats = torch.empty(N, 2, dtype=torch.float32, device=x3.device)
    if N:
        block, warps = block_config(V)
        _fwd_kernel[(N,)](
            x3, labels, coef, tok, stats, T, V, x3.stride(0), x3.stride(1), BLOCK_V=block, num_warps=warps)
    return tok, stats


def _triton_backward(x3, labels, gcoef, stats, dx3) -> None:
    B, T, V = x3.shape
    if B * T:
        block, warps = block_config(V)
        _bwd_kernel[(B * T,)](
            x3, labels, gcoef, stats, dx3, T, V, x3.stride(0), x3.stride(1), dx3.stride(0), dx3.stride(1),
            BLOCK_V=block, num_warps=warps)


# --------------------------------------------------------------------------- autograd


class RowLogprobs(torch.autograd.Function):
    """(B, T, V) logits, (B*T,) labels and coefficients -> (B*T,) float32 coef * log p(label)."""

    @staticmethod
    def forward(ctx, x3, labels, coef, backend, inplace_backward):
        B, T, V = x3.shape
        if x3.stride(-1) != 1:
            x3 = x3.contiguous()
        if backend == "triton":
            tok, stats = _triton_forward(x3, labels, coef)
        else:
            tok, stats = _torch_forward(x3.reshape(B * T, V), labels, coef)
        ctx.save_for_backward(x3, labels, coef, stats)
        ctx.backend, ctx.inplace = backend, inplace_backward
        return tok

    @staticmethod
    def backward(ctx, grad_tok):
        x3, labels, coef, stats = ctx.saved_tensors
        gcoef = grad_tok.reshape(-1).float() * coef
        B, T, V = x3.shape
        if ctx.backend == "triton":
            dx3 = x3 if ctx.inplace else torch.empty_like(x3, memory_format=torch.contiguous_format)
            _triton_backward(x3, labels, gcoef, stats, dx3)
        else:
            inplace = ctx.inplace and x3.is_contiguous()
            x2 = x3.reshape(B * T, V)
            dx3 = x3 if inplace else torch.empty((B, T, V), dtype=x3.dtype, device=x3.device)
            _torch_backward(x2, labels, gcoef, stats, dx3.view(B * T, V))
        return dx3, None, None, None, None


def _rows(logits3, labels, coef, backend, inplace_backward):
    return RowLogprobs.apply(logits3, labels.reshape(-1).contiguous(), coef.reshape(-1).contiguous(),
                             backend, inplace_backward)


# --------------------------------------------------------------------------- public API


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, backend: str = "auto",
                      inplace_backward: bool = False) -> torch.Tensor:
    """(B,) float32: sum over t in 0..T-2 of mask[:, t+1] * log_softmax(logits[:, t])[ids[:, t+1]].

    Differentiable w.r.t. ``logits``; never materializes a float32 (B, T, V) tensor.
    ``inplace_backward=True`` writes the logits gradient into the logits buffer (saves a (B, T, V)
    allocation; the logits are garbage afterwards).
    """
    check_inputs(logits, ids, mask, shift=True)
    backend = _check_backend(backend, logits.device)
    if backend == "reference":
        from . import reference

        return reference.sequence_logprobs(logits, ids, mask)
    B, T, _ = logits.shape
    labels, coef = shifted_rows(ids, mask)
    return _rows(logits, labels, coef, backend, inplace_backward).view(B, T).sum(-1)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, backend: str = "auto",
                   inplace_backward: bool = False) -> torch.Tensor:
    """mask * log_softmax(logits)[labels] per position, no shift; float32, shape of ``labels``.

    For SFT, the masked mean NLL is ``-token_logprobs(...).sum() / mask.sum()``.
    """
    check_inputs(logits, labels, mask, shift=False)
    backend = _check_backend(backend, logits.device)
    if backend == "reference":
        from . import reference

        return reference.token_logprobs(logits, labels, mask)
    V = logits.shape[-1]
    x3 = logits if logits.dim() == 3 else logits.reshape(1, -1, V)
    coef = mask.to(torch.float32)
    return _rows(x3, labels.long(), coef, backend, inplace_backward).view(labels.shape)
