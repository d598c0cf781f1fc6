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
of each prefix gathered in front of its segment's. Elsewhere the segments go in a few batches of
similar key length (``Segments.groups``): each segment's keys (prefix, then itself) are gathered
into a right-padded slot row whose last slots are its queries, so one plain causal call per batch
is every segment's bottom-right causal attention and no real query reaches a padding slot.

Measured on CPU (torch 2.13, 2 cores): FlexAttention has no backward on CPU; one SDPA call per
segment pays ~0.7 ms per call in the CPU flash backward (bf16), which at 64 short segments per
layer cost more than the padding saved; torch's CPU flash backward in bf16 is also several times
slower than the plain formula on segments of a few dozen tokens, hence ``causal_attention``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# a batch of ``Segments.groups`` holds key lengths up to this multiple of its shortest
GROUP_RATIO = 1.5
# bf16 on CPU: segments up to this many tokens attend by the plain formula (see causal_attention)
PLAIN_MAX_LEN = 64

try:   # FlashAttention's variable-length entry point (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:   # pragma: no cover - older torch
    varlen_attn = None


@dataclass
class Segments:
    """The attention structure of a flat row: ``lengths[s]`` tokens per segment (in row order,
    summing to the row's length) and ``prefix[s]`` = (earlier segment j, n) when segment s also
    sees the first n tokens of segment j (None otherwise). Host lists: building the calls never
    reads the device; the index tensors of both paths (``varlen_tensors``, ``padded_tensors``) are
    built on first use per device and reused by every layer."""
    lengths: list[int]
    prefix: list[tuple[int, int] | None]
    _varlen: dict = field(default_factory=dict, repr=False, compare=False)
    _padded: dict = field(default_factory=dict, repr=False, compare=False)

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

    def groups(self) -> list[list[int]]:
        """The segments in batches of similar key length (each batch one attention call, padded to
        its longest): sorted by key length, a new batch when a length exceeds the batch's first by
        ``GROUP_RATIO``, so the padding stays a bounded fraction of each batch."""
        kl = self.key_lengths()
        out: list[list[int]] = []
        for s in sorted(range(len(kl)), key=kl.__getitem__):
            if out and kl[s] <= GROUP_RATIO * kl[out[-1][0]]:
                out[-1].append(s)
            else:
                out.append([s])
        return out

    def padded_tensors(self, device: torch.device):
        """(k_index (M,), shapes, out_index (N,)). Per batch of ``groups()`` (G segments, slot rows of
        Lk, listed in ``shapes``), the row indices of each segment's keys, its prefix then itself,
        right-padded with token 0; the batches' (G, Lk) index blocks are laid end to end in
        ``k_index``, so one gather per tensor serves every batch. ``out_index``: where each token's
        output sits in the batches' outputs laid end to end. A segment's queries are the last of its
        key slots, so plain causal attention over the slots is the segment's bottom-right causal
        attention, and no real query reaches a padding slot."""
        key = str(device)
        if key not in self._padded:
            starts, key_lengths = self.starts(), self.key_lengths()
            batches, shapes, where, at = [], [], [0] * self.n_tokens, 0
            for group in self.groups():
                Lk = max(key_lengths[s] for s in group)
                k_index = torch.zeros(len(group), Lk, dtype=torch.long)
                for g, s in enumerate(group):
                    n, m = self.lengths[s], key_lengths[s]
                    if self.prefix[s] is not None:
                        j = starts[self.prefix[s][0]]
                        k_index[g, :m - n] = torch.arange(j, j + m - n)
                    k_index[g, m - n:m] = torch.arange(starts[s], starts[s] + n)
                    a = at + g * Lk + m - n
                    where[starts[s]:starts[s] + n] = range(a, a + n)
                at += len(group) * Lk
                batches.append(k_index.reshape(-1))
                shapes.append((len(group), Lk))
            self._padded[key] = (torch.cat(batches).to(device), shapes, torch.tensor(where).to(device))
        return self._padded[key]

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
    return _batched(q, k, v, segments, dropout_p)


def _varlen(q, k, v, segments: Segments, gqa: bool) -> torch.Tensor:
    kv_index, cu_q, cu_k = segments.varlen_tensors(q.device)
    qf = q[0].transpose(0, 1)                              # (N, H, D)
    kf = k[0].transpose(0, 1).index_select(0, kv_index)    # (Nk, H_kv, D): prefixes gathered
    vf = v[0].transpose(0, 1).index_select(0, kv_index)
    y = varlen_attn(qf, kf, vf, cu_q, cu_k, max(segments.lengths), max(segments.key_lengths()),
                    window_size=(-1, 0), enable_gqa=gqa)
    return y.transpose(0, 1)[None]



def _batched(q, k, v, segments: Segments, dropout_p: float) -> torch.Tensor:
    """Each batch of similar segments gathered into (G, heads, Lk, D) and attended causally in one
    call (see ``Segments.padded_tensors``). One gather per tensor for all batches, split (not
    sliced) into them: the backward of a gather zero-fills its whole source and that of a slice its
    whole input, so per-batch gathers or slices would pay a full-size fill per batch and layer."""
    k_index, shapes, out_index = segments.padded_tensors(q.device)
    H, D = q.shape[1], q.shape[3]
    sizes = [G * Lk for G, Lk in shapes]
    parts = [t[0].transpose(0, 1).index_select(0, k_index).split(sizes) for t in (q, k, v)]
    out = []
    for (G, Lk), qb, kb, vb in zip(shapes, *parts):
        qb, kb, vb = (t.view(G, Lk, t.shape[1], D).transpose(1, 2) for t in (qb, kb, vb))  # (G, heads, Lk, D)
        out.append(causal_attention(qb, kb, vb, dropout_p).transpose(1, 2).reshape(-1, H, D))
    return torch.cat(out).index_select(0, out_index).transpose(0, 1)[None]


def causal_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """Causal attention (B, H, L, D). On CPU in half precision and up to ``PLAIN_MAX_LEN`` tokens
    the plain formula (float32 softmax): torch's CPU flash-attention backward in bf16 measured
    several times slower than it on such short segments (and slower than SDPA on long ones);
    elsewhere SDPA."""
    if q.device.type != "cpu" or q.dtype == torch.float32 or q.shape[2] > PLAIN_MAX_LEN:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                              enable_gqa=k.shape[1] != q.shape[1])
    if k.shape[1] != q.shape[1]:                              # grouped-query attention
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    L = q.shape[2]
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs.to(v.dtype) @ v
