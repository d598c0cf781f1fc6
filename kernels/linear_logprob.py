"""``sequence_logprobs(hidden @ weight.T, ids, mask)`` fused with the lm_head matmul.

The (B, T, V) logits never exist. Only rows whose *next* token is a response token (coefficient
``mask[:, t+1] != 0``) are gathered from ``hidden`` and sent through the lm_head at all; prompt and
padding positions are skipped rather than masked after the fact.

Forward: the same (rows x vocabulary) tiles as backward, each ``h_rows @ W[v0:v1].T`` in float32,
folded into an online log-sum-exp (running row max and sum of exponentials, as the Triton kernel
does) and the label logit. Saved for backward: the active rows of ``hidden`` (N_act x C), their
labels, coefficients, row max and log-sum. Nothing of size V. Under autocast the weight is cast to
bf16 one tile at a time, so no (V, C) copy of it exists either.

Backward recomputes logits, tiled over (rows x vocabulary): for a vocabulary block
``W[v0:v1]`` and a super-chunk of rows, ``dlogits = g * coef * (onehot - exp(z - max - logsum))`` gives
``grad_W[v0:v1] = dlogits.T @ h`` in one matmul (the sum over rows happens inside the GEMM's float32
accumulator) and ``grad_h += dlogits @ W[v0:v1]`` into a float32 (N_act x C) buffer. Tiling the
vocabulary in backward matters on this CPU: row-chunking alone would add a full (V, C) float32
partial weight gradient once per chunk, and that add measured slower than the bf16 matmul it
follows (38M-element read-modify-write vs ~7 ms of AMX/AVX512-BF16 GEMM per 166-row chunk at V=50304).

Gradient strategy, chosen by measurement and by what the API allows: *recompute in backward*.
Liger-style gradient-in-forward needs the upstream gradient of each row during forward; it
works for a loss that is a plain sum, but here the output is one log-prob per sequence and DPO's
upstream gradient (sigmoid of the margin between chosen and rejected) is only known after forward.
Storing per-sequence partial weight gradients instead would cost B x V x C floats (2.4 GB for
B=16, V=50304, C=768), far more than the logits themselves. Recompute costs one extra
``h @ W.T`` matmul (4 instead of 3 per active row); the bench measures the total against
matmul + fused op over *all* rows, which prompt skipping usually more than pays for.

Precision: matmuls run in the hidden states' dtype, or in the autocast dtype when autocast is on
for the device (the trainer calls this under ``torch.autocast(..., dtype=torch.bfloat16)``, where
the final LayerNorm output is float32). Log-sum-exp, the weight-gradient accumulation across row
super-chunks and the hidden-gradient accumulation across vocabulary blocks are float32. Returned
gradients have the dtype of ``hidden`` and ``weight``.
"""
import torch

from .logprob import _check_backend, check_inputs, shifted_rows

