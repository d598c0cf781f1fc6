"""``sequence_logprobs(hidden @ weight.T, ids, mask)`` fused with the lm_head matmul.

The (B, T, V) logits never exist. Only rows whose *next* token is a response token (coefficient
``mask[:, t+1] != 0``) go through the lm_head at all; prompt and padding positions are skipped
rather than masked after the fact. Gradient strategy: *recompute in backward* (4 lm_head matmuls
per active row: forward logits, recomputed logits, grad_hidden, grad_weight). The output is one
log-prob per sequence and DPO's upstream gradient is only known after the whole batch; when a
per-pair loss is known pair by pair, ``linear_pair.py`` computes the gradients in forward
with 3 matmuls and no recompute, reusing the Triton kernels below.

Two implementations share that contract. The module is long because they also share their input
checks, tile loops and buffers with ``linear_pair.py``, and the AOT report reads the Triton
kernels and tile configs from here.

Torch path (every backend but ``triton``; ``torch_stats`` / ``torch_grads``, shared with the pair
op): active rows gathered, then (rows x vocabulary) tiles, each ``h_rows @ W[v0:v1].T`` folded
into an online log-sum-exp (running row max and sum of exponentials) and the label logit. All
tiles of a pass share preallocated buffers. Saved for backward: the active rows of ``hidden``, labels,
coefficients, row max and log-sum; nothing of size V. Backward recomputes each tile and turns it
into ``dlogits = g * coef * (onehot - softmax)``; ``grad_W[v0:v1] = dlogits.T @ h`` is one matmul
(the sum over rows happens inside the GEMM's float32 accumulator) and ``grad_h += dlogits @
W[v0:v1]`` goes into a float32 (N_act x C) buffer. Tiling the vocabulary in backward matters on a
CPU: row chunks alone would add a full (V, C) float32 partial weight gradient per chunk. Label
logits are gathered with a clamped column and a ``where`` rather than ``nonzero``, so no tile
waits for the host on CUDA. On CPU ``nonzero`` measured faster (2 vs 7 ms per pass over 99 tiles
of 4096 rows) but that is under 1% of the tiles' GEMMs, so one code path serves both.

Triton path (``backend="triton"``; ``auto`` on CUDA). Active rows are compacted *on the device*
(cumsum + scatter into a list padded to the static bound B*T, the count a device scalar; their
hidden states gathered into one (B*T, C) buffer), and every kernel reads the count and exits
early past it: nothing waits for the host, and row blocks hold only active rows. (Skipping
inactive rows inside the kernel instead would leave row blocks half empty at every prompt/answer
boundary and still spend tensor-core work on them.) Kernels:

- ``_logits_kernel``: program = (block of BLOCK_M rows, split of the vocabulary). For each
  (BLOCK_M x BLOCK_V) tile it runs the K loop over C with ``tl.dot`` into a float32 accumulator,
  then, by mode: folds the tile into a float32 online log-sum-exp and label logit (forward: the
  logits never leave registers and stay float32, a little more exact than the oracle under
  autocast, which rounds them to bf16); writes ``dlogits = g * (onehot - softmax)`` from the
  forward's row statistics into a scratch buffer of a bounded number of rows (backward: the
  recompute); or keeps the logits, rounded to the compute dtype, in that scratch and takes the
  statistics of exactly the kept values (the pair op). The vocabulary splits' partial statistics
  are merged by torch (max, then rescaled sums): deterministic, no atomics.
- ``_dlogits_kernel``: kept logits -> ``g * (onehot - exp(z - m - logsum))`` in place.
- ``_grad_hidden_kernel`` / ``_grad_weight_kernel``: the two gradient GEMMs over the dlogits of
  one row chunk: grad_h = dl @ W with a vocabulary split (partials summed by torch), and
  grad_W[v-block, c-block] += dl[:, v-block].T @ h looping over the chunk's rows: the layout Cut
  Cross-Entropy's backward has, without its atomics. Every output tile has one writer, so results
  are identical run to run; the (rows x V) scratch is the price, bounded by ``SCRATCH_BYTES``
  through row chunks (4096 rows at V = 50304 in bf16 = 412 MB).

Arithmetic intensity (bf16, C = 768, V = 50304, per logit of an active row). Forward: 2C = 1536
flops and no logit traffic at all. Operands stream through L2: a (BM x BV) tile over the K loop
reads (BM + BV) x C bf16 for 2 BM BV C flops, BM BV / (BM + BV) flops per L2 byte (43 for the
128 x 64 tiles of sm_80/89, 64 for sm_90's 128 x 128); DRAM sees W (77 MB) about once per wave
of row blocks, since the programs of one vocabulary split walk W in step (~4000 flops per DRAM
byte at 4096 active rows). Backward: 3 GEMMs = 6C = 4608 flops against ~6 bytes of scratch DRAM
traffic (write dl 2, read it in each gradient GEMM 2 + 2; the C blocks are the innermost program
id, so the programs sharing a dl tile run together and hit L2): ~770 flops/byte. Ridge points
(dense bf16 / DRAM bandwidth): RTX 4090 165 TFLOP/s / 1.0 TB/s = 164 flops/byte, A100 312 / 2.0
= 156, H100 SXM 989 / 3.35 = 295. Expected bound: tensor-core compute on every target; in
practice the GEMM efficiency of these tiles (the best fused lm_head kernels reach 65-75% of
peak), less one exp per logit per pass on the SFU.

Precision: matmuls run in the hidden states' dtype, or in the autocast dtype when autocast is on
for the device (the trainer calls this under ``torch.autocast(..., dtype=torch.bfloat16)``, where
the final LayerNorm output is float32). Log-sum-exp and every accumulation across tiles and row
chunks are float32. float32 operands use IEEE ``tl.dot`` unless torch allows TF32 matmuls.
Returned gradients have the dtype of ``hidden`` and ``weight``.
"""
from __future__ import annotations

