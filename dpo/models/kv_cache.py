"""The per-layer KV cache and the attention call every model family shares.

Each row keeps its own write cursor: row ``b``'s token at position ``pos[b, t]`` lives in cache slot
``pos[b, t]``, so right-padded ragged prompts and rows that decode at different lengths share one
buffer. Grouped-query attention stores only the ``n_kv_heads`` heads the layer computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdpo.models.decode_cache import DecodeCache
from fastdpo.models.segments import Segments, attend_segments

# Cache-less forwards (training, reference and evaluation log-probs) on CPU in half precision:
# rows up to this many tokens attend by the plain formula (``short_attention``). Torch's CPU flash
# attention (SDPA) spends most of a short row's time outside the arithmetic: bf16 forward +
# backward with a mask, 2 threads, measured 11.4 vs 2.3 ms at (32 rows, 4 heads, 40 tokens, 40
# dims), 20.8 vs 13.4 ms at (12, 8, 128, 64), 16.6 vs 11.0 at (8, 8, 160, 64), and SDPA ahead from
# 192 tokens on (12.1 vs 17.5 ms at (8, 8, 192, 64)).
SHORT_ATTENTION_MAX = 128


class KVCache:
    """One layer's keys and values, preallocated as (rows, kv_heads, max_len, head_dim).

    The buffers are allocated on the first ``update``, in the dtype the attention produces
    (float32, or bf16 under autocast), with as many heads as the keys written."""

    def __init__(self, rows: int, max_len: int):
        self.rows, self.max_len = rows, max_len
        self.k = self.v = None

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write ``k``, ``v`` (rows, heads, T, head_dim) at positions ``pos`` (rows, T); return the
        whole buffers."""
        if self.k is None:
            shape = (self.rows, k.shape[1], self.max_len, k.shape[3])
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, pos] = k.transpose(1, 2)  # advanced indices first: (rows, T, heads, hd)
        self.v[rows, :, pos] = v.transpose(1, 2)
        return self.k, self.v

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) the given rows: fans one prefilled prompt out to its K samples and
        drops finished rows so later decode steps cost less."""
        self.k, self.v, self.rows = self.k[rows], self.v[rows], len(rows)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
           kv_cache: KVCache | DecodeCache | None = None, attn_mask: torch.Tensor | None = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention of ``q`` (B, H, T, D) over ``k``, ``v`` (B, H_kv, T, D).

    Plain causal attention over this call's tokens unless ``attn_mask`` is given. With a
    ``kv_cache`` the keys/values are also written into it at ``pos`` (B, T); then ``attn_mask``
    (B, 1, T, L) bool, if given, selects which of the first L cached slots each query sees (a
    decode step); without it the call is a prefill from position 0. Without a cache,
    ``attn_mask`` (B, 1, T, T) replaces the causal mask (the packed shared-prompt layout), or
    ``Segments`` says which sequences a padding-free flat row holds (``fastdpo.models.segments``).
    A ``DecodeCache`` (the sampler's decode steps) does its own attention, positions included."""
    if isinstance(kv_cache, DecodeCache):
        return kv_cache.attend(q, k, v)
    if isinstance(attn_mask, Segments):
        return attend_segments(q, k, v, attn_mask, dropout_p)
    B, _, T, _ = q.shape
    if kv_cache is not None:
        k_all, v_all = kv_cache.update(pos.expand(B, T), k, v)
        if attn_mask is not None:  # attend over the cache, only as far as the mask reaches
            L = attn_mask.shape[-1]
            k, v = k_all[:, :, :L], v_all[:, :, :L]
    gqa = k.shape[1] != q.shape[1]
    if kv_cache is None and short_attention_pays(q):
        return short_attention(q, k, v, attn_mask, dropout_p)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)


def short_attention_pays(q: torch.Tensor) -> bool:
    """A cache-less forward on CPU in half precision (bf16 or fp16) whose rows are at most
    ``SHORT_ATTENTION_MAX`` wide (the batch's padded or bin width): there ``short_attention`` beats
    SDPA's CPU kernel. Not a question of gradients: the cached reference's forward (no gradients)
    takes the same kernel as the policy's at the same width (with the kernel differing by gradient
    mode, a bf16 step-0 loss moved 8e-6 off ln 2; batches of other widths still round apart, ~1e-4)."""
    half = q.dtype in (torch.bfloat16, torch.float16)
    return q.device.type == "cpu" and half and q.shape[2] <= SHORT_ATTENTION_MAX


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``q`` (B, H, T, D) over ``k``, ``v`` (B, H_kv, T, D) by the formula: scores (from
    float32 copies of q and k: a half-precision product would round the scores before the softmax,
    up to 0.3 off at logits of a few units) and softmax in float32, the weighted sum in the inputs'
    dtype. Causal unless ``attn_mask`` (B, 1, T, T) bool says which keys each query sees (every
    query must see at least one)."""
    if k.shape[1] != q.shape[1]:                              # grouped-query attention
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    T = q.shape[2]
    if attn_mask is None:
        attn_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs.to(v.dtype) @ v


def checked_positions(ids: torch.Tensor, pos: torch.Tensor | None, kv_caches, config) -> torch.Tensor:
    """The positions of a forward over ``ids`` (B, T): ``pos`` as given, or ``arange(T)``; an
    error if one falls outside ``config.block_size`` or the caches do not match the layers."""
    T = ids.shape[1]
    if kv_caches is not None and len(kv_caches) != config.n_layer:
        raise ValueError(f"need one KV cache per layer ({config.n_layer}), got {len(kv_caches)}")
    if pos is None:
        if T > config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {config.block_size}")
        return torch.arange(T, device=ids.device)
    if not pos.numel():
        return pos
    if not position_check_on_host(pos.device):   # a host read of pos.max() would wait for the device
        torch._assert_async(pos.max() < config.block_size, f"a position exceeds block_size "
                                                            f"{config.block_size}")
    elif int(pos.max()) >= config.block_size:
        raise ValueError(f"position {int(pos.max())} exceeds block_size {config.block_size}")
    return pos


def position_check_on_host(device: torch.device) -> bool:
    """Whether ``checked_positions`` reads the largest position on the host (a clear ValueError):
    on CPU, where that costs nothing; elsewhere it asserts on the device (no host sync)."""
    return device.type == "cpu"
