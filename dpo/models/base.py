"""What every model family shares: its config's dict round trip and the logits forward.

A family's config dataclass subclasses ``DictConfig`` (checkpoints store ``to_dict()``; unknown
fields are refused by name; types and ranges are the schema's, ``fastdpo.models.schema``, and rules
between fields live in each ``__post_init__``). A family's model
subclasses ``CausalLM`` and provides ``hidden_states`` (after the final norm), ``lm_head_weight``
(V, C) and ``blocks``; see ``fastdpo.models.families`` for the whole contract.
"""
from __future__ import annotations

from dataclasses import asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdpo.errors import ConfigError


class DictConfig:
    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**d)   # validated by the class's schema (fastdpo.models.schema)

    def to_dict(self) -> dict:
        return asdict(self)


class CausalLM(nn.Module):
    family: str                      # the name checkpoints record (``fastdpo.models.families``)
    gradient_checkpointing = False   # per-block activation checkpointing (fastdpo.models.recompute)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor | None = None, kv_caches=None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) at every position."""
        h = self.hidden_states(ids, pos=pos, kv_caches=kv_caches, attn_mask=attn_mask)
        return F.linear(h, self.lm_head_weight)
