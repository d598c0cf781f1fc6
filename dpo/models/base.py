"""What every model family shares: its config's dict round trip and the logits forward.

A family's config dataclass subclasses ``DictConfig`` (checkpoints store ``to_dict()``; unknown
fields are refused by name, validation lives in each ``__post_init__``). A family's model
subclasses ``CausalLM`` and provides ``hidden_states`` (after the final norm), ``lm_head_weight``
(V, C) and ``blocks``; see ``fastdpo.models.families`` for the whole contract.
"""
from __future__ import annotations

from dataclasses import asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


class DictConfig:
    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**d)

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