# float32 scratch budget of one (rows x vocabulary) logits tile, forward / backward (bytes). Small
# enough that every temporary of the op stays under a tenth of the float32 (B, T, V) logits at the
# bench shapes (bench/kernels.py reports it); large enough that each tile is a well-shaped GEMM.
FWD_TILE_BYTES = 8 * 2**20
BWD_TILE_BYTES = 8 * 2**20
# Rows per super-chunk. Forward: the lm_head weight is cast (under autocast) once per super-chunk.
# Backward: a bf16 weight gradient needs a float32 accumulator only when there are several.
MAX_ROWS = 8192


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def _tiles(n: int, V: int, budget: int):
    """(r0, r1, v0, v1): row super-chunks, each swept over vocabulary tiles of ``budget`` float32 bytes."""
    rstep = max(1, min(n, MAX_ROWS))
    for r0 in range(0, n, rstep):
        r1 = min(n, r0 + rstep)
        vstep = max(64, budget // (4 * (r1 - r0)) // 64 * 64)
        for v0 in range(0, V, vstep):
            yield r0, r1, v0, min(V, v0 + vstep)


def _label_hits(lab: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose label falls in vocabulary tile [v0, v1), and that label's column in the tile."""
    hit = ((lab >= v0) & (lab < v1)).nonzero().flatten()
    return hit, lab[hit] - v0


class LinearSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, mask, cdtype):
        B, T, C = hidden.shape
        V = weight.shape[0]
        labels, coef = shifted_rows(ids, mask)
        rows = torch.nonzero(coef.reshape(-1)).flatten()
        lab, cf = labels.reshape(-1)[rows], coef.reshape(-1)[rows]
        h = hidden.reshape(B * T, C).index_select(0, rows).to(cdtype)
        n = rows.numel()
        dev = hidden.device
        # online log-sum-exp over vocabulary tiles: running row max, sum of exp(z - max), label logit.
        # The weight is cast to the matmul dtype tile by tile, never as a whole (V, C) copy.
        m = torch.full((n,), -float("inf"), dtype=torch.float32, device=dev)
        s = torch.zeros(n, dtype=torch.float32, device=dev)
        zlab = torch.zeros(n, dtype=torch.float32, device=dev)
        for r0, r1, v0, v1 in _tiles(n, V, FWD_TILE_BYTES):
            z = (h[r0:r1] @ weight[v0:v1].to(cdtype).t()).float()  # a fresh float32 tile: edited in place
            hit, col = _label_hits(lab[r0:r1], v0, v1)
            zlab[r0 + hit] = z[hit, col]
            m_old = m[r0:r1]
            m_new = torch.maximum(m_old, z.amax(-1))
            s[r0:r1] = s[r0:r1] * torch.exp(m_old - m_new) + z.sub_(m_new[:, None]).exp_().sum(-1)
            m[r0:r1] = m_new
            del z
        # max and log-sum kept apart, as in logprob.py: z - max is exact at |z| ~ 1e4, z - lse is not
        stats = torch.stack([m, s.log()], 1)
        tok = (zlab - m) - stats[:, 1]
        out = torch.zeros(B, dtype=torch.float32, device=dev)
        out.index_add_(0, rows // T, tok * cf)
        ctx.save_for_backward(h, weight, rows, lab, cf, stats)
        ctx.meta = (B, T, C, hidden.dtype, cdtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, rows, lab, cf, stats = ctx.saved_tensors
        B, T, C, hdtype, cdtype = ctx.meta
        V = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dev = h.device
        n = rows.numel()
        with torch.autocast(dev.type, enabled=False):
            g = grad_out.float()[rows // T] * cf
            gh = torch.zeros(n, C, dtype=torch.float32, device=dev) if need_h else None
            # the returned weight gradient doubles as the accumulator unless it is bf16 and several
            # row super-chunks add into it (then float32, converted once at the end)
            several = n > MAX_ROWS
            gw_dtype = torch.float32 if several else weight.dtype
            gw = torch.zeros(V, C, dtype=gw_dtype, device=dev) if need_w else None
            for r0, r1, v0, v1 in _tiles(n, V, BWD_TILE_BYTES):
                hc, gc = h[r0:r1], g[r0:r1]
                wt = weight[v0:v1].to(cdtype)
                dl = (hc @ wt.t()).float().sub_(stats[r0:r1, 0:1]).sub_(stats[r0:r1, 1:2])
                dl.exp_().mul_(-gc[:, None])
                hit, col = _label_hits(lab[r0:r1], v0, v1)
                dl.index_put_((hit, col), gc[hit], accumulate=True)
                dl = dl.to(cdtype)
                if need_h:
                    gh[r0:r1] += dl @ wt
                if need_w:
                    if gw.dtype == dl.dtype:
                        gw[v0:v1].addmm_(dl.t(), hc)  # no (tile, C) temporary
                    else:
                        gw[v0:v1] += dl.t() @ hc
                del dl, wt
        grad_h = grad_w = None
        if need_h:
            grad_h = torch.zeros(B * T, C, dtype=hdtype, device=dev)
            grad_h.index_copy_(0, rows, gh.to(hdtype))
            grad_h = grad_h.view(B, T, C)
        if need_w:
            grad_w = gw.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def linear_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                             mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(B,) float32 ``sequence_logprobs(hidden @ weight.T, ids, mask)`` without the (B, T, V) logits.

    ``hidden`` (B, T, C), ``weight`` (V, C); differentiable w.r.t. both. ``backend="reference"``
    materializes the logits (the oracle); every other backend uses the chunked torch path, whose
    cost is the lm_head GEMMs (cuBLAS/oneDNN) rather than the elementwise work a Triton kernel
    would take over.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, C), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be (V, C) with C = hidden.shape[-1] = {hidden.shape[2]}, "
                         f"got shape {tuple(weight.shape)}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"hidden and weight must be floating point, got {hidden.dtype}, {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"hidden and weight must be on one device, got {hidden.device}, {weight.device}")
    # check_inputs only reads the shape and V of its first argument: a stride-0 stand-in is free
    fake = hidden.new_empty(()).expand(*hidden.shape[:2], weight.shape[0])
    check_inputs(fake, ids, mask, shift=True, what="hidden @ weight.T")
    backend = _check_backend(backend, hidden.device)
    if backend == "reference":
        from . import reference

        return reference.linear_sequence_logprobs(hidden, weight, ids, mask)
    cdtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearSequenceLogprobs.apply(hidden, weight, ids, mask, cdtype)
