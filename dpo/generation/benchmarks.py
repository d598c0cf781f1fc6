"""Benchmark-format evaluation: MT-Bench question files and AlpacaEval instruction files, judged
head to head with per-category win rates and AlpacaEval's length-controlled win rate.

No benchmark data ships with fastdpo and nothing is downloaded: bring the files (MT-Bench's
``question.jsonl`` from FastChat's ``llm_judge`` data, AlpacaEval's ``alpaca_eval.json`` from the
AlpacaEval data set) and pass them to ``fastdpo eval --prompts``. Formats, detected from the first
record (read by ``fastdpo.training.data.read_records``: JSONL or a JSON array):

- ``mtbench``:    ``{"question_id", "category", "turns": [str, ...]}``. Both models answer turn by
  turn, each continuing its own conversation; every turn is judged (position-swapped), with the
  earlier questions shown to the judge as context;
- ``alpacaeval``: ``{"instruction", "input"?, "dataset"?}``: one turn, the input appended to the
  instruction; the category is ``category``, else ``dataset``;
- ``prompt``:     ``{"prompt"}``, fastdpo's plain held-out prompts (``evaluate`` handles these).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdpo.generation.backends import block_size_of
from fastdpo.generation.evaluate import (
    MODES,
    _judged,
    generate,
    open_progress,
    position_swapped_outcome,
    run_logged,
)
from fastdpo.generation.judge import Judge
from fastdpo.generation.win_rates import (
    answer_summary,
    category_win_rates,
    compare_summary,
    length_controlled_win_rate,
    score_summary,
)
from fastdpo.training.data import read_records

FORMATS = ("mtbench", "alpacaeval", "prompt")


@dataclass
class BenchmarkItem:
    id: str
    category: str
    turns: list[str]


def detect_format(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = (("mtbench", "turns"), ("alpacaeval", "instruction"), ("prompt", "prompt"))
    return next((fmt for fmt, key in keys if key in record), None)


def benchmark_format(path: str | Path) -> str:
    """The format of a prompts file, from its first record."""
    for line, record, err in read_records(Path(path)):
        fmt = None if err else detect_format(record)
        if fmt is None:
            why = err or "expected a 'prompt', 'instruction' or 'turns' field"
            raise ValueError(f"{path}:{line}: not a prompts record ({why}); formats: MT-Bench, AlpacaEval "
                             f"or fastdpo's {{\"prompt\": ...}}")
        return fmt
    raise ValueError(f"{path}: no prompts in the file")


def _item(record: object, fmt: str, line: int) -> BenchmarkItem:
    if not isinstance(record, dict) or detect_format(record) != fmt:
        raise ValueError(f"expected a {fmt} record")
    if fmt == "mtbench":
        turns = record["turns"]
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
            raise ValueError("field 'turns' must be a non-empty list of questions")
        return BenchmarkItem(str(record.get("question_id", line)), str(record.get("category") or "all"),
                             turns)
    field = "instruction" if fmt == "alpacaeval" else "prompt"
    text = record[field]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"field '{field}' is empty or not a string")
    if fmt == "alpacaeval" and isinstance(record.get("input"), str) and record["input"].strip():
        text = f"{text}\n\n{record['input']}"
    category = record.get("category") or record.get("dataset") or "all"
    return BenchmarkItem(str(record.get("id", line)), str(category), [text])


def load_benchmark(path: str | Path, limit: int | None = None) -> tuple[str, list[BenchmarkItem]]:
    """``(format, items)`` of a prompts file; a bad record is an error naming the file and line."""
    fmt = benchmark_format(path)
    items: list[BenchmarkItem] = []
    for line, record, err in read_records(Path(path)):
        if limit is not None and len(items) >= limit:
            break
        try:
            if err:
                raise ValueError(err)
            items.append(_item(record, fmt, line))
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
    return fmt, items


def turn_instruction(turns: Sequence[str], k: int) -> str:
    """What the judge reads for turn ``k``: the question, after the earlier ones as context."""
    if k == 0:
        return turns[0]
    earlier = "\n".join(f"({j + 1}) {q}" for j, q in enumerate(turns[:k]))
    return f"Earlier in this conversation the user asked:\n{earlier}\n\nNow the user asks:\n{turns[k]}"


def evaluate_benchmark(model_a, model_b, tokenizer, path: str | Path, judge: Judge, *,
                       mode: str = "compare", temperature: float = 0.7, max_new_tokens: int = 128,
                       top_k: int | None = 50, seed: int = 0, batch_size: int = 32,
                       n_prompts: int | None = None, max_prompt_tokens: int | None = None,
                       dtype: torch.dtype | None = None, report_path: str | Path | None = None,
                       progress: bool = True, sampler=None, resume: bool = False) -> dict:
    """``fastdpo.generation.evaluate.evaluate`` for MT-Bench and AlpacaEval files (same parameters;
    ``n_prompts`` counts questions). Adds ``format``, ``n_questions``, ``categories`` and ``turns``
    (win/tie/loss and the win rate with ties as half, per category and per turn) and
    ``compare.length_controlled_win_rate``; ``items`` has one entry per judged turn. Answers and
    verdicts are kept next to ``report_path`` and ``resume`` continues, as ``evaluate`` does."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fmt, questions = load_benchmark(path, n_prompts)
    block = min(block_size_of(model_a), block_size_of(model_b))
    if max_new_tokens >= block:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the models' block_size ({block})")
    limit = min(block - max_new_tokens, max_prompt_tokens or block)
    settings = dict(mode=mode, temperature=temperature, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed)
    log = open_progress(report_path, resume, model_a, model_b, tokenizer, judge,
                        {**settings, "batch_size": batch_size, "dtype": str(dtype), "limit": limit,
                         "questions": [(q.id, q.category, q.turns) for q in questions]})

    def run() -> dict:
        if log is not None and log.answers is not None:
            items, ids, cut = log.answers["items"], log.answers["ids"], log.answers["n_dropped"]
        else:
            items, ids, cut = _answer_turns(model_a, model_b, tokenizer, questions, limit, seed, dict(
                temperature=temperature, max_new_tokens=max_new_tokens, top_k=top_k, batch_size=batch_size,
                dtype=dtype, progress=progress, sampler=sampler))
            if log is not None:
                log.save_answers({"items": items, "ids": ids, "n_dropped": cut})
        return _report(fmt, questions, items, ids, cut, settings, judge, log, batch_size, progress)

    return run_logged(run, log, judge, report_path)


