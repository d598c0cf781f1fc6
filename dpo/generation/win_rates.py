"""Summaries of judged head-to-head answers: position-swapped win/tie/loss rates, mean scores, win
rates per category, and AlpacaEval's length-controlled win rate.

The length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval") answers "what
would the judge prefer if both answers were equally long?": a logistic model of the preference for
A, ``P(A) = sigmoid(theta0 + theta1 * tanh(delta / sd(delta)))`` with ``delta`` the answers'
length difference in characters (what the judge reads), fitted by Newton's method (IRLS) on
targets win = 1, tie = 1/2, loss = 0, and read at ``delta = 0``: ``sigmoid(theta0)``. A ridge of
1e-6 keeps the fit finite when one side wins everything (the estimate then tends to 0 or 1). It is
comparable with the raw win rate that counts ties as half.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fastdpo.training.health import repetition_stats

OUTCOME_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def compare_summary(first: Sequence[str], second: Sequence[str], outcomes: Sequence[str]) -> dict:
    """Counts and rates of position-swapped outcomes; ``first``/``second`` are the verdicts with A
    shown first and with B shown first."""
    n = len(outcomes)
    win, loss = outcomes.count("win"), outcomes.count("loss")
    tie = n - win - loss
    agree = sum((v1 == "A" and v2 == "B") or (v1 == "B" and v2 == "A") or (v1 == v2 == "TIE")
                for v1, v2 in zip(first, second))
    decisive = [v for v in [*first, *second] if v != "TIE"]
    return {
        "win": win, "tie": tie, "loss": loss,
        "win_rate": win / n if n else None, "tie_rate": tie / n if n else None,
        "loss_rate": loss / n if n else None,
        "win_rate_decided": win / (win + loss) if win + loss else None,
        "win_rate_ties_half": (win + tie / 2) / n if n else None,
        "order_agreement": agree / n if n else None,
        # share of decisive verdicts that picked whichever answer was shown first: 0.5 = no bias
        "first_position_rate": decisive.count("A") / len(decisive) if decisive else None}


def score_summary(sa: Sequence[int | None], sb: Sequence[int | None]) -> dict:
    return {"mean_a": mean_or_none(s for s in sa if s is not None),
            "mean_b": mean_or_none(s for s in sb if s is not None),
            "invalid_a": list(sa).count(None), "invalid_b": list(sb).count(None),
            "hist_a": _hist(sa), "hist_b": _hist(sb)}


def answer_summary(ans_a: Sequence[str], ans_b: Sequence[str], ids_a: Sequence[Sequence[int]],
                   ids_b: Sequence[Sequence[int]]) -> dict:
    """Both sides' average answer length (characters, tokens) and repetition (``repeat_4``,
    ``distinct_2``: ``fastdpo.training.health.repetition_stats``)."""
    return {"length": {"avg_chars_a": mean_or_none(map(len, ans_a)),
                       "avg_chars_b": mean_or_none(map(len, ans_b)),
                       "avg_tokens_a": mean_or_none(map(len, ids_a)),
                       "avg_tokens_b": mean_or_none(map(len, ids_b))},
            "repetition": {"a": repetition_stats(ids_a), "b": repetition_stats(ids_b)}}


def length_controlled_win_rate(outcomes: Sequence[str], len_a: Sequence[float], len_b: Sequence[float],
                               ridge: float = 1e-6, max_steps: int = 50) -> float | None:
    """AlpacaEval's length-controlled win rate of A over B (module docstring)."""
    if not outcomes:
        return None
    y = np.array([OUTCOME_VALUE[o] for o in outcomes])
    delta = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    sd = delta.std()
    x = np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)
    X = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    for _ in range(max_steps):
        p = 1 / (1 + np.exp(-(X @ theta)))
        grad = X.T @ (y - p) - ridge * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-theta[0])))


def category_win_rates(categories: Sequence[str], outcomes: Sequence[str]) -> dict[str, dict]:
    """Win/tie/loss and the win rate (ties count half) per category, in first-seen order."""
    out: dict[str, dict] = {}
    for cat, o in zip(categories, outcomes):
        c = out.setdefault(cat, {"n": 0, "win": 0, "tie": 0, "loss": 0})
        c["n"] += 1
        c[o] += 1
    for c in out.values():
        c["win_rate_ties_half"] = (c["win"] + c["tie"] / 2) / c["n"]
    return out


def mean_or_none(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _hist(scores) -> dict[str, int]:
    h: dict[str, int] = {}
    for s in scores:
        if s is not None:
            h[str(s)] = h.get(str(s), 0) + 1
    return dict(sorted(h.items(), key=lambda kv: int(kv[0])))