import torch

from .logprob import HAS_TRITON, DtypeError, _check_backend, check_inputs, shifted_rows

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

# ----------------------------------------------------------------------------- torch path constants
# float32 scratch budget of one (rows x vocabulary) logits tile, forward / backward (bytes). Small
# enough that the op's buffers stay under a tenth of the float32 (B, T, V) logits at the bench
# shapes (bench/kernels.py reports it); large enough that each tile is a well-shaped GEMM and a
# pass is a few dozen ops, not hundreds. Measured at 8x1024x50304, C=768, bf16, 2 threads, other
# processes competing for the cores (medians of 3, interleaved): 8 MB 8.6-16 s, 16 MB 14 s, 32 MB
# 2.9-8 s, 64 MB 3.2 s; matmul + fused logits op 7.8-16 s.
FWD_TILE_BYTES = 32 * 2**20
BWD_TILE_BYTES = 32 * 2**20
# Rows per super-chunk. Forward: the lm_head weight is cast (under autocast) once per super-chunk.
# Backward: a bf16 weight gradient needs a float32 accumulator only when there are several.
MAX_ROWS = 8192
# ----------------------------------------------------------------------------- Triton constants
# Bytes of (rows x V) logits scratch one Triton row chunk may hold in the backward / pair op.
SCRATCH_BYTES = 512 * 2**20
# dtypes the lm_head operands may have (float64 has no tensor-core path and no use here)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- validation, dtypes


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype when autocast is on for the device, else hidden's."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                        masks: list[torch.Tensor]) -> None:
    """Shape/dtype/device/range checks of the linear ops, the same for every backend.

    ``hidden`` (B, T, C), ``weight`` (V, C), ``ids`` and every mask (B, T)."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, C), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be (V, C) with C = hidden.shape[-1] = {hidden.shape[2]}, "
                         f"got shape {tuple(weight.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in DTYPES:
            raise DtypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise DtypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype "
                         "(or run under torch.autocast, which casts both)")
    if weight.device != hidden.device:
        raise ValueError(f"hidden and weight must be on one device, got {hidden.device}, {weight.device}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    # check_inputs only reads the shape and V of its first argument: a stride-0 stand-in is free
    fake = hidden.new_empty(()).expand(*hidden.shape[:2], weight.shape[0])
    check_inputs(fake, ids, masks[0], shift=True, what="hidden @ weight.T")  # ids' range: once
    for mask in masks[1:]:
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal ids shape {tuple(ids.shape)}")
        if mask.is_complex():
            raise DtypeError(f"mask must be bool or real, got {mask.dtype}")
        if mask.device != hidden.device:
            raise ValueError(f"masks must be on hidden's device {hidden.device}, got {mask.device}")


# --------------------------------------------------------------------------- torch path


def _tiles(n: int, V: int, budget: int):
    """(r0, r1, v0, v1): row super-chunks, each swept over vocabulary tiles of ``budget`` float32 bytes."""
    rstep = max(1, min(n, MAX_ROWS))
    for r0 in range(0, n, rstep):
        r1 = min(n, r0 + rstep)
        vstep = max(64, budget // (4 * (r1 - r0)) // 64 * 64)
        for v0 in range(0, V, vstep):
            yield r0, r1, v0, min(V, v0 + vstep)


def _label_cols(lab: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each row's label falls in vocabulary tile [v0, v1), and its (clamped) column there."""
    return (lab >= v0) & (lab < v1), (lab - v0).clamp(0, v1 - v0 - 1)[:, None]


class _TileBuffers:
    """Scratch for the (rows x vocabulary) tiles of one pass, allocated once and reused by every
    tile: a fresh multi-megabyte temporary per tile costs page faults (measured: the elementwise
    passes over 2048 x 50304 logits 3x slower), and a tile is a few hundred microseconds of work."""

    def __init__(self, tiles, C: int, wdtype, cdtype, device, grads: bool = False):
        most = max(((r1 - r0) * (v1 - v0) for r0, r1, v0, v1 in tiles), default=0)
        rows = max((r1 - r0 for r0, r1, _, _ in tiles), default=0)
        cols = max((v1 - v0 for _, _, v0, v1 in tiles), default=0)
        f32 = torch.float32
        self.zf = torch.empty(most, dtype=f32, device=device)
        self.zc = torch.empty(most, dtype=cdtype, device=device) if cdtype != f32 else None
        self.w = torch.empty(cols * C, dtype=cdtype, device=device) if wdtype != cdtype else None
        self.gh = torch.empty(rows * C, dtype=cdtype, device=device) if grads else None
        self.gw = torch.empty(cols * C, dtype=cdtype, device=device) if grads else None

    @staticmethod
    def view(buf, rows: int, cols: int, offset: int = 0):
        return buf[offset:offset + rows * cols].view(rows, cols)

    def weight(self, weight, v0: int, v1: int):
        """weight[v0:v1] in the compute dtype (cast into the buffer, or a view if no cast is needed)."""
        if self.w is None:
            return weight[v0:v1]
        return self.view(self.w, v1 - v0, weight.shape[1]).copy_(weight[v0:v1])

    def logits(self, h, wt):
        """float32 h @ wt.T computed in the compute dtype (rounded like any matmul output)."""
        r, v = h.shape[0], wt.shape[0]
        zf = self.view(self.zf, r, v)
        if self.zc is None:
            return torch.mm(h, wt.t(), out=zf)
        return zf.copy_(torch.mm(h, wt.t(), out=self.view(self.zc, r, v)))


