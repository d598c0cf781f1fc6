"""Document-masked attention for padding-free packing: which tokens of packed rows see which.

Training packs a micro-batch's sequences without padding: every token's position restarts with its
sequence (the families take explicit positions), and attention must not cross from one sequence
into another. The structure is described by *segments* (consecutive runs of tokens of the flat
row, in order, covering it): each segment attends causally over its own tokens, optionally behind
a *prefix*, the first ``n`` tokens of an earlier segment. That covers both layouts training uses:

- one segment per sequence (SFT, and DPO's separate prompt + answer rows);
- DPO's shared-prompt rows (``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected``): segment A
  is ``prompt + chosen``, segment B the copy of the prompt's last token + rejected, behind the
  prefix ``prompt[:-1]`` (the first ``P - 1`` tokens of A). Neither answer sees the other.

A segment with a prefix is causal "bottom-right aligned": query i of a segment of q tokens behind
a prefix of p tokens sees the prefix and its own tokens 0..i. Two ways to run it:

- **varlen** (CUDA, half precision, no dropout): the whole flat row is ONE
  ``torch.nn.attention.varlen.varlen_attn`` call (FlashAttention's kernel, whose convention for q
  shorter than k is exactly that alignment), the keys of each prefix gathered in front of their
  segment's. No mask, no padding.
- **bins** (everywhere else): the *units* (a segment with the segments behind it, i.e. one DPO
  row or one sequence) are laid first-fit-decreasing into B rows of W slots, W chosen per
  micro-batch to minimise the slots' cost (``Segments.bins``). The model runs on (B, W) as on
  padded rows, with one (B, 1, W, W) boolean mask built on the device from four per-slot numbers;
  one SDPA call per layer then serves every unit. Measured on CPU (torch 2.13, 2 cores, bf16) this
  beat every mask-free alternative tried: FlexAttention has no CPU backward, one SDPA call per
  segment paid ~0.7 ms each in the flash backward, and gathering segments into batches of similar
  length and attending causally paid more in gathers and their scatter-add backward than the
  padding saved (0.71-0.91x the padded layout's tokens/s on the demo's pairs, against 0.95x (tiny
  model, bound by op count) and 1.02x (mid shape) for bins, which run 14% fewer slots there).
  The mask is dense: O(n * W^2) booleans per micro-batch, small at training lengths (16 rows of
  64 slots: 64 KB) but quadratic in the width.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastdpo.runtime import to_device

# The cost of a bin slot, in units of one token through the linear layers, is 1 + W / ATTENTION_WIDTH
# in a bin of W slots: attention's work per token grows with W (about W / (6 * n_embd) of the linear
# layers' flops), and on CPU its masked backward runs several times less efficiently than a matmul.
# Measured on the demo's pairs: 256 and "attention is free" chose bins within 1% of each other.
ATTENTION_WIDTH = 512
# the bin widths tried: the longest unit's length, then that plus multiples of this, up to twice it
BIN_STEP = 8

try:   # FlashAttention's variable-length entry point (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:   # pragma: no cover - older torch
    varlen_attn = None


@dataclass
class Segments:
    """The attention structure of a flat row: ``lengths[s]`` tokens per segment (in row order,
    summing to the row's length) and ``prefix[s]`` = (earlier segment j, n) when segment s also
    sees the first n tokens of segment j (None otherwise). Host lists: building the calls never
    reads the device; the tensors of either path (``varlen_tensors``, ``bins``) are built on first
    use and reused by every layer."""
    lengths: list[int]
    prefix: list[tuple[int, int] | None]
    _varlen: dict = field(default_factory=dict, repr=False, compare=False)
    _bins: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if len(self.prefix) != len(self.lengths):
            raise ValueError(f"{len(self.lengths)} segments but {len(self.prefix)} prefixes")
        for s, (n, pre) in enumerate(zip(self.lengths, self.prefix)):
            if n < 1:
                raise ValueError(f"segment {s} is empty")
            if pre is not None and not (0 <= pre[0] < s and 0 < pre[1] <= self.lengths[pre[0]]):
                raise ValueError(f"segment {s}: prefix {pre} is not the start of an earlier segment")

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)

    def starts(self) -> list[int]:
        out, at = [], 0
        for n in self.lengths:
            out.append(at)
            at += n
        return out

    def key_lengths(self) -> list[int]:
        return [n + (0 if pre is None else pre[1]) for n, pre in zip(self.lengths, self.prefix)]

    def varlen_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv_index (Nk,), cu_q (S+1,), cu_k (S+1,)): the keys of each segment (its prefix's, then
        its own) as row indices, and the cumulative query and key counts."""
        key = str(device)
        if key not in self._varlen:
            starts, index = self.starts(), []
            for s, (n, pre) in enumerate(zip(self.lengths, self.prefix)):
                if pre is not None:
                    index += range(starts[pre[0]], starts[pre[0]] + pre[1])
                index += range(starts[s], starts[s] + n)
            cum = [0]
            for n in self.lengths:
                cum.append(cum[-1] + n)
            cum_k = [0]
            for n in self.key_lengths():
                cum_k.append(cum_k[-1] + n)
            t = (torch.tensor(index, dtype=torch.long), torch.tensor(cum, dtype=torch.int32),
                 torch.tensor(cum_k, dtype=torch.int32))
            self._varlen[key] = tuple(to_device(x, device) for x in t)
        return self._varlen[key]

    def units(self) -> list[list[int]]:
        """The segments grouped into units: a segment with a prefix belongs to that prefix's unit
        (its keys must sit in the same bin), others start a unit. In row order."""
        unit_of, units = [], []
        for s, pre in enumerate(self.prefix):
            if pre is None:
                unit_of.append(len(units))
                units.append([s])
            else:
                unit_of.append(unit_of[pre[0]])
                units[unit_of[pre[0]]].append(s)
        return units

    def bins(self) -> Bins:
        """The units laid into bins of equal width (see the module docstring), cached. Widths from
        the longest unit's length to twice it (steps of ``BIN_STEP``) are tried with first-fit
        decreasing; the cheapest layout by ``ATTENTION_WIDTH``'s cost wins (ties: the narrower).
        The first width gives at most one bin per unit: never more slots than the padded rows."""
        if "packed" not in self._bins:
            units = self.units()
            size = [sum(self.lengths[s] for s in u) for u in units]
            order = sorted(range(len(units)), key=lambda u: (-size[u], u))
            lo = max(size)
            best = None
            for width in range(lo, 2 * lo + 1, BIN_STEP):
                layout = _first_fit(order, size, width)
                cost = len(layout) * width * (1 + width / ATTENTION_WIDTH)
                if best is None or cost < best[0]:
                    best = (cost, width, layout)
            _, width, layout = best
            members = [[s for u in b for s in units[u]] for b in layout]
            self._bins["packed"] = Bins.lay_out(self, members, width)
        return self._bins["packed"]

    def one_bin(self) -> Bins:
        """Every segment in one bin as wide as the row, in row order: the dense document mask."""
        if "one" not in self._bins:
            self._bins["one"] = Bins.lay_out(self, [list(range(len(self.lengths)))], self.n_tokens)
        return self._bins["one"]

    @classmethod
    def of_sequences(cls, lengths: Sequence[int]) -> Segments:
        """One causal segment per sequence."""
        return cls(list(lengths), [None] * len(lengths))


def _first_fit(order: list[int], size: list[int], width: int) -> list[list[int]]:
    """Units (taken in ``order``) into bins of ``width`` slots, each into the first with room."""
    bins, room = [], []
    for u in order:
        for b, r in enumerate(room):
            if r >= size[u]:
                bins[b].append(u)
                room[b] -= size[u]
                break
        else:
            bins.append([u])
            room.append(width - size[u])
    return bins


@dataclass
class Bins:
    """A flat row's segments in ``n`` rows of ``width`` slots. ``slot[t]``: where flat token t sits
    in the (n * width) slots; per slot (n, width): ``seg`` its segment (-1: an empty slot),
    ``prefix_seg``/``prefix_len`` the segment and length of its segment's prefix (-2 / 0: none),
    ``offset`` its index within its segment. Host tensors; ``on`` builds the device mask."""
    n: int
    width: int
    slot: torch.Tensor
    seg: torch.Tensor
    prefix_seg: torch.Tensor
    prefix_len: torch.Tensor
    offset: torch.Tensor
    _device: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def lay_out(cls, segments: Segments, bins: list[list[int]], width: int) -> Bins:
        """``bins[b]``: the segments of bin b in slot order, each a whole unit (prefixes first)."""
        starts, slot = segments.starts(), [0] * segments.n_tokens
        seg = torch.full((len(bins), width), -1, dtype=torch.int32)
        prefix_seg = torch.full((len(bins), width), -2, dtype=torch.int32)
        prefix_len = torch.zeros(len(bins), width, dtype=torch.int32)
        offset = torch.zeros(len(bins), width, dtype=torch.int32)
        for b, members in enumerate(bins):
            at = 0
            for s in members:
                n, pre = segments.lengths[s], segments.prefix[s]
                if at + n > width:
                    raise ValueError(f"bin {b} of width {width} cannot hold segment {s}")
                slot[starts[s]:starts[s] + n] = range(b * width + at, b * width + at + n)
                seg[b, at:at + n] = s
                offset[b, at:at + n] = torch.arange(n, dtype=torch.int32)
                if pre is not None:
                    prefix_seg[b, at:at + n], prefix_len[b, at:at + n] = pre
                at += n
        return cls(len(bins), width, torch.tensor(slot), seg, prefix_seg, prefix_len, offset)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slot (N,), mask (n, 1, width, width))`` on ``device``, built there once. Slot i sees
        slot j of its bin when both hold the same segment and j <= i (causal), or j holds the
        first ``prefix_len`` tokens of i's prefix segment. An empty slot sees the empty slots up to
        itself (never a real one, and no row of the mask is empty); no real slot sees it."""
        key = str(device)
        if key not in self._device:
            host = (self.slot, self.seg, self.prefix_seg, self.prefix_len, self.offset)
            slot, seg, pseg, plen, off = (to_device(t, device) for t in host)
            i = torch.arange(self.width, device=device)
            causal = i[None, :] <= i[:, None]
            mask = ((seg[:, :, None] == seg[:, None, :]) & causal) | \
                   ((pseg[:, :, None] == seg[:, None, :]) & (off[:, None, :] < plen[:, :, None]))
            self._device[key] = (slot, mask[:, None])
        return self._device[key]

    def gather(self, flat: torch.Tensor, fill: int = 0) -> torch.Tensor:
        """A (1, N) row's values in the (n, width) bins (``fill`` in empty slots)."""
        slot, _ = self.on(flat.device)
        out = flat.new_full((self.n * self.width,), fill).index_copy_(0, slot, flat[0])
        return out.view(self.n, self.width)


