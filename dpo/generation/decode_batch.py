"""The rows of one sampler call on the model: prefill, decode steps, dropping finished rows.

Identical prompts are prefilled once. Then either
- cascade (shared prefix): the rows of one prompt keep a single copy of its keys/values, and each
  decode step reads it once for all of them (``fastdpo.models.decode_cache``); or
- flat: every row gets its own copy of its prompt's keys/values at the start of its row part.

Rows are in the caller's order; each has a write slot in its row part and a position (its prompt
length plus the tokens it has appended). A decode step is ``forward`` (tensors only, shapes fixed
per rows x groups x capacity bucket: what CUDA graphs or ``torch.compile`` would capture) between
host-side bookkeeping that never reads a device value: the row part grows at steps known in
advance, and ``keep`` takes the rows to keep as a host list the sampler decided on.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from fastdpo.models import kv_cache
from fastdpo.models.decode_cache import CHUNK, RESERVE_MAX, DecodeCache, DecodeState
from fastdpo.models.kv_cache import KVCache

# Auto mode shares a prompt's keys/values only where that saves time: some prompt has 2+ rows and the
# prompts average at least this many tokens. Below it the second attention part and the merge cost
# what the shared read saves (tiny shape, K = 8, 64 new tokens: 4-token prompts ran ~10% slower
# shared, 16 even, 64 up to 1.24x faster).
MIN_SHARED_PROMPT = 16


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _grid(groups: list[int], device) -> tuple[torch.Tensor | None, int]:
    """Each row's place ``group * width + slot`` in the query grid (slot = the row's rank among its
    group's rows) and the grid's width (the largest group). Places are None when the rows already
    are the grid (grouped in order, every group full: the usual K samples per prompt), so the
    attention reshapes the queries instead of scattering them into a zeroed grid and back."""
    width = max(Counter(groups).values())
    seen: Counter = Counter()
    places = []
    for g in groups:
        places.append(g * width + seen[g])
        seen[g] += 1
    if places == list(range(len(groups))) and len(groups) == (max(groups) + 1) * width:
        return None, width
    return torch.tensor(places, device=device), width


def use_cascade(prompts: list[list[int]], cascade: bool | None) -> bool:
    """``cascade`` if given, else whether sharing pays: some prompt has two or more rows and the
    prompts are not very short."""
    if cascade is not None:
        return bool(cascade)
    counts = Counter(map(tuple, prompts))
    mean_len = sum(len(p) for p in prompts) / max(len(prompts), 1)
    return max(counts.values(), default=0) >= 2 and mean_len >= MIN_SHARED_PROMPT


class DecodeBatch:
    """Prefills ``prompts`` (``self.logits``: each row's first next-token logits), then ``step``
    appends one token per row and returns the next logits. Logits stay in the forward's dtype
    (bf16 under bf16 autocast, whose values they already are): converting all (B, V) of them to
    float32 every step cost more than the top-k that reads them; ``choose_tokens`` converts the
    candidates it keeps. ``max_steps``: at most this many steps follow (lets the row part be
    allocated up front, see ``DecodeCache.reserve``)."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], cascade: bool,
                 max_steps: int | None = None):
        self.model = model
        device = next(model.parameters()).device
        distinct: dict[tuple[int, ...], int] = {}
        group = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        lens = [len(p) for p in distinct]
        G, P, B = len(distinct), max(lens), len(prompts)
        ids = torch.zeros(G, P, dtype=torch.long)
        for i, p in enumerate(distinct):   # setup only, once per call
            ids[i, : len(p)] = torch.tensor(p)
        ids, lens_t = ids.to(device), torch.tensor(lens, device=device)
        group_t = torch.tensor(group, device=device)
        pre = [KVCache(G, P) for _ in range(model.config.n_layer)]
        # Right padding + causal attention: a real token never sees the pads after it; the pads'
        # keys/values are masked out below (prefix part) or overwritten before being read (flat).
        h = model.hidden_states(ids, kv_caches=pre)
        last = h[torch.arange(G, device=device), lens_t - 1]
        self.logits = F.linear(last, model.lm_head_weight)[group_t]
        self.shared, self.group, self.steps_done = cascade, group, 0
        if cascade:
            self.first_slot = 0          # the row part holds generated tokens only
            self.base = lens_t[group_t]  # a row's position = prompt length + row-part slot
            place, width = _grid(group, device)
            invalid = (torch.arange(P, device=device) >= lens_t[:, None])[:, None, None, :]
            own_pos = torch.zeros(B, dtype=torch.long, device=device)
            # one slot for every row, a host int, where host values are free (DecodeState)
            slot = 0 if kv_cache.position_check_on_host(device) else None
            self.state = DecodeState(own_pos, place, G, width, invalid, slot=slot)
            self.caches = [DecodeCache(self.state, c.k.new_zeros(self._row_shape(c, B, CHUNK)),
                                       c.v.new_zeros(self._row_shape(c, B, CHUNK)), c.k, c.v) for c in pre]
        else:
            self.first_slot = P          # the row part starts with the prompt (padded to P)
            self.base = torch.zeros(B, dtype=torch.long, device=device)
            self.state = DecodeState(lens_t[group_t].clone())
            self.caches = []
            for c in pre:
                k, v = (t.new_zeros(self._row_shape(c, B, _round_up(P + 1, CHUNK))) for t in (c.k, c.v))
                k[:, :, :P], v[:, :, :P] = c.k[group_t], c.v[group_t]
                self.caches.append(DecodeCache(self.state, k, v))
                c.k = c.v = None   # free the prefill buffers layer by layer
        if max_steps:   # every slot the call can write, allocated now where views are cheap
            for c in self.caches:
                c.reserve(_round_up(self.first_slot + min(max_steps, RESERVE_MAX), CHUNK))

    @staticmethod
    def _row_shape(c: KVCache, rows: int, capacity: int) -> tuple[int, ...]:
        return rows, c.k.shape[1], capacity, c.k.shape[3]

    @property
    def rows(self) -> int:
        return self.state.own_pos.shape[0]

    def step(self, tok: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Append ``tok`` (B,) to every row (a finished row rewrites its last slot, or with one
        slot for all rows writes that one; no one reads it again); advance the rows in ``live``;
        return the next logits (B, V)."""
        # Each step appends at most one token per row, so no slot is beyond this (host count).
        need = self.first_slot + self.steps_done + 1
        if need > self.caches[0].capacity:
            for c in self.caches:
                c.grow(_round_up(need, c.grain))
        logits = self.forward(tok)
        st = self.state
        st.own_pos += live        # positions: a finished row's stays put (it may sit at block_size)
        if st.slot is not None:   # the next slot, written by every row (finished rows' never read)
            st.slot += 1
        self.steps_done += 1
        return logits

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        """The device part of a step: tensors in, tensors out, no host reads, no data-dependent
        Python branches (shapes and host ints only)."""
        st = self.state
        if not self.caches[0].exact_view:
            st.mask_slots(self.caches[0].capacity, self.caches[0].bias_dtype)
        pos = (self.base + st.own_pos)[:, None]
        return self.model(tok[:, None], pos=pos, kv_caches=self.caches)[:, -1]

    def keep(self, rows: list[int]) -> torch.Tensor:
        """Keep only ``rows`` (batch indices, host list, in order); returns them as an index tensor
        for the caller's per-row tensors. Prefix groups no kept row uses are dropped too."""
        st = self.state
        idx = torch.tensor(rows, device=st.own_pos.device)
        st.own_pos, self.base = st.own_pos[idx], self.base[idx]
        groups, kept_groups = [self.group[r] for r in rows], None
        if self.shared:
            used = sorted(set(groups))
            if len(used) < st.groups:
                kept_groups = torch.tensor(used, device=idx.device)
                st.keep_groups(kept_groups)
                renumber = {g: i for i, g in enumerate(used)}
                groups = [renumber[g] for g in groups]
            st.groups = len(used)
            st.group_slot, st.width = _grid(groups, idx.device)
        self.group = groups
        for c in self.caches:
            c.select(idx, kept_groups)
        return idx
