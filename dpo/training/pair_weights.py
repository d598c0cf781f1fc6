"""Per-pair loss weights from preference margins (``dpo.margin_weighting``).

A pair the judge preferred by a wide margin is stronger evidence than one decided by a point, so
its loss may count more. A pair's margin is, in this order: the weighted mean over its
``dimensions`` of ``chosen - rejected`` when ``dpo.dimension_weights`` is set (the run's own weights
win over the miner's), its row's ``weighted_margin`` (written by multi-rubric mining), that mean
with equal weights, or ``score_chosen - score_rejected``. Margins
below zero count as zero. The weights are the margins divided by their mean over the training
pairs, so the average weight is 1 and the learning rate keeps its meaning; pairs without any
margin field weigh 1 (the mean of the others), and a data set without margins trains unweighted.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastdpo.training.data import DataError


def pair_margin(fields: Mapping | None, dimension_weights: Mapping[str, float] | None = None) -> float | None:
    """The margin of one row (module docstring), or None when it carries none."""
    if not fields:
        return None
    dims = fields.get("dimensions")
    if fields.get("weighted_margin") is not None and (dimension_weights is None or dims is None):
        return _number(fields["weighted_margin"], "weighted_margin")
    if dims is not None:
        if not isinstance(dims, Mapping) or not dims:
            raise DataError(f"'dimensions' must map names to {{'chosen': x, 'rejected': y}}, got {dims!r}")
        total = num = 0.0
        for name, d in dims.items():
            if not isinstance(d, Mapping) or "chosen" not in d or "rejected" not in d:
                raise DataError(f"dimensions.{name} must be {{'chosen': x, 'rejected': y}}, got {d!r}")
            w = 1.0 if dimension_weights is None else float(dimension_weights.get(name, 0.0))
            num += w * (_number(d["chosen"], f"dimensions.{name}.chosen")
                        - _number(d["rejected"], f"dimensions.{name}.rejected"))
            total += w
        return num / total if total else None
    if fields.get("score_chosen") is not None and fields.get("score_rejected") is not None:
        return (_number(fields["score_chosen"], "score_chosen")
                - _number(fields["score_rejected"], "score_rejected"))
    return None


def pair_weights(margin_fields: Sequence[Mapping | None],
                 dimension_weights: Mapping[str, float] | None = None) -> list[float]:
    """One weight per pair, mean 1 over the pairs that have a margin (module docstring)."""
    margins = [pair_margin(f, dimension_weights) for f in margin_fields]
    known = [max(0.0, m) for m in margins if m is not None]
    mean = sum(known) / len(known) if known else 0.0
    if mean <= 0:
        return [1.0] * len(margins)
    return [1.0 if m is None else max(0.0, m) / mean for m in margins]


def _number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"'{name}' must be a number, got {v!r}")
    return float(v)
