"""What every model family's config dataclass shares: dict in, dict out (checkpoints store
``to_dict()``), with unknown fields refused by name (validation lives in each ``__post_init__``)."""
from __future__ import annotations

from dataclasses import asdict, fields


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
