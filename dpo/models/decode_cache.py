"""The KV cache of one-token-per-row decoding, with a shared prompt stored once (cascade attention).

When K rows sample from one prompt, their prompt's keys and values are identical. A
``DecodeCache`` can keep them once per *group* of rows (the prefix part, ``(G, kv_heads, P, D)``)
next to each row's own keys (the row part, ``(B, kv_heads, capacity, D)``). A decode step then
attends in two parts and merges them with their log-sum-exp, as FlashInfer's cascade attention and
Hydragen do:

    prefix part: the queries of a group's rows stacked into one matrix, one read of the prompt's
                 keys/values for the whole group (a small matmul instead of K matrix-vector products);
    row part:    each row over its own generated tokens;
    merge:       out = sum_i out_i * exp(lse_i - logaddexp(lse_1, lse_2)), in float32.

Without a prefix part (``prefix_k is None``) the row part starts with the row's prompt: plain
per-row decoding, one attention and no merge (torch's fused SDPA where it is the faster kernel).

Static shapes: the row part is a contiguous buffer whose capacity grows in whole chunks (between
steps, decided from a host-side step count), and attention runs over the whole buffer with a mask.
So every tensor of a step has a shape fixed for a (rows, groups, capacity) bucket, and nothing in a
step reads a device value on the host: the step can be captured by CUDA graphs or
``torch.compile``. The matmul kernel reads the whole buffer: a slice ``[:, :, :L]`` of a larger
one would cost a copy per layer and step (bf16 matmuls on such strided views were ~8x slower than
on contiguous ones on a CPU). torch's CPU flash kernel (used in half precision on CPUs with AMX)
reads strided views at full speed, so there the row part is allocated once for every step the call
can take (``reserve``) and attention reads a view of its first ``length`` slots, grown by 8 slots
instead of 32: no reallocation (page faults plus a copy of every slot so far) and fewer masked
slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 32   # row-part capacity grows by this many slots; ~CHUNK/2 masked slots per row on average
# within a reserved buffer (``DecodeCache.reserve``) growing is free, so attention reads fewer slots
RESERVED_CHUNK = 8
# at most this many slots are reserved up front (64 rows x 12 layers of a 124M model: ~0.6 GB of
# bf16 keys and values); past them a reserved buffer doubles
RESERVE_MAX = 512

# torch's CPU flash-attention kernel, which also returns the log-sum-exp the merge needs
_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe())
    except RuntimeError:
        return False


# Which CPU attention kernel is faster in bf16/fp16 depends on the CPU. With AMX tiles (recent
# Xeons) torch's flash kernel runs its matmuls on them: measured 1.9x faster than two plain matmuls
# at 128 rows x 256 keys (4.8 vs 9.0 ms, 2 threads), even at 32 keys. Without AMX (an AMD EPYC) the
# flash kernel measured ~3x slower than the matmuls. float32 keeps the matmuls everywhere.
CPU_HALF_FLASH = _cpu_flash is not None and _has_amx()


def _cpu_half_flash(k: torch.Tensor) -> bool:
    return CPU_HALF_FLASH and k.device.type == "cpu" and k.dtype in (torch.bfloat16, torch.float16)


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, invalid: torch.Tensor | None,
                      bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` (N, Hkv, M, D) over ``k``, ``v`` (N, Hkv, L, D), ``invalid``
    (bool, broadcastable to (N, Hkv, M, L); None: every key) marking keys not to see. Returns the
    output (N, Hkv, M, D) and the log-sum-exp of the scores (N, Hkv, M, 1), both float32. Every
    query must see at least one key. Matmuls run in the cache's dtype (float32 accumulation
    inside), the softmax in float32 (on a CPU with AMX in half precision: torch's flash kernel,
    which does the same; it takes ``invalid`` as an additive ``bias``, which callers may pass
    ready-made, see ``additive``)."""
    if _cpu_half_flash(k):
        if bias is None and invalid is not None:
            bias = additive(invalid, q.dtype)
        out, lse = _cpu_flash(q, k, v, attn_mask=bias)
        return out.float(), lse.unsqueeze(-1)
    scores = (q @ k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
    if invalid is not None:
        scores.masked_fill_(invalid, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    p = scores.sub_(top).exp_()
    total = p.sum(-1, keepdim=True)
    out = (p.to(v.dtype) @ v).float().div_(total)
    return out, total.log_().add_(top)


def additive(invalid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "do not see" mask as an additive bias (0 / -inf) of ``dtype``."""
    return torch.zeros(invalid.shape, dtype=dtype, device=invalid.device).masked_fill_(invalid, float("-inf"))


def merge_attention(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor,
                    lse2: torch.Tensor) -> torch.Tensor:
    """The attention over the union of two disjoint key sets, from each part's output and
    log-sum-exp (float32): out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse) with lse their
    logaddexp, which is a lerp from out2 to out1 by sigmoid(lse1 - lse2) (3 ops instead of 8: a
    decode step runs this per layer on small tensors, where each op's fixed cost dominates)."""
    return torch.lerp(out2, out1, torch.sigmoid(lse1 - lse2))


def _fused_is_faster(k: torch.Tensor) -> bool:
    """Whether one attention part alone (no merge, so no log-sum-exp needed) should run torch's
    fused SDPA rather than ``partial_attention``: everywhere but bf16/fp16 on a CPU without AMX,
    where torch's CPU kernel measured ~3x slower than the matmuls (float32: ~15% faster)."""
    return k.device.type != "cpu" or k.dtype == torch.float32 or _cpu_half_flash(k)


class DecodeState:
    """What every layer's ``DecodeCache`` shares in a step (set by the decoder between steps).

    own_pos (B,): the slot of the row part where this step's key goes (the row sees slots
    0..own_pos); own_invalid (B, 1, 1, capacity): the slots past it. ``slot``: a host int when
    every row writes the same slot (a row part of generated tokens only: a live row's own_pos is
    the slot; a finished row keeps its position and writes the slot too, never read again): the
    write is then a plain strided copy, the mask (1, 1, 1, capacity), and a reserved buffer is read
    as exactly its first slot + 1 slots with no mask. Only where host
    values cost nothing (the CPU): a host int changing every step would be baked into a captured
    CUDA graph. With a prefix part:
    group_slot (B,) places row b at ``group * width + slot`` of the (groups * width) query grid
    (None: row b is place b, the rows are the grid), prefix_invalid (G, 1, 1, P) marks pads past
    each group's prompt."""

    def __init__(self, own_pos: torch.Tensor, group_slot: torch.Tensor | None = None, groups: int = 0,
                 width: int = 1, prefix_invalid: torch.Tensor | None = None, slot: int | None = None):
        self.own_pos, self.group_slot, self.slot = own_pos, group_slot, slot
        self.groups, self.width, self.prefix_invalid = groups, width, prefix_invalid
        self.own_invalid: torch.Tensor | None = None
        # the masks as additive biases, for a kernel that takes those (built once, for every layer)
        self.own_bias: torch.Tensor | None = None
        self._prefix_bias: torch.Tensor | None = None

    def mask_slots(self, capacity: int, bias_dtype: torch.dtype | None = None) -> None:
        """The row part's mask for this step (once per step, shared by all layers), and as an
        additive bias of ``bias_dtype`` if given."""
        slots = torch.arange(capacity, device=self.own_pos.device)
        if self.slot is None:
            self.own_invalid = (slots > self.own_pos[:, None])[:, None, None, :]
        else:
            self.own_invalid = (slots > self.slot)[None, None, None, :]
        self.own_bias = None if bias_dtype is None else additive(self.own_invalid, bias_dtype)

    def prefix_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``prefix_invalid`` as an additive bias, built on first use after each change of it."""
        if self._prefix_bias is None:
            self._prefix_bias = additive(self.prefix_invalid, dtype)
        return self._prefix_bias

    def keep_groups(self, groups: torch.Tensor) -> None:
        self.prefix_invalid, self._prefix_bias = self.prefix_invalid[groups], None


class DecodeCache:
    """One layer's keys and values for decoding: the row part (B, Hkv, capacity, D) and, when rows
    share prompts, the prefix part (G, Hkv, P, D). ``fastdpo.models.kv_cache.attend`` hands the
    attention of a layer holding one to ``attend`` below."""

    def __init__(self, state: DecodeState, own_k: torch.Tensor, own_v: torch.Tensor,
                 prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None):
        self.state, self.k, self.v = state, own_k, own_v
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        self.length = own_k.shape[2]   # the slots attention reads: the buffer's first ``length``
        self.reserved = False

    @property
    def capacity(self) -> int:
        return self.length

    def grow(self, capacity: int) -> None:
        """Attend over ``capacity`` slots from now on (the old slots are kept): within a reserved
        buffer a longer view, else a reallocation."""
        if capacity <= self.length:
            return
        if capacity > self.k.shape[2]:   # past a reserved buffer: double it, not 8 slots at a time
            self._reallocate(max(capacity, 2 * self.k.shape[2]) if self.reserved else capacity)
        self.length = capacity

    def reserve(self, slots: int) -> None:
        """Allocate the row part's ``slots`` now where attention can read a view of it at full
        speed (torch's CPU flash kernel in half precision), so ``grow`` rarely reallocates: each
        reallocation of a fresh buffer costs page faults and a copy of every slot so far. Callers
        cap ``slots`` (``RESERVE_MAX``): rows that stop early at eos never use a long budget."""
        if _cpu_half_flash(self.k):
            if slots > self.k.shape[2]:
                self._reallocate(slots)
            self.reserved = True

    @property
    def exact_view(self) -> bool:
        """Whether attention reads exactly the written slots, unmasked (a reserved buffer, where
        views are read at full speed, and one slot for every row)."""
        return self.reserved and self.state.slot is not None

    @property
    def grain(self) -> int:
        """The row part grows by this many slots."""
        return RESERVED_CHUNK if self.reserved else CHUNK

    @property
    def bias_dtype(self) -> torch.dtype | None:
        """The dtype of the additive masks this cache's attention kernel takes (None: boolean)."""
        return self.k.dtype if _cpu_half_flash(self.k) else None

    def _reallocate(self, slots: int) -> None:
        B, H, old, D = self.k.shape
        k, v = self.k.new_zeros(B, H, slots, D), self.v.new_zeros(B, H, slots, D)
        k[:, :, :old], v[:, :, :old] = self.k, self.v
        self.k, self.v = k, v

    def select(self, rows: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """Keep the given rows (and prefix groups): drops finished rows between steps."""
        self.k, self.v = self.k[rows], self.v[rows]
        if groups is not None and self.prefix_k is not None:
            self.prefix_k, self.prefix_v = self.prefix_k[groups], self.prefix_v[groups]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's ``k``, ``v`` (B, Hkv, 1, D) at each row's slot; return the attention
        of ``q`` (B, H, 1, D) over the row's prompt and tokens so far, (B, H, 1, D)."""
        B, H, T, D = q.shape
        if T != 1:
            raise ValueError(f"a DecodeCache decodes one token per row, got {T}")
        st, hk = self.state, k.shape[1]
        if st.slot is not None:
            self.k[:, :, st.slot] = k[:, :, 0]
            self.v[:, :, st.slot] = v[:, :, 0]
        else:
            rows = torch.arange(B, device=q.device)
            self.k[rows, :, st.own_pos] = k[:, :, 0]
            self.v[rows, :, st.own_pos] = v[:, :, 0]
        q = q.reshape(B, hk, H // hk, D)          # query heads h*rep .. h*rep+rep-1 read kv head h
        own_k, own_v, invalid, bias = self.k, self.v, st.own_invalid, st.own_bias
        if self.exact_view:                       # every slot written so far and no other
            own_k, own_v, invalid, bias = self.k[:, :, :st.slot + 1], self.v[:, :, :st.slot + 1], None, None
        elif self.length < own_k.shape[2]:        # a reserved buffer: its first ``length`` slots
            own_k, own_v = own_k[:, :, :self.length], own_v[:, :, :self.length]
        if self.prefix_k is None and _fused_is_faster(own_k):
            visible = None if invalid is None else ~invalid
            out = F.scaled_dot_product_attention(q, own_k, own_v, attn_mask=visible)
        else:
            out, lse = partial_attention(q, own_k, own_v, invalid, bias)
            if self.prefix_k is not None:
                out = merge_attention(out, lse, *self._prefix_attention(q))
        return out.reshape(B, H, 1, D).to(q.dtype)

    def _prefix_attention(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's rows' queries as one (width * rep)-row matrix against the group's prompt,
        read once; unused grid places hold zero queries whose results are never gathered."""
        st = self.state
        B, hk, rep, D = q.shape
        G, W = st.groups, st.width
        grid = q
        if st.group_slot is not None:
            grid = q.new_zeros(G * W, hk, rep, D)
            grid[st.group_slot] = q
        grid = grid.view(G, W, hk, rep, D).transpose(1, 2).reshape(G, hk, W * rep, D)
        bias = None if self.bias_dtype is None else st.prefix_bias(self.bias_dtype)
        out, lse = partial_attention(grid, self.prefix_k, self.prefix_v, st.prefix_invalid, bias)

        def per_row(t: torch.Tensor) -> torch.Tensor:
            t = t.view(G, hk, W, rep, -1).transpose(1, 2).reshape(G * W, hk, rep, -1)
            return t if st.group_slot is None else t[st.group_slot]

        return per_row(out), per_row(lse)
