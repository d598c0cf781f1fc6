"""``--rubric NAME=SPEC`` (repeated), ``--rubric-weight NAME=W``, ``--rubric-min-gap NAME=G``: score
every answer on several rubrics (``fastdpo.generation.multi_objective.RubricJudge``)."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path


def add_rubric_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-objective judging")
    g.add_argument("--rubric", action="append", default=[], metavar="NAME=SPEC",
                   help="score each answer on this dimension too (repeat per dimension): SPEC is a rubric "
                        "prompt file (.txt with {instruction} and {response}, asked through --judge-url / "
                        "--judge-model, one request per rubric) or a judge name or module:fn")
    g.add_argument("--rubric-weight", action="append", default=[], metavar="NAME=W",
                   help="the dimension's weight in the weighted score (default 1)")
    g.add_argument("--rubric-min-gap", action="append", default=[], metavar="NAME=G",
                   help="mining keeps a pair only if chosen - rejected >= G on this dimension "
                        "(0: never worse)")


def _pairs(flag: str, items: list[str], number: bool) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{flag}: expected NAME=VALUE, got {item!r}")
        if number:
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{flag} {name}: expected a number, got {value!r}") from None
        out[name.strip()] = value
    return out


def rubric_judge_from_args(args, make_one):
    """The ``RubricJudge`` the flags ask for, or None without ``--rubric``; ``make_one(spec)``
    builds the judge of a non-file spec (the command's own judge selection)."""
    from fastdpo.generation.judge import OpenAIJudge
    from fastdpo.generation.multi_objective import RubricJudge, ScoreOnly
    specs = _pairs("--rubric", getattr(args, "rubric", None) or [], number=False)
    if not specs:
        return None
    rubrics = {}
    for name, spec in specs.items():
        if spec.endswith(".txt") or Path(spec).is_file():
            if not args.judge_url or not args.judge_model:
                raise ValueError(f"--rubric {name}={spec}: a rubric prompt file needs --judge-url and "
                                 f"--judge-model")
            judge = OpenAIJudge(args.judge_url, args.judge_model, score_prompt=spec,
                                concurrency=args.judge_concurrency, timeout=args.judge_timeout,
                                retry_budget=args.judge_retry_budget)
            # the prompt's text in the name: mining's resume fingerprint must see an edited rubric
            digest = hashlib.sha256(Path(spec).read_bytes()).hexdigest()[:12]
            rubrics[name] = ScoreOnly(judge, name=f"{name}:{Path(spec).name}:{digest}")
        else:
            rubrics[name] = make_one(spec)
    return RubricJudge(rubrics, weights=_pairs("--rubric-weight", args.rubric_weight, number=True),
                       min_gaps=_pairs("--rubric-min-gap", args.rubric_min_gap, number=True))