def varlen_usable(device: torch.device, dtype: torch.dtype, dropout_p: float = 0.0) -> bool:
    """Whether FlashAttention's varlen kernel can run the flat row: CUDA, half precision, no dropout
    (the kernel has no dropout argument)."""
    return (varlen_attn is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and dropout_p == 0.0)


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``q`` (1, H, N, D) over ``k``, ``v`` (1, H_kv, N, D) within segments (see the
    module docstring); returns (1, H, N, D)."""
    if q.shape[0] != 1 or q.shape[2] != segments.n_tokens:
        raise ValueError(f"a flat row of {segments.n_tokens} tokens needs q of shape (1, H, "
                         f"{segments.n_tokens}, D), got {tuple(q.shape)}")
    gqa = k.shape[1] != q.shape[1]
    if varlen_usable(q.device, q.dtype, dropout_p):
        return _varlen(q, k, v, segments, gqa)
    # ``FlatRows`` sends a flat row here only when it expects varlen to run; this is reached if its
    # guess of the forward's dtype was wrong, or from a direct caller: correct, but the dense
    # document mask over the whole row (N^2 booleans), one bin as wide as the row.
    _, mask = segments.one_bin().on(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


def _varlen(q, k, v, segments: Segments, gqa: bool) -> torch.Tensor:
    kv_index, cu_q, cu_k = segments.varlen_tensors(q.device)
    qf = q[0].transpose(0, 1)                              # (N, H, D)
    kf = k[0].transpose(0, 1).index_select(0, kv_index)    # (Nk, H_kv, D): prefixes gathered
    vf = v[0].transpose(0, 1).index_select(0, kv_index)
    y = varlen_attn(qf, kf, vf, cu_q, cu_k, max(segments.lengths), max(segments.key_lengths()),
                    window_size=(-1, 0), enable_gqa=gqa)
    return y.transpose(0, 1)[None]


