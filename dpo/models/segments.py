"""Document-masked attention over one flat row of several sequences (padding-free packing).

Training packs a micro-batch's sequences end to end into ONE row of N tokens, with no padding:
every token's position restarts with its sequence (the families take explicit positions), and
attention must not cross from one sequence into another. A dense (N, N) boolean mask would say
that, but it costs O(N^2) memory and compute and shuts FlashAttention out. Instead the row is cut
into *segments* (consecutive runs of tokens, in order, covering the row) and each segment attends
causally over its own tokens, optionally behind a *prefix*: the first ``n`` tokens of an earlier
segment. That covers both layouts training uses:

- one segment per sequence (SFT, and DPO's separate prompt + answer rows);
- DPO's shared-prompt rows (``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected``): segment A
  is ``prompt + chosen``, segment B the copy of the prompt's last token + rejected, behind the
  prefix ``prompt[:-1]`` (the first ``P - 1`` tokens of A). Neither answer sees the other.

A segment with a prefix is causal "bottom-right aligned": query i of a segment of q tokens behind
a prefix of p tokens sees the prefix and its own tokens 0..i, i.e. keys 0..p+i of the (p + q)
keys. That is FlashAttention's convention for q shorter than k, so on CUDA (half precision) the
whole row is ONE ``torch.nn.attention.varlen.varlen_attn`` call over the segments, with the keys
of each prefix gathered in front of its segment's. Elsewhere (CPU, float32) each segment is one
``scaled_dot_product_attention`` call (measured on CPU to be several times faster than one call
with a dense mask over the row, and FlexAttention has no backward on CPU in torch 2.13).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

try:   # FlashAttention's variable-length entry point (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:   # pragma: no cover - older torch
    varlen_attn = None


@dataclass
class Segments:
    """The attention structure of a flat row: ``lengths[s]`` tokens per segment (in row order,
    summing to the row's length) and ``prefix[s]`` = (earlier segment j, n) when segment s also
    sees the first n tokens of segment j (None otherwise). Host lists: building the calls never
    reads the device. ``kv_index`` / ``cu_q`` / ``cu_k`` are the varlen call's device tensors,
    built on first use per device."""
    lengths: list[int]
    prefix: list[tuple[int, int] | None]
    _varlen: dict = field(default_factory=dict, repr=False, compare=False)

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
            self._varlen[key] = tuple(x.to(device, non_blocking=True) for x in t)
        return self._varlen[key]

    @classmethod
    def of_sequences(cls, lengths: Sequence[int]) -> Segments:
        """One causal segment per sequence."""
        return cls(list(lengths), [None] * len(lengths))


def use_varlen(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether ``attend_segments`` takes FlashAttention's varlen kernel: CUDA, half precision, no
    dropout (the kernel has no dropout argument)."""
    return (varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and dropout_p == 0.0)


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``q`` (1, H, N, D) over ``k``, ``v`` (1, H_kv, N, D) within segments (see the
    module docstring); returns (1, H, N, D)."""
    if q.shape[0] != 1 or q.shape[2] != segments.n_tokens:
        raise ValueError(f"a flat row of {segments.n_tokens} tokens needs q of shape (1, H, "
                         f"{segments.n_tokens}, D), got {tuple(q.shape)}")
    gqa = k.shape[1] != q.shape[1]
    if use_varlen(q, dropout_p):
        return _varlen(q, k, v, segments, gqa)
    qs, ks, vs = (t.split(segments.lengths, dim=2) for t in (q, k, v))   # one backward per split
    out = []
    for s, (n, pre) in enumerate(zip(segments.lengths, segments.prefix)):
        if pre is None:
            out.append(F.scaled_dot_product_attention(qs[s], ks[s], vs[s], dropout_p=dropout_p,
                                                      is_causal=True, enable_gqa=gqa))
            continue
        j, p = pre
        kk = torch.cat([ks[j][:, :, :p], ks[s]], dim=2)
        vv = torch.cat([vs[j][:, :, :p], vs[s]], dim=2)
        out.append(F.scaled_dot_product_attention(qs[s], kk, vv, attn_mask=causal_lower_right(n, p + n),
                                                  dropout_p=dropout_p, enable_gqa=gqa))
    return torch.cat(out, dim=2)


def _varlen(q, k, v, segments: Segments, gqa: bool) -> torch.Tensor:
    kv_index, cu_q, cu_k = segments.varlen_tensors(q.device)
    qf = q[0].transpose(0, 1)                              # (N, H, D)
    kf = k[0].transpose(0, 1).index_select(0, kv_index)    # (Nk, H_kv, D): prefixes gathered
    vf = v[0].transpose(0, 1).index_select(0, kv_index)
    y = varlen_attn(qf, kf, vf, cu_q, cu_k, max(segments.lengths), max(segments.key_lengths()),
                    window_size=(-1, 0), enable_gqa=gqa)
    return y.transpose(0, 1)[None]