def kept_offsets(tiles) -> list[int]:
    """Start of each tile in a tile-major buffer (tile after tile, each contiguous)."""
    offsets, at = [], 0
    for r0, r1, v0, v1 in tiles:
        offsets.append(at)
        at += (r1 - r0) * (v1 - v0)
    return offsets


def torch_stats(h, weight, lab, cdtype, tiles, keep=None, buf=None):
    """float32 (m, logsum, label logit) per row of h @ weight.T: an online log-sum-exp over the
    vocabulary ``tiles``.

    ``keep``: a flat buffer (compute dtype) that receives, tile-major (``kept_offsets``), each
    tile's ``exp(z - running max)``; then a 4th result lists each tile's running max per row. With
    the final statistics these give the softmax by one multiply, so a backward reads them instead
    of recomputing the logits and their exponentials. In bf16 they carry a relative rounding of
    2^-9, the rounding the dlogits get anyway before the gradient GEMMs (and less than a bf16 logit
    passes on to its softmax: |z| * 2^-9). ``buf``: tile buffers to reuse (default: new ones)."""
    n, dev = h.shape[0], h.device
    m = torch.full((n,), -float("inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(n, dtype=torch.float32, device=dev)
    zlab = torch.zeros(n, dtype=torch.float32, device=dev)
    buf = buf or _TileBuffers(tiles, h.shape[1], weight.dtype, cdtype, dev)
    offsets = kept_offsets(tiles) if keep is not None else None
    maxima = []
    for i, (r0, r1, v0, v1) in enumerate(tiles):
        z = buf.logits(h[r0:r1], buf.weight(weight, v0, v1))   # float32, edited in place
        hit, col = _label_cols(lab[r0:r1], v0, v1)
        zlab[r0:r1] += torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
        m_old = m[r0:r1]
        m_new = torch.maximum(m_old, z.amax(-1))
        s[r0:r1] = s[r0:r1] * torch.exp(m_old - m_new) + z.sub_(m_new[:, None]).exp_().sum(-1)
        m[r0:r1] = m_new
        if keep is not None:
            _TileBuffers.view(keep, r1 - r0, v1 - v0, offsets[i]).copy_(z)
            maxima.append(m_new)
    # max and log-sum kept apart, as in logprob.py: z - max is exact at |z| ~ 1e4, z - lse is not
    if keep is not None:
        return m, s.log(), zlab, maxima
    return m, s.log(), zlab


def torch_grads(h, weight, lab, g, m, logsum, cdtype, tiles, *, need_h=True, gw=None, kept=None,
                kept_max=None, buf=None):
    """grad_h (n, C) float32 (or None) and the weight gradient of the row losses g * log p(label):
    per tile ``dl = g * (onehot - softmax)``, ``grad_h += dl @ W[v0:v1]``, ``gw[v0:v1] += dl.T @ h``.
    The softmax is recomputed from the logits, or read from ``kept`` / ``kept_max`` (filled by
    ``torch_stats``): one multiply per element instead of a GEMM and an exp. ``gw``: the accumulator
    to add into (float32, or the tiles' dtype), None to skip the weight gradient. ``buf``: tile
    buffers to reuse (made with ``grads=True``; default: new ones)."""
    n, C, dev = h.shape[0], h.shape[1], h.device
    gh = torch.zeros(n, C, dtype=torch.float32, device=dev) if need_h else None
    buf = buf or _TileBuffers(tiles, C, weight.dtype, cdtype, dev, grads=True)
    offsets = kept_offsets(tiles) if kept is not None else None
    for i, (r0, r1, v0, v1) in enumerate(tiles):
        hc, gc = h[r0:r1], g[r0:r1]
        wt = buf.weight(weight, v0, v1)
        hit, col = _label_cols(lab[r0:r1], v0, v1)
        if kept is None:
            dl = buf.logits(hc, wt)
            dl.sub_(m[r0:r1, None]).sub_(logsum[r0:r1, None]).exp_().mul_(-gc[:, None])
            dl.scatter_add_(1, col, torch.where(hit, gc, 0.0)[:, None])   # + g at the label
            if cdtype != torch.float32:
                dl = _TileBuffers.view(buf.zc, r1 - r0, v1 - v0).copy_(dl)
        else:
            dl = _kept_dlogits(_TileBuffers.view(kept, r1 - r0, v1 - v0, offsets[i]),
                               -gc * torch.exp((kept_max[i] - m[r0:r1]) - logsum[r0:r1]), gc, hit, col, buf)
        if need_h:
            gh[r0:r1] += torch.mm(dl, wt, out=_TileBuffers.view(buf.gh, r1 - r0, C))
        if gw is not None:
            if gw.dtype == dl.dtype:
                gw[v0:v1].addmm_(dl.t(), hc)  # no (tile, C) temporary
            else:
                gw[v0:v1] += torch.mm(dl.t(), hc, out=_TileBuffers.view(buf.gw, v1 - v0, C))
    return gh


def _kept_dlogits(p, scale, g, hit, col, buf: _TileBuffers):
    """dlogits of a kept tile of exponentials, in its dtype: ``p * scale`` (scale = -g / the row's
    normalizer, rounded to the tile's dtype: a 2^-9 relative rounding in bf16, that of the result
    itself) in one pass, then the label entries ``g + scale * p`` set from float32. Measured on
    CPU 4x faster than widening the tile to float32 and back (mixed-dtype and bf16 scatter/gather
    ops take slow paths there, hence the flat index)."""
    r, v = p.shape
    out = buf.zf if p.dtype == torch.float32 else buf.zc
    dl = torch.mul(p, scale.to(p.dtype)[:, None], out=_TileBuffers.view(out, r, v))
    flat = torch.arange(r, device=p.device) * v + col.squeeze(1)
    at_label = torch.where(hit, g + scale * p.view(-1)[flat].float(), dl.view(-1)[flat].float())
    dl.view(-1)[flat] = at_label.to(dl.dtype)
    return dl


class LinearSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, mask, cdtype):
        B, T, C = hidden.shape
        V = weight.shape[0]
        labels, coef = shifted_rows(ids, mask)
        rows = torch.nonzero(coef.reshape(-1)).flatten()  # one host sync per call (the tile loop's bounds)
        lab, cf = labels.reshape(-1)[rows], coef.reshape(-1)[rows]
        h = hidden.reshape(B * T, C).index_select(0, rows).to(cdtype)
        # the weight is cast to the matmul dtype tile by tile, never as a whole (V, C) copy
        m, logsum, zlab = torch_stats(h, weight, lab, cdtype, list(_tiles(rows.numel(), V, FWD_TILE_BYTES)))
        tok = (zlab - m) - logsum
        out = torch.zeros(B, dtype=torch.float32, device=hidden.device)
        out.index_add_(0, rows // T, tok * cf)
        ctx.save_for_backward(h, weight, rows, lab, cf, m, logsum)
        ctx.meta = (B, T, C, hidden.dtype, cdtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, rows, lab, cf, m, logsum = ctx.saved_tensors
        B, T, C, hdtype, cdtype = ctx.meta
        V = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dev = h.device
        n = rows.numel()
        with torch.autocast(dev.type, enabled=False):
            g = grad_out.float()[rows // T] * cf
            # the returned weight gradient doubles as the accumulator unless it is bf16 and several
            # row super-chunks add into it (then float32, converted once at the end)
            gw_dtype = torch.float32 if n > MAX_ROWS else weight.dtype
            gw = torch.zeros(V, C, dtype=gw_dtype, device=dev) if need_w else None
            gh = torch_grads(h, weight, lab, g, m, logsum, cdtype, list(_tiles(n, V, BWD_TILE_BYTES)),
                             need_h=need_h, gw=gw)
        grad_h = grad_w = None
        if need_h:
            grad_h = torch.zeros(B * T, C, dtype=hdtype, device=dev)
            grad_h.index_copy_(0, rows, gh.to(hdtype))
            grad_h = grad_h.view(B, T, C)
        if need_w:
            grad_w = gw.to(weight.dtype)
        return grad_h, grad_w, None, None, None


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:
    # The kernels sit under this guard because their annotations need triton.language.
    @triton.jit
    def _mma(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
        """acc + a @ b. The interpreter multiplies bfloat16 operands' raw bit patterns
        (triton-lang/triton#11584), so there they go in as float32: exact for 16-bit inputs into a
        float32 accumulator, i.e. the tensor-core result."""
        if INTERPRETED:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _round(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
        """float32 x -> dtype, rounding to nearest even as GPUs do. The interpreter truncates
        float32 -> bfloat16, so there the bits are rounded by hand first (the cast is then exact)."""
        if INTERPRETED:
            if dtype == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _logits_kernel(h_ptr, w_ptr, lab_ptr, n_ptr, g_ptr, stats_ptr, z_ptr, part_ptr,
                       C, V, n_max, stride_h, stride_w, stride_z, tiles_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, STATS: tl.constexpr, OUT: tl.constexpr,
                       PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
        """Logit tiles h[:n] @ w.T (h: the compacted active rows; n read on the device) over one
        vocabulary split.

        STATS: partial (max, sum of exp, label logit) per row -> part[split, 0..2, row].
        OUT = 1: logits -> z[row]; OUT = 2: g * (onehot - softmax) from the final row statistics
        (m, logsum) -> z[row]."""
        n = tl.load(n_ptr)
        m0 = tl.program_id(0) * BLOCK_M
        if m0 >= n:
            return
        split = tl.program_id(1)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n
        labels = tl.load(lab_ptr + offs_m, mask=row_ok, other=-1)
        rm, rv, offs_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_V), tl.arange(0, BLOCK_K)
        t0 = split * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
        # 64-bit block bases, 32-bit offsets inside a tile: half the address registers
        a_ptrs = h_ptr + m0.to(tl.int64) * stride_h + (rm[:, None] * stride_h + offs_k[None, :])
        b_ptrs = w_ptr + (t0 * BLOCK_V).to(tl.int64) * stride_w + (rv[None, :] * stride_w + offs_k[:, None])
        z_ptrs = z_ptr + m0.to(tl.int64) * stride_z + t0 * BLOCK_V + (rm[:, None] * stride_z + rv[None, :])
        if OUT == 2:
            g = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0)
            row_m = tl.load(stats_ptr + offs_m, mask=row_ok, other=0.0)
            row_logsum = tl.load(stats_ptr + n_max + offs_m, mask=row_ok, other=0.0)
        m_run = tl.full([BLOCK_M], -float("inf"), tl.float32)
        s_run = tl.zeros([BLOCK_M], tl.float32)
        z_lab = tl.zeros([BLOCK_M], tl.float32)
        for t in range(t0, t1):
            offs_v = t * BLOCK_V + tl.arange(0, BLOCK_V)
            v_ok = offs_v < V
            acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
            for k0 in range(0, C, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0)
                    b = tl.load(b_ptrs + k0, mask=v_ok[None, :], other=0.0)
                else:
                    k_ok = offs_k < C - k0
                    a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(b_ptrs + k0, mask=v_ok[None, :] & k_ok[:, None], other=0.0)
                acc = _mma(a, b, acc, PRECISION, INTERPRETED)
            x = acc
            if OUT == 1:  # kept in the compute dtype: the statistics describe the kept values
                z_kept = _round(acc, z_ptr.dtype.element_ty, INTERPRETED)
                tl.store(z_ptrs, z_kept, mask=row_ok[:, None] & v_ok[None, :])
                x = z_kept.to(tl.float32)
            is_label = offs_v[None, :] == labels[:, None]
            if STATS:
                x = tl.where(v_ok[None, :], x, -float("inf"))
                m_new = tl.maximum(m_run, tl.max(x, axis=1))
                s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
                m_run = m_new
                z_lab += tl.sum(tl.where(is_label, x, 0.0), axis=1)
            if OUT == 2:
                p = tl.exp((x - row_m[:, None]) - row_logsum[:, None])
                dl = g[:, None] * (tl.where(is_label, 1.0, 0.0) - p)
                tl.store(z_ptrs, _round(dl, z_ptr.dtype.element_ty, INTERPRETED),
                         mask=row_ok[:, None] & v_ok[None, :])
            b_ptrs += BLOCK_V * stride_w
            z_ptrs += BLOCK_V
        if STATS:
            part = part_ptr + split * 3 * n_max + offs_m
            tl.store(part, m_run, mask=row_ok)
            tl.store(part + n_max, s_run, mask=row_ok)
            tl.store(part + 2 * n_max, z_lab, mask=row_ok)

    @triton.jit
    def _dlogits_kernel(z_ptr, lab_ptr, n_ptr, g_ptr, stats_ptr, V, n_max, stride_z,
                        BLOCK_V: tl.constexpr, INTERPRETED: tl.constexpr):
        """In place, row r < n of z: logits -> g * (onehot(label) - exp(z - m - logsum))."""
        row = tl.program_id(0)
        if row >= tl.load(n_ptr):
            return
        g = tl.load(g_ptr + row)
        m = tl.load(stats_ptr + row)
        logsum = tl.load(stats_ptr + n_max + row)
        label = tl.load(lab_ptr + row)
        z_row = z_ptr + row.to(tl.int64) * stride_z
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
            dl = g * (tl.where(cols == label, 1.0, 0.0) - tl.exp((x - m) - logsum))
            tl.store(z_row + cols, _round(dl, z_ptr.dtype.element_ty, INTERPRETED), mask=ok)

    @triton.jit
    def _grad_hidden_kernel(dl_ptr, w_ptr, n_ptr, out_ptr, C, V, n_max, stride_dl, stride_w,
                            tiles_per_split, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
        """out[split, rows, c-block] = dl[rows, split's vocabulary] @ w[split's vocabulary, c-block]."""
        n = tl.load(n_ptr)
        m0 = tl.program_id(1) * BLOCK_M
        if m0 >= n:
            return
        split = tl.program_id(2)
        c0 = tl.program_id(0) * BLOCK_C
        rm, rv, rc = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_V), tl.arange(0, BLOCK_C)
        row_ok = m0 + rm < n
        c_ok = c0 + rc < C
        t0 = split * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
        a_ptrs = dl_ptr + m0.to(tl.int64) * stride_dl + t0 * BLOCK_V + (rm[:, None] * stride_dl + rv[None, :])
        b_ptrs = w_ptr + (t0 * BLOCK_V).to(tl.int64) * stride_w + c0 + (rv[:, None] * stride_w + rc[None, :])
        acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for t in range(t0, t1):
            v_ok = t * BLOCK_V + rv < V
            a = tl.load(a_ptrs, mask=row_ok[:, None] & v_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=v_ok[:, None] & c_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, INTERPRETED)
            a_ptrs += BLOCK_V
            b_ptrs += BLOCK_V * stride_w
        out = out_ptr + (split * n_max + m0).to(tl.int64) * C + c0 + (rm[:, None] * C + rc[None, :])
        tl.store(out, acc, mask=row_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _grad_weight_kernel(dl_ptr, h_ptr, n_ptr, gw_ptr, C, V, stride_dl, stride_h,
                            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                            PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
        """gw[v-block, c-block] += dl[:n, v-block].T @ h[:n, c-block] (gw float32, one writer)."""
        n = tl.load(n_ptr)
        if n == 0:
            return
        c0 = tl.program_id(0) * BLOCK_C
        v0 = tl.program_id(1) * BLOCK_V
        rm, rv, rc = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_V), tl.arange(0, BLOCK_C)
        v_ok = v0 + rv < V
        c_ok = c0 + rc < C
        a_ptrs = dl_ptr + v0 + (rm[None, :] * stride_dl + rv[:, None])
        b_ptrs = h_ptr + c0 + (rm[:, None] * stride_h + rc[None, :])
        acc = tl.zeros([BLOCK_V, BLOCK_C], tl.float32)
        for m0 in range(0, n, BLOCK_M):
            row_ok = m0 + rm < n
            a = tl.load(a_ptrs, mask=v_ok[:, None] & row_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, INTERPRETED)
            a_ptrs += BLOCK_M * stride_dl
            b_ptrs += BLOCK_M * stride_h
        gw = gw_ptr + v0.to(tl.int64) * C + c0 + (rv[:, None] * C + rc[None, :])
        ok = v_ok[:, None] & c_ok[None, :]
        tl.store(gw, tl.load(gw, mask=ok, other=0.0) + acc, mask=ok)


# --------------------------------------------------------------------------- Triton tile configs

# Per target (compute capability) and operand size: tile shapes, warps and pipeline stages, chosen
# so that every kernel compiles with zero spills and its shared memory (stages x operand tiles)
# fits the per-block limit (sm_80 163 KB, sm_89 99 KB, sm_90 227 KB); ``python -m fastdpo.kernels.aot``
# prints the resulting registers, shared memory and spills. A (BM x BN) output tile over a K loop
# reads (BM + BN) x K operands for 2 BM BN K flops: BM BN / (BM + BN) flops per byte of L2 traffic
# (bf16), 43 for 128 x 64, 64 for 128 x 128. The logits kernel keeps an online softmax next to its
# float32 accumulator, so its tiles are the largest that stay under 255 registers without spills:
# 128 x 64 on sm_80/89, 128 x 128 on sm_90 (whose wgmma accumulators cost fewer registers).
_GPU_TILES = {
    # (kernel, 16-bit operands?) -> {cc: config}
    ("logits", True): {
        80: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=4),
        89: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=3),
        90: dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4)},
    ("logits", False): {
        80: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=16, num_warps=8, num_stages=3),
        89: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=3),
        90: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=3)},
    ("dlogits", True): {cc: dict(BLOCK_V=2048, num_warps=8, num_stages=1) for cc in (80, 89, 90)},
    ("dlogits", False): {cc: dict(BLOCK_V=2048, num_warps=8, num_stages=1) for cc in (80, 89, 90)},
    ("grad_hidden", True): {
        80: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_C=128, num_warps=8, num_stages=4),
        89: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_C=128, num_warps=8, num_stages=3),
        90: dict(BLOCK_M=128, BLOCK_V=64, BLOCK_C=128, num_warps=8, num_stages=4)},
    ("grad_hidden", False): {
        80: dict(BLOCK_M=128, BLOCK_V=32, BLOCK_C=64, num_warps=8, num_stages=3),
        89: dict(BLOCK_M=64, BLOCK_V=32, BLOCK_C=64, num_warps=4, num_stages=3),
        90: dict(BLOCK_M=128, BLOCK_V=32, BLOCK_C=64, num_warps=8, num_stages=3)},
    ("grad_weight", True): {
        80: dict(BLOCK_M=64, BLOCK_V=128, BLOCK_C=128, num_warps=8, num_stages=3),
        89: dict(BLOCK_M=64, BLOCK_V=128, BLOCK_C=128, num_warps=8, num_stages=3),
        90: dict(BLOCK_M=64, BLOCK_V=128, BLOCK_C=128, num_warps=8, num_stages=4)},
    ("grad_weight", False): {
        80: dict(BLOCK_M=16, BLOCK_V=128, BLOCK_C=64, num_warps=8, num_stages=3),
        89: dict(BLOCK_M=32, BLOCK_V=64, BLOCK_C=64, num_warps=4, num_stages=3),
        90: dict(BLOCK_M=32, BLOCK_V=128, BLOCK_C=64, num_warps=8, num_stages=3)},
}
# Under the interpreter (CPU tensors): small tiles, so that test shapes span several of each.
INTERPRETER_TILES = {
    "logits": dict(BLOCK_M=16, BLOCK_V=64, BLOCK_K=16),
    "dlogits": dict(BLOCK_V=64),
    "grad_hidden": dict(BLOCK_M=16, BLOCK_V=32, BLOCK_C=16),
    "grad_weight": dict(BLOCK_M=16, BLOCK_V=32, BLOCK_C=16),
}


