"""A per-pair preference loss on ``hidden @ weight.T`` with its gradients computed in forward.

``linear_sequence_logprobs`` returns log-probs and recomputes every logit tile in backward, since
its caller's upstream gradient is only known after the whole batch. A DPO-style loss with cached
(or precomputed) reference log-probs is a sum of *per-pair* terms: pair i's loss depends only on
pair i's chosen and rejected log-probs, so its gradient is known as soon as that pair's log-probs
are. This op therefore walks the batch in chunks of whole pairs and, per chunk:

1. computes the logits of the chunk's active rows once (matmul 1), tile by tile, folds each tile
   into a float32 online log-sum-exp, and keeps it in a buffer bounded by a byte budget (the
   torch path keeps ``exp(z - running max)``, so that the backward needs no exp either; the
   Triton path keeps the logits, rounded to the compute dtype, and takes the statistics of
   exactly the kept values);
2. sums the row log-probs per pair and answer;
3. calls ``pair_loss_fn`` on the chunk's pairs and differentiates it with autograd (a few scalars);
4. turns each kept tile into ``dlogits = g * (onehot - softmax)`` and runs the two gradient GEMMs
   on it: ``grad_h += dlogits @ W[tile]`` (matmul 2), ``grad_W[tile] += dlogits.T @ h`` (matmul 3).

Three lm_head matmuls per active row instead of four, and no saved activations. The returned loss
carries the gradients; its backward only scales them, in place, by the upstream scalar (1 in
training), so one backward per call. Any loss that is a sum of per-pair terms fits: sigmoid DPO
with label smoothing, IPO, hinge, an NLL term on the chosen answers normalised by a fixed token
count (RPO), and ones added later. A loss that couples pairs (e.g. batch-normalised margins)
must use ``linear_sequence_logprobs``.

Layouts (``P`` pairs, both masks ``(P, T)``, shifted as in ``sequence_logprobs``):
- packed / shared prompt: ``hidden (P, T, C)``, ``ids (P, T)``; row i holds pair i's prompt,
  chosen and rejected answers, told apart by the two masks;
- separate rows: ``hidden (2P, T, C)``, ``ids (2P, T)``; rows 0..P-1 are the chosen sequences
  (``chosen_mask``), rows P..2P-1 the rejected ones (``rejected_mask``).

Backends: ``torch`` (CPU; exact chunks, since a host sync costs nothing there), ``triton`` (the
kernels of ``linear_logprob.py``; rows compacted on the device and chunks of a static number of
pairs whose row counts stay on the device, so no host sync), ``reference`` (autograd through the
oracle's full logits: the test's ground truth), ``auto``. Memory: the kept logits of one chunk
(``PAIR_CHUNK_BYTES`` on the torch path, ``linear_logprob.SCRATCH_BYTES`` of static bound on the
Triton path; always at least one pair), the weight in the compute dtype (one (V, C) copy under
autocast) and the float32 gradients.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import linear_logprob as lin
from .logprob import _check_backend

# Bytes of kept tiles (compute dtype) per chunk of pairs on the torch path: at V = 50304 in bf16,
# 256 MB is ~2.7k rows. Fewer chunks mean fewer passes adding a chunk's (V, C) weight gradient
# into the float32 one: measured at 8x1024 rows (packed, bf16, 1 thread, CPU seconds, min of 3)
# 128 MB 3.58 s, 256 MB 3.25 s, 512 MB 3.16 s, the recompute op 4.15 s.
PAIR_CHUNK_BYTES = 256 * 2**20

PairLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- rows of a pair batch


class _PairRows:
    """Per flattened row r = b*T + t of hidden: label, chosen/rejected coefficient, pair index;
    ``order``: the rows pair by pair (each pair owns ``K`` consecutive entries)."""

    def __init__(self, ids, chosen_mask, rejected_mask):
        R, T = ids.shape
        P = chosen_mask.shape[0]
        dev = ids.device
        self.labels = torch.zeros(R * T, dtype=torch.int64, device=dev)
        self.labels.view(R, T)[:, :-1] = ids[:, 1:]
        cc, cr = _shifted_coef(chosen_mask), _shifted_coef(rejected_mask)
        if R == P:   # packed: both answers in one row
            self.cc, self.cr = cc.reshape(-1), cr.reshape(-1)
            self.order = torch.arange(R * T, device=dev)
        else:        # separate rows: chosen rows, then rejected rows; pair i = rows i and P + i
            zero = torch.zeros_like(cc)
            self.cc, self.cr = torch.cat([cc, zero]).reshape(-1), torch.cat([zero, cr]).reshape(-1)
            self.order = torch.arange(R * T, device=dev).view(2, P, T).transpose(0, 1).reshape(-1)
        self.pair = (torch.arange(R, device=dev) % P).repeat_interleave(T)
        self.P, self.N, self.K = P, R * T, (R // P) * T
        self.active = (self.cc != 0) | (self.cr != 0)

    def padded(self, name):
        """The per-row array ``name`` with one dummy row N appended (label 0, coefficients 0, pair P)."""
        x = getattr(self, name)
        pad = self.P if name == "pair" else 0
        return torch.cat([x, x.new_full((1,), pad)])


def _shifted_coef(mask: torch.Tensor) -> torch.Tensor:
    """Row (b, t) predicts token t+1: its coefficient is mask[b, t+1] (0 in the last column)."""
    coef = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    coef[:, :-1] = mask[:, 1:]
    return coef


def _pair_sums(vals, pair_local, offset, n_pairs: int, K: int) -> torch.Tensor:
    """Per-pair sums of row values, deterministic: each pair's rows go to their own slots of a
    dense (pairs, K) buffer (dummy rows: pair ``n_pairs``) and are summed in a fixed order."""
    dense = vals.new_zeros(n_pairs + 1, K)
    dense[pair_local, offset] = vals
    return dense[:n_pairs].sum(1)


def _loss_and_row_grads(tok, cc, cr, pair_local, offset, p0: int, p1: int, K: int,
                        fn: PairLossFn, lc_out, lr_out, need_grad: bool):
    """Chunk [p0, p1): per-pair log-probs (written to lc_out/lr_out), the summed loss, and the
    loss gradient w.r.t. each row's log-prob (None without ``need_grad``)."""
    n = p1 - p0
    # where, not a product: a row of one answer may hold a -inf label logit, and -inf * 0 = nan
    lc = _pair_sums(torch.where(cc != 0, cc * tok, 0.0), pair_local, offset, n, K)
    lr = _pair_sums(torch.where(cr != 0, cr * tok, 0.0), pair_local, offset, n, K)
    lc_out[p0:p1], lr_out[p0:p1] = lc, lr
    pairs = torch.arange(p0, p1, device=tok.device)
    with torch.enable_grad():
        c, r = lc.clone().requires_grad_(need_grad), lr.clone().requires_grad_(need_grad)
        losses = fn(c, r, pairs)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"pair_loss_fn must return one loss per pair, shape ({n},), got {got}")
        total = losses.float().sum()
        if not need_grad:
            return total.detach(), None
        dc, dr = torch.autograd.grad(total, (c, r), allow_unused=True)
    dpair_c = torch.zeros(n + 1, device=tok.device)
    dpair_r = torch.zeros(n + 1, device=tok.device)
    if dc is not None:
        dpair_c[:n] = dc
    if dr is not None:
        dpair_r[:n] = dr
    return total.detach(), cc * dpair_c[pair_local] + cr * dpair_r[pair_local]


