"""Padding-free packing (``train.packing``): a micro-batch's rows, end to end in ONE flat row.

The padded layouts (``batches.collate_pairs``, ``collate_packed_pairs``, ``collate_sft``) pad every
row to the longest one, and every padding token runs through every layer. Packed, the same rows
are concatenated without their padding into one row of N tokens (N = the real tokens); positions
restart with each row's own positions, and attention stays inside each row's sequences
(``fastdpo.models.segments``: one segment per sequence; a shared-prompt row is two segments, the
rejected branch behind the prompt's first ``P - 1`` tokens, so neither answer sees the other).

The model runs on the flat row as one FlashAttention varlen call per layer where that kernel runs
(CUDA, half precision), elsewhere on the rows laid into a few equal bins with a document mask
(``Segments.bins``). ``FlatRows.hidden_states`` then puts the final hidden states back into the
padded layout's (R, T, C) shape, so the log-prob kernels (which send only answer tokens through
the lm_head) get exactly the padded layout's inputs, values included: every token has the context
and position it has there. The padding slots point at the row's first token; no mask selects
them, so they add nothing and get no gradient.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdpo.models.segments import Segments, varlen_usable
from fastdpo.runtime import to_device
from fastdpo.training.batches import TokenizedPair, TokenizedSFT, collate_pairs, collate_sft


@dataclass
class FlatRows:
    ids: torch.Tensor       # (1, N) the rows' real tokens, end to end
    pos: torch.Tensor       # (1, N) each token's position in its own sequence
    index: torch.Tensor     # (R, T) where each slot of the padded layout sits in the flat row
    segments: Segments      # which tokens see which (host lists)

    def to(self, device) -> FlatRows:
        return FlatRows(*(to_device(t, device) for t in (self.ids, self.pos, self.index)), self.segments)

    def hidden_states(self, model) -> torch.Tensor:
        """The model's final hidden states in the padded layout's shape (R, T, C): the flat row in
        one varlen call per layer if the forward will run in half precision on CUDA, else in bins."""
        R, T = self.index.shape
        device = self.ids.device
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else model.lm_head_weight.dtype)
        dropout = getattr(getattr(model, "config", None), "dropout", 0.0) if model.training else 0.0
        if varlen_usable(device, dtype, dropout):
            h = model.hidden_states(self.ids, pos=self.pos, attn_mask=self.segments)[0]
            index = self.index
        else:
            bins = self.segments.bins()
            slot, mask = bins.on(device)
            h = model.hidden_states(bins.gather(self.ids), pos=bins.gather(self.pos), attn_mask=mask)
            h, index = h.reshape(bins.n * bins.width, h.shape[-1]), slot[self.index]
        return h.index_select(0, index.reshape(-1)).view(R, T, h.shape[-1])


def flatten(seqs: Sequence[list[int]], positions: Sequence[list[int]],
            row_segments: Sequence[tuple[list[int], list[tuple[int, int] | None]]], T: int) -> FlatRows:
    """Rows ``seqs`` (their positions; per row its segment lengths and prefixes, a prefix naming a
    segment of the same row by its number in the row) as a ``FlatRows`` whose index fits a padded
    (len(seqs), T) layout."""
    ids, pos, index = [], [], torch.empty(len(seqs), T, dtype=torch.long)
    lengths, prefix = [], []
    for r, (seq, ps, (seg_lengths, seg_prefix)) in enumerate(zip(seqs, positions, row_segments)):
        start, first = len(ids), len(lengths)
        ids += seq
        pos += ps
        index[r] = start
        index[r, :len(seq)] = torch.arange(start, start + len(seq))
        lengths += seg_lengths
        prefix += [None if p is None else (first + p[0], p[1]) for p in seg_prefix]
    return FlatRows(torch.tensor([ids]), torch.tensor([pos]), index, Segments(lengths, prefix))


def flat_pairs(pairs: Sequence[TokenizedPair], pad_id: int, shared_prompt: bool):
    """A micro-batch of pairs packed: ``(ids (R, T), chosen_mask (P, T), rejected_mask (P, T),
    FlatRows)`` with ids and masks in the padded layout the kernels read (shared-prompt rows,
    R = P, or separate rows, R = 2P; see ``fastdpo.training.logprobs.PairRows``)."""
    if not shared_prompt:
        ids, mask = collate_pairs(pairs, pad_id)
        seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        flat = flatten(seqs, [list(range(len(s))) for s in seqs], [([len(s)], [None]) for s in seqs],
                       ids.shape[1])
        return ids, mask[:len(pairs)], mask[len(pairs):], flat
    # the shared-prompt row of collate_packed_pairs: prompt | chosen | prompt[-1] | rejected
    seqs, positions, segs = [], [], []
    for p in pairs:
        P, C, R = len(p.prompt), len(p.chosen), len(p.rejected)
        seqs.append(p.prompt + p.chosen + p.prompt[-1:] + p.rejected)
        positions.append([*range(P + C), P - 1, *range(P, P + R)])
        segs.append(([P + C, R + 1], [None, (0, P - 1) if P > 1 else None]))
    T = max(len(s) for s in seqs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    chosen = torch.zeros(len(pairs), T, dtype=torch.bool)
    rejected = torch.zeros(len(pairs), T, dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, pairs)):
        P, C = len(p.prompt), len(p.chosen)
        ids[i, :len(s)] = torch.tensor(s)
        chosen[i, P:P + C] = True
        rejected[i, P + C + 1:len(s)] = True
    return ids, chosen, rejected, flatten(seqs, positions, segs, T)


def flat_sft(items: Sequence[TokenizedSFT], pad_id: int):
    """SFT examples packed: ``(ids (B, T), mask (B, T), FlatRows)``, ids and mask as ``collate_sft``."""
    ids, mask = collate_sft(items, pad_id)
    seqs = [x.prompt + x.response for x in items]
    return ids, mask, flatten(seqs, [list(range(len(s))) for s in seqs], [([len(s)], [None]) for s in seqs],
                              ids.shape[1])