def tile_config(kernel: str, cc: int | None, dtype: torch.dtype) -> dict:
    """Launch config of ``kernel`` for compute capability ``cc`` (None: the interpreter)."""
    if cc is None:
        return dict(INTERPRETER_TILES[kernel])
    table = _GPU_TILES[(kernel, dtype != torch.float32)]
    # the nearest listed architecture at or below cc (sm_86 -> sm_80 tiles, sm_100 -> sm_90)
    known = [c for c in sorted(table) if c <= cc] or [min(table)]
    return dict(table[known[-1]])


def _cc(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _programs_wanted(device: torch.device) -> int:
    """Programs that fill the device a few times over (the interpreter: enough to split)."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _splits(tiles: int, row_blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split) of a vocabulary loop, so that row_blocks x splits programs fill the
    device; every split gets at least one tile."""
    want = max(1, min(tiles, -(-_programs_wanted(device) // max(1, row_blocks))))
    per = -(-tiles // want)
    return -(-tiles // per), per


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _interpreted() -> bool:
    return not isinstance(_logits_kernel, JITFunction)


def _dot_args(dtype: torch.dtype) -> dict:
    return dict(PRECISION=_precision(dtype), INTERPRETED=_interpreted())


def _launch_opts(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}


def _blocks(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k.startswith("BLOCK")}


# --------------------------------------------------------------------------- Triton launchers


def compact_rows(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, n): indices of the True entries of ``active`` (N,), in order, then N (a dummy row)
    up to length N; n = their count as a (1,) int32 device tensor. cumsum + scatter: no host sync."""
    N = active.numel()
    dev = active.device
    pos = torch.cumsum(active, 0) - 1
    idx = torch.full((N + 1,), N, dtype=torch.int64, device=dev)
    idx.scatter_(0, torch.where(active, pos, N), torch.arange(N, device=dev))
    n = (pos[-1:] + 1) if N else torch.zeros(1, dtype=torch.int64, device=dev)
    return idx[:N], n.to(torch.int32)


def triton_logits(h, w, lab, n, n_max: int, *, stats: bool, out=None, g=None, row_stats=None):
    """Run ``_logits_kernel`` over rows 0..n-1 (at most n_max) of the compacted hidden rows ``h``.

    ``stats``: returns (m, logsum, label logit), each (n_max,) float32 (rows >= n: 0, 0, 0).
    ``out``: (n_max', V) scratch receiving logits, or dlogits when ``g`` and ``row_stats``
    ((2, n_max) float32: max, log-sum) are given."""
    C, V = h.shape[1], w.shape[0]
    cfg = tile_config("logits", _cc(h.device), h.dtype)
    bm, bv = cfg["BLOCK_M"], cfg["BLOCK_V"]
    row_blocks = triton.cdiv(n_max, bm)
    splits, per = _splits(triton.cdiv(V, bv), row_blocks, h.device) if stats else (triton.cdiv(V, bv), 1)
    part = torch.zeros(splits, 3, n_max, dtype=torch.float32, device=h.device) if stats else h
    mode = 0 if out is None else (2 if g is not None else 1)
    z = h if out is None else out
    if row_blocks:
        _logits_kernel[(row_blocks, splits)](
            h, w, lab, n, g if g is not None else h, row_stats if row_stats is not None else h, z, part,
            C, V, n_max, h.stride(0), w.stride(0), z.stride(0), per, **_blocks(cfg),
            EVEN_K=C % cfg["BLOCK_K"] == 0, STATS=stats, OUT=mode, **_dot_args(h.dtype), **_launch_opts(cfg))
    if not stats:
        return None
    # merge the vocabulary splits: global max, then each split's sum rescaled to it
    pm, ps, pl = part[:, 0], part[:, 1], part[:, 2]
    m = pm.amax(0)
    s = (ps * torch.exp(pm - m)).sum(0)
    s = torch.where(s > 0, s, 1.0)  # rows >= n: untouched zeros
    return m, s.log(), pl.sum(0)


def triton_dlogits(z, lab, n, g, row_stats, n_max: int) -> None:
    """In place: rows 0..n-1 of the kept logits z -> dlogits."""
    cfg = tile_config("dlogits", _cc(z.device), z.dtype)
    if n_max:
        _dlogits_kernel[(n_max,)](z, lab, n, g, row_stats, z.shape[1], n_max, z.stride(0),
                                  **_blocks(cfg), INTERPRETED=_interpreted(), **_launch_opts(cfg))


def triton_grad_hidden(dl, w, n, n_max: int) -> torch.Tensor:
    """(n_max, C) float32 = dl[:n] @ w (rows >= n: unspecified)."""
    C, V = w.shape[1], w.shape[0]
    cfg = tile_config("grad_hidden", _cc(w.device), w.dtype)
    bm, bv, bc = cfg["BLOCK_M"], cfg["BLOCK_V"], cfg["BLOCK_C"]
    row_blocks, c_blocks = triton.cdiv(n_max, bm), triton.cdiv(C, bc)
    splits, per = _splits(triton.cdiv(V, bv), row_blocks * c_blocks, w.device)
    part = torch.empty(splits, n_max, C, dtype=torch.float32, device=w.device)
    if row_blocks:
        _grad_hidden_kernel[(c_blocks, row_blocks, splits)](
            dl, w, n, part, C, V, n_max, dl.stride(0), w.stride(0), per, **_blocks(cfg),
            **_dot_args(w.dtype), **_launch_opts(cfg))
    return part.sum(0) if splits > 1 else part[0]


def triton_grad_weight(dl, h, n, gw) -> None:
    """gw (V, C) float32 += dl[:n].T @ h[:n] (h: the compacted hidden rows dl belongs to)."""
    V, C = gw.shape
    cfg = tile_config("grad_weight", _cc(h.device), h.dtype)
    grid = (triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _grad_weight_kernel[grid](dl, h, n, gw, C, V, dl.stride(0), h.stride(0), **_blocks(cfg),
                              **_dot_args(h.dtype), **_launch_opts(cfg))


def scratch_rows(V: int, dtype: torch.dtype, device: torch.device, bound: int) -> int:
    """Rows of a (rows, V) scratch of ``dtype`` within SCRATCH_BYTES (a whole row block at least)."""
    bm = tile_config("logits", _cc(device), dtype)["BLOCK_M"]
    rows = SCRATCH_BYTES // (V * torch.finfo(dtype).bits // 8) // bm * bm
    return max(bm, min(rows, bound))


def operands(hidden2: torch.Tensor, weight: torch.Tensor, cdtype: torch.dtype):
    """hidden (N, C) and weight (V, C) in the compute dtype, unit stride along C (copies if needed)."""
    return hidden2.to(cdtype).contiguous(), weight.to(cdtype).contiguous()


def gather_rows(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h[idx] with the dummy index N (padding past the device-side count) reading row 0 instead."""
    return h.index_select(0, idx.clamp(max=h.shape[0] - 1))


class TritonLinearSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, mask, cdtype):
        B, T, C = hidden.shape
        N = B * T
        dev = hidden.device
        labels, coef = shifted_rows(ids, mask)
        idx, n = compact_rows(coef.reshape(-1) != 0)
        # per compacted row; the dummy index N reads a padding label 0 and coefficient 0
        lab = torch.cat([labels.reshape(-1), labels.new_zeros(1)])[idx].to(torch.int32)
        cf = torch.cat([coef.reshape(-1), coef.new_zeros(1)])[idx]
        h, w = operands(hidden.reshape(N, C), weight, cdtype)
        m, logsum, zlab = triton_logits(gather_rows(h, idx), w, lab, n, N, stats=True)
        tok = torch.zeros(N + 1, dtype=torch.float32, device=dev)
        tok.index_copy_(0, idx, cf * ((zlab - m) - logsum))
        out = tok[:N].view(B, T).sum(-1)   # a (B, T) sum, not atomics: the same bits every run
        ctx.save_for_backward(hidden, weight, idx, n, lab, cf, torch.stack([m, logsum]))
        ctx.cdtype = cdtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, idx, n, lab, cf, row_stats = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        B, T, C = hidden.shape
        N, V = B * T, weight.shape[0]
        dev = hidden.device
        h, w = operands(hidden.reshape(N, C), weight, ctx.cdtype)
        g = torch.cat([grad_out.float(), grad_out.new_zeros(1, dtype=torch.float32)])[idx // T] * cf
        gh = torch.zeros(N + 1, C, dtype=hidden.dtype, device=dev) if need_h else None
        gw = torch.zeros(V, C, dtype=torch.float32, device=dev) if need_w else None
        R = scratch_rows(V, h.dtype, dev, N)
        scratch = torch.empty(R, V, dtype=h.dtype, device=dev)
        for r0 in range(0, N, R):
            # compacted rows r0.. of this chunk; how many are real is only known on the device
            r1 = min(N, r0 + R)
            n_c = (n - r0).clamp(0, r1 - r0).to(torch.int32)
            idx_c = idx[r0:r1]
            hc = gather_rows(h, idx_c)
            st_c = row_stats[:, r0:r1].contiguous()
            triton_logits(hc, w, lab[r0:r1], n_c, r1 - r0, stats=False, out=scratch, g=g[r0:r1],
                          row_stats=st_c)
            if need_h:
                gh.index_copy_(0, idx_c, triton_grad_hidden(scratch, w, n_c, r1 - r0).to(hidden.dtype))
            if need_w:
                triton_grad_weight(scratch, hc, n_c, gw)
        grad_h = gh[:N].view(B, T, C) if need_h else None
        grad_w = gw.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None


# --------------------------------------------------------------------------- public API


def linear_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                             mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(B,) float32 ``sequence_logprobs(hidden @ weight.T, ids, mask)`` without the (B, T, V) logits.

    ``hidden`` (B, T, C), ``weight`` (V, C); differentiable w.r.t. both. ``backend``: ``auto``
    (Triton on CUDA tensors, torch elsewhere), ``triton`` (on CPU tensors: the interpreter),
    ``torch`` (chunked GEMMs: cuBLAS/oneDNN), ``reference`` (materializes the logits: the oracle).
    """
    check_linear_inputs(hidden, weight, ids, [mask])
    backend = _check_backend(backend, hidden.device)
    if backend == "reference":
        from . import reference

        return reference.linear_sequence_logprobs(hidden, weight, ids, mask)
    cdtype = compute_dtype(hidden)
    fn = TritonLinearSequenceLogprobs if backend == "triton" else LinearSequenceLogprobs
    with torch.autocast(hidden.device.type, enabled=False):
        return fn.apply(hidden, weight, ids, mask, cdtype)