# --------------------------------------------------------------------------- torch path


def _chunks(starts: list[int], budget_rows: int) -> list[tuple[int, int]]:
    """Greedy chunks [p0, p1) of whole pairs whose active rows fit ``budget_rows`` (at least one)."""
    chunks, p0, P = [], 0, len(starts) - 1
    while p0 < P:
        p1 = p0 + 1
        while p1 < P and starts[p1 + 1] - starts[p0] <= budget_rows:
            p1 += 1
        chunks.append((p0, p1))
        p0 = p1
    return chunks


def _torch_pair_loss(hidden, weight, rows: _PairRows, fn, cdtype, need_h, need_w):
    """The torch path: ``linear_logprob``'s tile loops, the forward one keeping each tile's
    exponentials and the gradient one turning them into the softmax with one multiply instead of
    recomputing logits and exponentials (each pass runs on a tile next to its GEMM)."""
    B, T, C = hidden.shape
    V = weight.shape[0]
    P, K, dev = rows.P, rows.K, hidden.device
    act = rows.active[rows.order]
    idx = rows.order[act]   # active rows, pair by pair
    starts = [0]
    for c in act.view(P, K).sum(1).tolist():  # a host sync: free on CPU, once per call elsewhere
        starts.append(starts[-1] + c)
    h2 = hidden.reshape(B * T, C)
    wc = weight.to(cdtype)   # one cast per call (a (V, C) copy under autocast), not one per tile
    lab_all = rows.labels[idx]
    cc_all, cr_all, pair_all = rows.cc[idx], rows.cr[idx], rows.pair[idx]
    offset_all = torch.arange(idx.numel(), device=dev) - torch.tensor(starts[:-1], device=dev)[pair_all]
    lc, lr = torch.zeros(P, device=dev), torch.zeros(P, device=dev)
    loss = torch.zeros((), device=dev)
    gh = torch.zeros(B * T, C, dtype=hidden.dtype, device=dev) if need_h else None
    gw = torch.zeros(V, C, dtype=torch.float32, device=dev) if need_w else None
    chunks = _chunks(starts, max(1, PAIR_CHUNK_BYTES // (V * wc.element_size())))
    chunk_tiles = [list(lin._tiles(starts[p1] - starts[p0], V, lin.FWD_TILE_BYTES)) for p0, p1 in chunks]
    # one set of buffers for the whole call: fresh ones per chunk would page-fault every time
    kept = torch.empty(max(starts[p1] - starts[p0] for p0, p1 in chunks) * V, dtype=cdtype, device=dev)
    buf = lin._TileBuffers([t for ts in chunk_tiles for t in ts], C, wc.dtype, cdtype, dev, grads=True)
    for (p0, p1), tiles in zip(chunks, chunk_tiles):
        sl = slice(starts[p0], starts[p1])
        hc, lab = h2.index_select(0, idx[sl]).to(cdtype), lab_all[sl]
        m, logsum, zlab, maxima = lin.torch_stats(hc, wc, lab, cdtype, tiles, keep=kept, buf=buf)  # matmul 1
        part, g = _loss_and_row_grads((zlab - m) - logsum, cc_all[sl], cr_all[sl], pair_all[sl] - p0,
                                      offset_all[sl], p0, p1, K, fn, lc, lr, need_h or need_w)
        loss = loss + part
        if g is None or not tiles:
            continue
        gh_c = lin.torch_grads(hc, wc, lab, g, m, logsum, cdtype, tiles, need_h=need_h,  # matmuls 2, 3
                               gw=gw, kept=kept, kept_max=maxima, buf=buf)
        if need_h:
            gh.index_copy_(0, idx[sl], gh_c.to(hidden.dtype))
    return loss, lc, lr, (gh.view(B, T, C) if need_h else None), (gw.to(weight.dtype) if need_w else None)


# --------------------------------------------------------------------------- Triton path


def _triton_pair_loss(hidden, weight, rows: _PairRows, fn, cdtype, need_h, need_w):
    B, T, C = hidden.shape
    V, N = weight.shape[0], B * T
    P, K, dev = rows.P, rows.K, hidden.device
    act = rows.active[rows.order]
    pos, n = lin.compact_rows(act)                      # positions in pair-major order
    idx = torch.cat([rows.order, rows.order.new_full((1,), N)])[pos]   # -> hidden rows; dummy N
    starts = torch.zeros(P + 1, dtype=torch.int64, device=dev)
    starts[1:] = act.view(P, K).sum(1).cumsum(0)
    idx_pad = torch.cat([idx, idx.new_full((1,), N)])
    lab_pad, cc_pad, cr_pad, pair_pad = (rows.padded(k) for k in ("labels", "cc", "cr", "pair"))
    h, w = lin.operands(hidden.reshape(N, C), weight, cdtype)
    pairs_per_chunk = max(1, lin.scratch_rows(V, cdtype, dev, N) // K)
    scratch = torch.empty(min(P, pairs_per_chunk) * K, V, dtype=cdtype, device=dev)
    lc, lr = torch.zeros(P, device=dev), torch.zeros(P, device=dev)
    loss = torch.zeros((), device=dev)
    gh = torch.zeros(N + 1, C, dtype=hidden.dtype, device=dev) if need_h else None
    gw = torch.zeros(V, C, dtype=torch.float32, device=dev) if need_w else None
    for p0 in range(0, P, pairs_per_chunk):
        p1 = min(P, p0 + pairs_per_chunk)
        bound = (p1 - p0) * K                            # static; the real count stays on the device
        lo, hi = starts[p0], starts[p1]
        slot = lo + torch.arange(bound, device=dev)
        valid = slot < hi
        rows_c = idx_pad[torch.where(valid, slot, N)]
        lab_c = lab_pad[rows_c].to(torch.int32)
        pair_c = pair_pad[rows_c]
        offset = torch.where(valid, slot - starts[pair_c.clamp(max=P - 1)], 0)
        pair_local = torch.where(valid, pair_c - p0, p1 - p0)
        n_c = (hi - lo).to(torch.int32).view(1)
        hc = lin.gather_rows(h, rows_c)
        m, logsum, zlab = lin.triton_logits(hc, w, lab_c, n_c, bound, stats=True, out=scratch)
        tok = (zlab - m) - logsum                        # rows past n_c: 0
        part, g = _loss_and_row_grads(tok, cc_pad[rows_c], cr_pad[rows_c], pair_local, offset,
                                      p0, p1, K, fn, lc, lr, need_h or need_w)
        loss = loss + part
        if g is None:
            continue
        lin.triton_dlogits(scratch, lab_c, n_c, g, torch.stack([m, logsum]), bound)
        if need_h:
            gh.index_copy_(0, rows_c, lin.triton_grad_hidden(scratch, w, n_c, bound).to(hidden.dtype))
        if need_w:
            lin.triton_grad_weight(scratch, hc, n_c, gw)
    return (loss, lc, lr, (gh[:N].view(B, T, C) if need_h else None),
            (gw.to(weight.dtype) if need_w else None))


# --------------------------------------------------------------------------- autograd, public API


class _StoredGradients(torch.autograd.Function):
    """A loss whose input gradients were computed in forward: backward scales them, in place, by
    the upstream gradient (a device scalar: no sync) and hands them over. They exist once, so a
    second backward through the same call (``retain_graph=True``) is an error."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_hidden, grad_weight):
        ctx.grads = [grad_hidden, grad_weight]
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_pair_loss: backward ran twice through one call; its gradients "
                               "were computed in forward and are handed over once")
        grads, ctx.grads = ctx.grads, None
        return (*(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads), None, None, None)


def linear_pair_loss(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                     chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, pair_loss_fn: PairLossFn,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, chosen_logps (P,), rejected_logps (P,))`` with loss = sum_i pair_loss_fn(...)[i].

    ``pair_loss_fn(chosen (n,), rejected (n,), pairs (n,) int64) -> (n,)``: the losses of pairs
    ``pairs`` (indices into 0..P-1, e.g. to slice cached reference log-probs) from their summed
    answer log-probs (float32). It is called once per chunk of pairs, without autocast, and must be
    differentiable and per pair (pair i's loss depends on pair i's log-probs only). ``loss`` is
    differentiable w.r.t. ``hidden`` and ``weight`` (gradients computed in forward); the log-probs
    are returned detached, for logging. Layouts and backends: see the module docstring.
    """
    if chosen_mask.dim() != 2 or tuple(rejected_mask.shape) != tuple(chosen_mask.shape):
        raise ValueError(f"chosen_mask and rejected_mask must both be (P, T), got "
                         f"{tuple(chosen_mask.shape)} and {tuple(rejected_mask.shape)}")
    P = chosen_mask.shape[0]
    R = hidden.shape[0] if hidden.dim() == 3 else -1
    if P == 0 or R not in (P, 2 * P):
        raise ValueError(f"hidden must be (P, T, C) (packed pairs) or (2P, T, C) (chosen rows, then "
                         f"rejected rows) for P = {P} pairs with masks (P, T), got {tuple(hidden.shape)}")
    masks = [chosen_mask, rejected_mask] if R == P else [torch.cat([chosen_mask, rejected_mask])]
    lin.check_linear_inputs(hidden, weight, ids, masks)
    backend = _check_backend(backend, hidden.device)
    if backend == "reference":
        return _reference(hidden, weight, ids, chosen_mask, rejected_mask, pair_loss_fn)
    cdtype = lin.compute_dtype(hidden)
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    run = _triton_pair_loss if backend == "triton" else _torch_pair_loss
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        rows = _PairRows(ids, chosen_mask, rejected_mask)
        loss, lc, lr, gh, gw = run(hidden.detach(), weight.detach(), rows, pair_loss_fn, cdtype,
                                   need_h, need_w)
    if need_h or need_w:
        loss = _StoredGradients.apply(hidden, weight, loss, gh, gw)
    return loss, lc, lr


def _reference(hidden, weight, ids, chosen_mask, rejected_mask, fn):
    """Autograd through the oracle's full logits and ``fn`` on all pairs at once."""
    from . import reference

    P = chosen_mask.shape[0]
    if hidden.shape[0] == P:
        lc = reference.linear_sequence_logprobs(hidden, weight, ids, chosen_mask)
        lr = reference.linear_sequence_logprobs(hidden, weight, ids, rejected_mask)
    else:
        lp = reference.linear_sequence_logprobs(hidden, weight, ids, torch.cat([chosen_mask, rejected_mask]))
        lc, lr = lp[:P], lp[P:]
    with torch.autocast(hidden.device.type, enabled=False):
        losses = fn(lc, lr, torch.arange(P, device=hidden.device))
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (P,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"pair_loss_fn must return one loss per pair, shape ({P},), got {got}")
    return losses.float().sum(), lc.detach(), lr.detach()
