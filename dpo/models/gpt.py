"""A GPT-2-shaped decoder in plain PyTorch: the policy (and reference) model fastdpo trains.

Reading order: config and presets, attention, MLP, block, model. Parameter names follow the
GPT-2 / nanoGPT layout (``transformer.wte``, ``transformer.h.0.attn.c_attn`` ...) so the seed's
legacy checkpoints import without renaming.

The forward pass takes positions explicitly (one per row and token) instead of assuming
``arange(T)``: right-padded ragged batches and per-row decode cursors need that.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdpo.errors import ConfigError
from fastdpo.models.base import CausalLM, DictConfig
from fastdpo.models.kv_cache import KVCache, attend, checked_positions
from fastdpo.models.recompute import run_block
from fastdpo.models.schema import Fraction, PositiveInt, config_class

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "config_from_preset"]


@config_class(strict=True)   # written by programs: 4.0 is not a layer count
class GPTConfig(DictConfig):
    vocab_size: PositiveInt = 50304
    block_size: PositiveInt = 1024
    n_layer: PositiveInt = 12
    n_head: PositiveInt = 12
    n_embd: PositiveInt = 768
    dropout: Fraction = 0.0
    bias: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


# Named shapes. vocab_size is usually overridden by the tokenizer's size.
PRESETS: dict[str, dict] = {
    # ~1.3M parameters with a 2k vocabulary: trains in minutes on two CPU cores.
    "tiny": dict(n_layer=4, n_head=4, n_embd=160, block_size=256),
    # GPT-2 small (124M with the 50257-token vocabulary; 50304 pads it to a multiple of 64).
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    # a mid shape with a modern vocabulary (6 layers, 512 wide, V=32768: ~36M parameters, half of
    # them in the embedding), where the lm_head dominates the step more than at 124M
    "gpt2-mid": dict(n_layer=6, n_head=8, n_embd=512, block_size=1024, vocab_size=32768),
}


def config_from_preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None):
        """See ``fastdpo.models.kv_cache.attend`` for the cache and mask semantics."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, pos, kv_cache, attn_mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, pos=None, kv_cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), pos=pos, kv_cache=kv_cache, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(CausalLM):
    family = "gpt2"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.apply(self._init_weights)
        # GPT-2's residual scaling: each block adds two projections onto the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection (V, C). Tied to the token embedding, as in GPT-2."""
        return self.transformer.wte.weight

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order (FSDP shards and gradient checkpointing wrap these)."""
        return self.transformer.h

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Forward+backward FLOPs per trained token (PaLM appendix B accounting)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def hidden_states(self, ids: torch.Tensor, pos: torch.Tensor | None = None, kv_caches=None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm activations (B, T, C); ``logits = hidden_states @ lm_head_weight.T``.

        ``pos`` (B, T) or (T,) gives each token's position (default ``arange(T)``).
        ``kv_caches`` is one ``KVCache`` per layer (see ``fastdpo.generation.sampler``) and ``attn_mask``
        the bool
        (B, 1, T, L) mask over the first L cache slots that goes with a decode step; a cached call
        without ``attn_mask`` is a prefill from position 0."""
        pos = checked_positions(ids, pos, kv_caches, self.config)
        x = self.transformer.drop(self.transformer.wte(ids) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = run_block(self, block, x, pos=pos, kv_cache=None if kv_caches is None else kv_caches[i],
                          attn_mask=attn_mask)
        return self.transformer.ln_f(x)