def _answer_turns(model_a, model_b, tokenizer, questions: list[BenchmarkItem], limit: int, seed: int,
                  kw: dict) -> tuple[list[dict], dict, int]:
    """Both models answer every question turn by turn: (items, token ids per side, turns cut)."""
    convs = {"a": [[] for _ in questions], "b": [[] for _ in questions]}
    active, cut, items, ids = list(range(len(questions))), 0, [], {"a": [], "b": []}
    for k in range(max(len(q.turns) for q in questions)):
        todo = [i for i in active if k < len(questions[i].turns)]
        rendered = {s: [tokenizer.render_conversation([*convs[s][i], ("user", questions[i].turns[k])])
                        for i in todo] for s in "ab"}
        fits = [j for j in range(len(todo)) if max(len(rendered["a"][j]), len(rendered["b"][j])) <= limit]
        cut += len(todo) - len(fits)   # a question whose turn no longer fits ends there, on both sides
        active = [i for i in active if i not in {todo[j] for j in range(len(todo)) if j not in set(fits)}]
        todo = [todo[j] for j in fits]
        if not todo:
            continue
        answers = {}
        for side, model in (("a", model_a), ("b", model_b)):
            new = generate(model, tokenizer, [rendered[side][j] for j in fits], seed=seed + k,
                           desc=f"turn {k + 1} {side.upper()}", **kw)
            ids[side] += new
            answers[side] = [tokenizer.decode(x) for x in new]
        for j, i in enumerate(todo):
            q = questions[i]
            for side in "ab":
                convs[side][i] += [("user", q.turns[k]), ("assistant", answers[side][j])]
            items.append({"question_id": q.id, "category": q.category, "turn": k + 1, "prompt": q.turns[k],
                          "instruction": turn_instruction(q.turns, k), "a": answers["a"][j],
                          "b": answers["b"][j]})
    if not items:
        raise ValueError("no question fits the models' context; lower max_new_tokens or use shorter prompts")
    return items, ids, cut


def _report(fmt: str, questions: list, items: list[dict], ids: dict, cut: int, settings: dict, judge: Judge,
            log, batch_size: int, progress: bool) -> dict:
    report: dict = {
        "format": fmt, "n_questions": len(questions), "n_prompts": len(items), "n_dropped": cut,
        "settings": settings, "judge": judge.name,
        **answer_summary([it["a"] for it in items], [it["b"] for it in items], ids["a"], ids["b"])}
    _judge_items(report, items, judge, settings["mode"], batch_size, progress, log)
    report["judge_stats"] = judge.stats.as_dict()
    if log is not None and log.resumed:
        report["resumed"] = {"verdicts": log.resumed}
    report["items"] = items
    return report


def _judge_items(report: dict, items: list[dict], judge: Judge, mode: str, batch_size: int, progress: bool,
                 log=None):
    if mode in ("compare", "both"):
        first = _judged(judge.compare_many, [(it["instruction"], it["a"], it["b"]) for it in items],
                        batch_size, progress, "judge A|B", log)
        second = _judged(judge.compare_many, [(it["instruction"], it["b"], it["a"]) for it in items],
                         batch_size, progress, "judge B|A", log)
        outcomes = [position_swapped_outcome(v1, v2) for v1, v2 in zip(first, second)]
        for it, v1, v2, o in zip(items, first, second, outcomes):
            it.update(verdicts=[v1, v2], outcome=o)
        report["compare"] = compare_summary(first, second, outcomes)
        report["compare"]["length_controlled_win_rate"] = length_controlled_win_rate(
            outcomes, [len(it["a"]) for it in items], [len(it["b"]) for it in items])
        report["categories"] = category_win_rates([it["category"] for it in items], outcomes)
        report["turns"] = category_win_rates([str(it["turn"]) for it in items], outcomes)
    if mode in ("score", "both"):
        n = len(items)
        work = [(it["instruction"], it[side]) for side in "ab" for it in items]
        scores = _judged(judge.score_many, work, batch_size, progress, "judge scores", log)
        for it, x, y in zip(items, scores[:n], scores[n:]):
            it.update(score_a=x, score_b=y)
        report["score"] = score_summary(scores[:n], scores[n:])
        report["score"]["by_category"] = {
            cat: score_summary([it["score_a"] for it in items if it["category"] == cat],
                               [it["score_b"] for it in items if it["category"] == cat])
            for cat in dict.fromkeys(it["category"] for it in items)}
