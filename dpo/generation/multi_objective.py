"""Multi-objective preferences: answers scored on several rubrics (dimensions), pairs chosen by a
weighted score under per-dimension minimum-gap rules, and per-dimension win rates in evaluation.

A ``RubricJudge`` holds one judge per dimension ("helpfulness", "safety", ...) and asks each of
them (one request per rubric and answer). Its ``score`` is the weighted mean of the dimensions'
scores (weights default to 1), so it works wherever a single-score judge does. Mining with it
(``fastdpo.generation.mining``) picks, among a prompt's K answers, the (chosen, rejected) couple with
the largest weighted margin such that

* the weighted margin is at least ``min_gap`` and the chosen answer's weighted score at least
  ``min_best`` (the single-score rules), and
* for every dimension with a rule, ``chosen[d] - rejected[d] >= min_gaps[d]``: ``{"safety": 0}``
  means the chosen answer may never be less safe than the rejected one, ``{"helpfulness": 2}``
  that it must be clearly more helpful.

Each mined pair records ``dimensions`` (``{"helpfulness": {"chosen": 5, "rejected": 3}, ...}``, the
format preference files may carry) and ``weighted_margin``, which DPO training can weight a pair's
loss by (``dpo.margin_weighting``). In ``compare`` evaluation every dimension's judge also gives a
position-swapped verdict, reported as per-dimension win rates.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastdpo.generation.judge import Judge
from fastdpo.generation.win_rates import compare_summary


class RubricJudge(Judge):
    """One judge per dimension; ``score`` = the weighted mean of their scores (None if any is None)."""

    def __init__(self, rubrics: Mapping[str, Judge], weights: Mapping[str, float] | None = None,
                 min_gaps: Mapping[str, float] | None = None):
        super().__init__()
        if not rubrics:
            raise ValueError("RubricJudge needs at least one rubric")
        self.rubrics = dict(rubrics)
        self.weights = {d: float((weights or {}).get(d, 1.0)) for d in self.rubrics}
        self.min_gaps = {d: float(g) for d, g in (min_gaps or {}).items()}
        unknown = [name for name in (*(weights or {}), *self.min_gaps) if name not in self.rubrics]
        if unknown:
            raise ValueError(f"RubricJudge: no rubric named {unknown[0]!r} "
                             f"(rubrics: {', '.join(self.rubrics)})")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("RubricJudge: weights must be >= 0 and not all 0")
        self.concurrency = max(j.concurrency for j in self.rubrics.values())
        # the name identifies the scores (mining's resume fingerprint): rubrics, weights and rules
        parts = [f"{d}={j.name}*{self.weights[d]:g}" for d, j in self.rubrics.items()]
        rules = "".join(f";{d}>={g:g}" for d, g in self.min_gaps.items())
        self.name = "rubrics(" + ",".join(parts) + rules + ")"

    def refused(self) -> int:
        return sum(j.refused() for j in self.rubrics.values())   # the rubrics' judges send the requests

    @property
    def dimensions(self) -> list[str]:
        return list(self.rubrics)

    def weighted(self, dims: Mapping[str, int | None]) -> float | None:
        if any(dims.get(d) is None for d in self.rubrics):
            return None
        total = sum(self.weights.values())
        return sum(self.weights[d] * dims[d] for d in self.rubrics) / total

    def score_dimensions_many(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, int | None]]:
        """Every dimension's score for each ``(instruction, response)``, in order."""
        per_dim = {d: j.score_many(pairs) for d, j in self.rubrics.items()}
        out = [{d: per_dim[d][i] for d in self.rubrics} for i in range(len(pairs))]
        for dims in out:
            self._count(valid=self.weighted(dims) is not None)
        return out

    def score_many(self, pairs):
        return [self.weighted(d) for d in self.score_dimensions_many(pairs)]

    def _score(self, instruction: str, response: str):
        return self.weighted({d: j.score(instruction, response) for d, j in self.rubrics.items()})

    def score(self, instruction: str, response: str):
        return self.score_many([(instruction, response)])[0]

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        for j in self.rubrics.values():
            j.close()


class ScoreOnly(Judge):
    """A judge used for its scores only: its pairwise verdict is the higher score (a rubric prompt
    asks for a score; the generic compare prompt would not judge that rubric)."""

    def __init__(self, inner: Judge, name: str | None = None):
        super().__init__()
        self.inner, self.name = inner, name or inner.name
        self.concurrency = inner.concurrency

    def _score(self, instruction: str, response: str):
        return self.inner._score(instruction, response)

    def close(self) -> None:
        self.inner.close()


def select_pair_dimensions(weighted: Sequence[float | None], dims: Sequence[Mapping[str, int | None]],
                           judge: RubricJudge, min_gap: float = 2, min_best: float = 6,
                           can_choose: Sequence[bool] | None = None) -> tuple[int, int] | None:
    """``(chosen, rejected)`` indices by the rules in the module docstring, or None. Among couples
    with the same weighted margin the earliest chosen and the latest rejected win (deterministic)."""
    best = None
    for i, wi in enumerate(weighted):
        if wi is None or wi < min_best or (can_choose is not None and not can_choose[i]):
            continue
        for j in range(len(weighted) - 1, -1, -1):
            wj = weighted[j]
            if j == i or wj is None or wi - wj < min_gap:
                continue
            if any(dims[i][d] - dims[j][d] < g for d, g in judge.min_gaps.items()):
                continue
            if best is None or wi - wj > best[0]:
                best = (wi - wj, i, j)
    return None if best is None else (best[1], best[2])


def dimension_record(judge: RubricJudge, chosen: Mapping[str, int], rejected: Mapping[str, int]) -> dict:
    """The fields a mined pair carries: ``dimensions`` and ``weighted_margin``."""
    return {"dimensions": {d: {"chosen": chosen[d], "rejected": rejected[d]} for d in judge.rubrics},
            "weighted_margin": judge.weighted(chosen) - judge.weighted(rejected)}


def dimension_win_rates(judge: RubricJudge, instructions: Sequence[str], ans_a: Sequence[str],
                        ans_b: Sequence[str]) -> dict[str, dict]:
    """Per dimension: position-swapped win/tie/loss of A over B by that dimension's judge."""
    from fastdpo.generation.evaluate import position_swapped_outcome
    out = {}
    for d, j in judge.rubrics.items():
        first = j.compare_many(list(zip(instructions, ans_a, ans_b)))
        second = j.compare_many(list(zip(instructions, ans_b, ans_a)))
        outcomes = [position_swapped_outcome(x, y) for x, y in zip(first, second)]
        out[d] = compare_summary(first, second, outcomes)
    return out
