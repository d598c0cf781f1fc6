"""The Llama family in plain PyTorch: Llama 2/3, Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k norm).

RMSNorm, rotary position embeddings (RoPE, with Llama 3's ``rope_scaling``), a SwiGLU MLP,
grouped-query attention (the KV cache holds ``n_kv_head`` heads) and a tied or separate lm_head.
Reading order: config and presets, RoPE, norm, attention, MLP, block, model.

Parameter names are transformers' (``model.layers.0.self_attn.q_proj.weight`` ...), so importing a
Hugging Face checkpoint, exporting one and naming LoRA targets need no renaming. RoPE is computed
from the positions each call passes: one position per row and token, so right-padded ragged
batches, per-row decode cursors and the packed shared-prompt layout all rotate every token by its
own position.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdpo.errors import ConfigError
from fastdpo.models.base import CausalLM, DictConfig
from fastdpo.models.kv_cache import KVCache, attend, checked_positions
from fastdpo.models.recompute import run_block
from fastdpo.models.schema import PositiveFloat, PositiveInt, config_class

VARIANTS = ("llama", "mistral", "qwen2", "qwen3")   # transformers' model_type on export
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_ROPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@config_class(strict=True)   # written by programs: 4.0 is not a layer count
class LlamaConfig(DictConfig):
    vocab_size: PositiveInt = 32000
    block_size: PositiveInt = 2048      # the context: transformers' max_position_embeddings
    n_layer: PositiveInt = 12
    n_head: PositiveInt = 12
    n_kv_head: PositiveInt = 4          # grouped-query attention: n_head // n_kv_head queries per key
    n_embd: PositiveInt = 768
    intermediate_size: PositiveInt = 2048
    head_dim: PositiveInt | None = None   # default n_embd // n_head (Qwen3 sets its own)
    rope_theta: PositiveFloat = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "linear"|"dynamic"|"llama3", "factor": ...}
    norm_eps: PositiveFloat = 1e-5
    qkv_bias: bool = False              # Qwen2's q/k/v biases; Llama's attention_bias sets o_bias too
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False               # Qwen3: RMSNorm over each head of q and k before RoPE
    tie_word_embeddings: bool = False
    model_type: Literal[VARIANTS] = "llama"   # which transformers architecture this is (export)

    def __post_init__(self):
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                                  f"unless head_dim is given")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        self.rope_scaling = _normalized_rope_scaling(self.rope_scaling)
        problem = _variant_problem(self)
        if problem:
            raise ConfigError(f"LlamaConfig: model_type {self.model_type!r} {problem}")


def _normalized_rope_scaling(scaling: dict | None) -> dict | None:
    """transformers' rope_scaling / rope_parameters as {"rope_type": ..., its numbers}; None for
    plain RoPE. Legacy files spell the type ``type``."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a mapping, got {type(scaling).__name__}")
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {list(ROPE_TYPES)})")
    if kind == "default":
        return None
    missing = [k for k in _ROPE_KEYS[kind] if not isinstance(out.get(k), (int, float))]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} needs numbers {missing}")
    if not out["factor"] >= 1:
        raise ValueError(f"rope_scaling factor must be >= 1, got {out['factor']}")
    return {"rope_type": kind, **out}


def _variant_problem(cfg: LlamaConfig) -> str | None:
    """What transformers' class for ``model_type`` cannot express (None if it fits)."""
    if cfg.model_type in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        return "has one attention_bias for q/k/v/o: qkv_bias and o_bias must agree"
    if cfg.model_type != "qwen3" and cfg.qk_norm:
        return "has no q/k norm (qk_norm is Qwen3's)"
    if cfg.model_type == "qwen3" and not cfg.qk_norm:
        return "always has q/k norms (qk_norm must be true)"
    if cfg.model_type == "qwen2" and (not cfg.qkv_bias or cfg.o_bias):
        return "has q/k/v biases and no o_proj bias (qkv_bias true, o_bias false)"
    if cfg.model_type == "mistral" and (cfg.qkv_bias or cfg.o_bias):
        return "has no attention biases"
    if cfg.model_type != "llama" and cfg.mlp_bias:
        return "has no MLP biases (mlp_bias is Llama's)"
    return None


# Named shapes. vocab_size is usually overridden by the tokenizer's size.
PRESETS: dict[str, dict] = {
    # the ``tiny`` GPT's size in Llama form (~1.3M parameters with a 2k vocabulary)
    "llama-tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=160, intermediate_size=432, block_size=256),
    # ~124.7M parameters with a 32k vocabulary and a separate lm_head: GPT-2 small's budget in Llama
    # form (3 query heads per key/value head), for benchmarks next to ``gpt2-124m``.
    "llama-124m": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2048,
                       block_size=1024, vocab_size=32000),
}


# -- rotary position embeddings -------------------------------------------------------------------
def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """The (head_dim / 2,) float32 rotation frequencies, scaled as ``rope_scaling`` says.

    ``dynamic`` (NTK) scaling only changes the frequencies for sequences longer than
    max_position_embeddings, which is the model's block_size here: inside the context it is plain
    RoPE, so it is computed as such."""
    dim = cfg.head_dim
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (cfg.rope_theta ** (steps / dim))
    s = cfg.rope_scaling
    if s is None or s["rope_type"] == "dynamic":
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, the band between interpolated
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B or 1, 1, T, head_dim), float32, for positions ``pos`` (B, T) or (T,)."""
    pos = pos if pos.dim() == 2 else pos[None]
    freqs = pos.float()[..., None] * inv_freq            # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]     # halves rotate together (rotate_half layout)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D): the pair (x[i], x[i + D/2]) turns by its frequency times the position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# -- layers ---------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()   # the mean square in float32 whatever the activations' dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, pos, kv_cache: KVCache | None = None, attn_mask=None):
        """See ``fastdpo.models.kv_cache.attend`` for the cache and mask semantics."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        y = attend(q, k, v, pos, kv_cache, attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, pos, kv_cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, kv_cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    family = "llama"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Not a buffer: ``model.to(torch.bfloat16)`` must not round the frequencies.
        self._inv_freq = {"cpu": rope_inv_freq(cfg)}

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection (V, C): the token embedding when tied."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order (FSDP shards and gradient checkpointing wrap these)."""
        return self.model.layers

    def num_params(self, non_embedding: bool = True) -> int:
        """All parameters (RoPE has no position table to leave out)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Forward+backward FLOPs per trained token (PaLM appendix B accounting)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq:
            self._inv_freq[key] = self._inv_freq["cpu"].to(device)
        return self._inv_freq[key]

    def hidden_states(self, ids: torch.Tensor, pos: torch.Tensor | None = None, kv_caches=None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm activations (B, T, C); ``logits = hidden_states @ lm_head_weight.T``.

        ``pos`` (B, T) or (T,) gives each token's position (default ``arange(T)``): RoPE rotates
        by it. ``kv_caches`` is one ``KVCache`` per layer and ``attn_mask`` the bool mask that goes
        with a decode step or the packed layout (see ``fastdpo.models.kv_cache.attend``)."""
        pos = checked_positions(ids, pos, kv_caches, self.config)
        cos, sin = rope_cos_sin(pos, self._frequencies(ids.device))
        x = self.model.embed_tokens(ids)
        for i, block in enumerate(self.model.layers):
            x = run_block(self, block, x, cos, sin, pos, kv_cache=None if kv_caches is None else kv_caches[i],
                          attn_mask=attn_mask)
        return self.model.norm(x)
