"""Head-to-head evaluation of two checkpoints with a judge.

Both models answer the same held-out prompts (same temperature, same per-prompt seeds). In
``compare`` mode each pair is judged twice, once with A shown first and once with B first; a side
wins only when both orders agree, everything else is a tie. A judge that always prefers the first
(or always the second) answer therefore produces 100% ties instead of a fake winner. In ``score``
mode each answer is scored 1-10 on its own and the mean score per side is reported (the demo task
turns this into "judged accuracy"). Each side's average answer length and repetition (repeated
4-grams, distinct-2) are always reported, and beside the win rate AlpacaEval's length-controlled
win rate (``fastdpo.generation.win_rates``): a preference-tuned model that wins by rambling or
looping shows up there. MT-Bench and AlpacaEval files go through ``generation.benchmarks``.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastdpo.files import write_json
from fastdpo.generation.backends import SamplerBackend, block_size_of
from fastdpo.generation.eval_progress import EvalProgress, progress_path
from fastdpo.generation.judge import Judge, JudgeError, format_judge_stats
from fastdpo.generation.mining import batch_seed, load_prompts, model_fingerprint
from fastdpo.generation.multi_objective import RubricJudge, dimension_win_rates
from fastdpo.generation.win_rates import (
    answer_summary,
    compare_summary,
    length_controlled_win_rate,
    score_summary,
)

MODES = ("compare", "score", "both")


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, temperature: float = 0.7,
             max_new_tokens: int = 128, top_k: int | None = 50, seed: int = 0, batch_size: int = 32,
             dtype: torch.dtype | None = None, progress: bool = False,
             desc: str = "generate", sampler=None) -> list[list[int]]:
    """New token ids for every rendered prompt. Row i's seed depends only on (seed, i), so two
    models answering the same prompt list use the same random numbers. ``sampler`` defaults to
    the KV-cached ``fastdpo.generation.sampler.sample``; the bench passes the re-forward oracle.
    ``model`` may be a generation backend (``generation.backends``: a server, in-process vLLM);
    an answer whose token ids it could not verify is empty (``unverified`` in its stats)."""
    from tqdm import tqdm

    from fastdpo.generation.sampler import sample
    out: list[list[int]] = []
    seeds = [batch_seed(seed, i) for i in range(len(prompts))]
    if isinstance(model, SamplerBackend):
        for lo in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
            hi = lo + batch_size
            new, _ = model.sample(prompts[lo:hi], temperature, max_new_tokens, top_k, tokenizer.eos_id,
                                  seeds[lo:hi])
            out += [x if x is not None else [] for x in new]
        model.release()   # the other side's engine may need the memory
        return out
    sampler = sampler or sample
    with torch.inference_mode():
        for lo in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
            hi = lo + batch_size
            out += sampler(model, prompts[lo:hi], temperature, max_new_tokens, top_k, tokenizer.eos_id,
                          seeds[lo:hi], dtype=dtype)
    return out


def position_swapped_outcome(first: str, second: str) -> str:
    """``first`` = verdict with A shown first, ``second`` = verdict with B shown first (so "A"
    there means B). Returns "win" (A won both orders), "loss" (B won both) or "tie"."""
    if first == "A" and second == "B":
        return "win"
    if first == "B" and second == "A":
        return "loss"
    return "tie"


def evaluate(model_a, model_b, tokenizer, prompts: str | Path | Sequence[str], judge: Judge, *,
             mode: str = "compare", temperature: float = 0.7, max_new_tokens: int = 128,
             top_k: int | None = 50, seed: int = 0, batch_size: int = 32, n_prompts: int | None = None,
             max_prompt_tokens: int | None = None, dtype: torch.dtype | None = None,
             report_path: str | Path | None = None, progress: bool = True, sampler=None,
             names: tuple[str, str] = ("A", "B"), resume: bool = False) -> dict:
    """Generate with both models, judge, and return (and optionally write) the report dict.
    A path to an MT-Bench or AlpacaEval file is evaluated by
    ``fastdpo.generation.benchmarks.evaluate_benchmark`` (turn by turn, per category).

    Report keys: ``names`` (what A and B are, e.g. their paths), ``n_prompts``, ``n_dropped``
    (prompts too long for either model), ``settings``,
    ``judge``, ``judge_stats``, ``length`` (average chars and tokens per side), ``compare``
    (win/tie/loss counts and rates, ``win_rate_decided``, ``order_agreement``,
    ``first_position_rate``), ``dimensions`` (with a ``RubricJudge``: the same per rubric),
    ``score`` (``mean_a``, ``mean_b``, histograms, invalid counts) and
    ``items`` (per prompt: answers, verdicts, outcome, scores).

    With a ``report_path``, answers and verdicts are kept as they come in
    ``<report>.progress.jsonl`` (``fastdpo.generation.eval_progress``): when the judge fails for
    good (``JudgeError``) the run stops saying how far it got, and ``resume=True`` continues it,
    ending with the report an uninterrupted run writes (``resumed`` counts the verdicts read back).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(prompts, (str, Path)) and Path(prompts).is_file():
        from fastdpo.generation.benchmarks import benchmark_format, evaluate_benchmark
        if benchmark_format(prompts) != "prompt":   # MT-Bench or AlpacaEval: turn by turn, by category
            report = evaluate_benchmark(model_a, model_b, tokenizer, prompts, judge, mode=mode,
                                        temperature=temperature, max_new_tokens=max_new_tokens, top_k=top_k,
                                        seed=seed, batch_size=batch_size, n_prompts=n_prompts,
                                        max_prompt_tokens=max_prompt_tokens, dtype=dtype,
                                        report_path=report_path, progress=progress, sampler=sampler,
                                        resume=resume)
            report = {"names": {"a": names[0], "b": names[1]}, **report}
            if report_path is not None:
                write_json(report_path, report)
            return report
    instructions = load_prompts(prompts, n_prompts) if isinstance(prompts, (str, Path)) \
        else list(prompts)[:n_prompts]
    block = min(block_size_of(model_a), block_size_of(model_b))
    if max_new_tokens >= block:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the models' block_size ({block})")
    limit = block - max_new_tokens
    if max_prompt_tokens is not None:
        limit = min(limit, max_prompt_tokens)
    total = len(instructions)
    rendered = [tokenizer.render_prompt(p) for p in instructions]
    keep = [i for i, ids in enumerate(rendered) if len(ids) <= limit]
    instructions = [instructions[i] for i in keep]
    rendered = [rendered[i] for i in keep]
    if not instructions:
        raise ValueError("no prompt fits the models' context; lower max_new_tokens or use shorter prompts")

    settings = dict(mode=mode, temperature=temperature, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed)
    log = open_progress(report_path, resume, model_a, model_b, tokenizer, judge,
                        {**settings, "batch_size": batch_size, "dtype": str(dtype),
                         "max_prompt_tokens": max_prompt_tokens, "prompts": instructions})
    return run_logged(lambda: _evaluate_prompts(
        model_a, model_b, tokenizer, judge, instructions, rendered, total, log, settings,
        batch_size=batch_size, dtype=dtype, progress=progress, sampler=sampler, names=names),
        log, judge, report_path)


def run_logged(run: Callable[[], dict], log: EvalProgress | None, judge: Judge,
               report_path: str | Path | None) -> dict:
    """``run()``'s report, written to ``report_path``; a judge that stops it is noted in ``log``
    (``stop_on_judge_error``), and ``log`` is closed either way."""
    try:
        report = run()
    except JudgeError as e:
        raise stop_on_judge_error(e, log, judge) from None
    finally:
        if log is not None:
            log.close()
    if report_path is not None:
        write_json(report_path, report)
    return report


def _evaluate_prompts(model_a, model_b, tokenizer, judge: Judge, instructions: list[str], rendered: list,
                      total: int, log: EvalProgress | None, settings: dict, *, batch_size: int, dtype,
                      progress: bool, sampler, names: tuple[str, str]) -> dict:
    mode = settings["mode"]
    kw = dict(temperature=settings["temperature"], max_new_tokens=settings["max_new_tokens"],
              top_k=settings["top_k"], seed=settings["seed"], batch_size=batch_size, dtype=dtype,
              progress=progress, sampler=sampler)
    if log is not None and log.answers is not None:
        ids_a, ids_b = log.answers["a"], log.answers["b"]
    else:
        ids_a = generate(model_a, tokenizer, rendered, desc="generate A", **kw)
        ids_b = generate(model_b, tokenizer, rendered, desc="generate B", **kw)
        if log is not None:
            log.save_answers({"a": ids_a, "b": ids_b})
    ans_a = [tokenizer.decode(x) for x in ids_a]
    ans_b = [tokenizer.decode(x) for x in ids_b]
    n = len(instructions)
    items = [{"prompt": p, "a": a, "b": b} for p, a, b in zip(instructions, ans_a, ans_b)]
    report: dict = {
        "names": {"a": names[0], "b": names[1]}, "n_prompts": n, "n_dropped": total - n,
        "settings": settings, "judge": judge.name,
        **answer_summary(ans_a, ans_b, ids_a, ids_b),
    }

    if mode in ("compare", "both"):
        first = _judged(judge.compare_many, [(p, a, b) for p, a, b in zip(instructions, ans_a, ans_b)],
                        batch_size, progress, "judge A|B", log)
        second = _judged(judge.compare_many, [(p, b, a) for p, a, b in zip(instructions, ans_a, ans_b)],
                         batch_size, progress, "judge B|A", log)
        outcomes = [position_swapped_outcome(v1, v2) for v1, v2 in zip(first, second)]
        report["compare"] = compare_summary(first, second, outcomes)
        report["compare"]["length_controlled_win_rate"] = length_controlled_win_rate(
            outcomes, [len(a) for a in ans_a], [len(b) for b in ans_b])
        for it, v1, v2, o in zip(items, first, second, outcomes):
            it.update(verdicts=[v1, v2], outcome=o)
        if isinstance(judge, RubricJudge):   # each rubric's own position-swapped verdicts
            report["dimensions"] = dimension_win_rates(judge, instructions, ans_a, ans_b)

    if mode in ("score", "both"):
        work = [(p, a) for p, a in zip(instructions, ans_a)] + [(p, b) for p, b in zip(instructions, ans_b)]
        scores = _judged(judge.score_many, work, batch_size, progress, "judge scores", log)
        sa, sb = scores[:n], scores[n:]
        report["score"] = score_summary(sa, sb)
        for it, x, y in zip(items, sa, sb):
            it.update(score_a=x, score_b=y)

    report["judge_stats"] = judge.stats.as_dict()
    if log is not None and log.resumed:
        report["resumed"] = {"verdicts": log.resumed}
    report["items"] = items
    return report


def _judged(fn, work: list, chunk: int, progress: bool, desc: str, log: EvalProgress | None = None) -> list:
    """``fn`` over ``work`` in chunks, each chunk's results kept in ``log`` (under ``desc``) as it
    comes back; results ``log`` already holds are not asked for again."""
    from tqdm import tqdm
    out: list = log.judged(desc) if log is not None else []
    judge = getattr(fn, "__self__", None)   # fn: a judge's bound method
    refused = judge.refused if isinstance(judge, Judge) else (lambda: 0)
    step = max(chunk, 1) * 2
    for lo in tqdm(range(len(out), len(work), step), desc=desc, unit="batch", disable=not progress):
        before = refused()
        results = fn(work[lo: lo + step])
        if log is not None:
            log.add(desc, lo, results, refused() - before)
        out += results
    return out


def _identity(model) -> str:
    """What a resumed evaluation must sample from: the weights, or a backend's policy."""
    return model.identity() if isinstance(model, SamplerBackend) else model_fingerprint(model)


def open_progress(report_path: str | Path | None, resume: bool, model_a, model_b, tokenizer, judge: Judge,
                  settings: dict) -> EvalProgress | None:
    """The progress log next to ``report_path`` (``None`` without one), fresh or resumed."""
    if report_path is None:
        if resume:
            raise ValueError("--resume needs --report: an evaluation keeps its answers and verdicts next to "
                             "its report")
        return None
    fingerprint = hashlib.sha256(json.dumps({
        "settings": settings, "judge": judge.name, "tokenizer": tokenizer.hash,
        "a": _identity(model_a), "b": _identity(model_b)}, sort_keys=True, default=str
    ).encode()).hexdigest()[:16]
    shown = {k: v for k, v in settings.items() if k != "prompts"} | {"judge": judge.name}
    return EvalProgress(progress_path(report_path), fingerprint, shown, resume)


def judge_stopped(e: JudgeError, log: EvalProgress | None) -> str:
    """The one line an evaluation stopped by its judge ends with: why, and what was kept."""
    if log is None:
        return f"{e}; no verdicts kept (pass --report to keep them as they come, and --resume to continue)"
    n = sum(len(log.judged(p)) for p in log.phases)
    return f"{e}; {n} verdicts kept in {log.path}: run the same command with --resume to continue"


def stop_on_judge_error(e: JudgeError, log: EvalProgress | None, judge: Judge) -> JudgeError:
    """The error to raise when the judge stops an evaluation, noted in its progress log."""
    if log is not None and e.refusals:
        log.void_refused_tail()
    message = judge_stopped(e, log)
    if log is not None:
        log.stopped(message, judge.stats.as_dict())
    return JudgeError(message, refusals=e.refusals)


def format_report(r: dict, name_a: str | None = None, name_b: str | None = None) -> str:
    """The report as text; A and B are called by the report's ``names`` unless given."""
    names = r.get("names", {})
    name_a, name_b = name_a or names.get("a", "A"), name_b or names.get("b", "B")
    what = (f"{r['n_questions']} {r['format']} questions ({r['n_prompts']} judged turns)" if "format" in r
            else f"{r['n_prompts']} prompts")
    lines = [f"{name_a} vs {name_b} on {what}"
             + (f" ({r['n_dropped']} too long, dropped)" if r["n_dropped"] else "") + f", judge {r['judge']}"]
    c = r.get("compare")
    if c:
        lines.append(f"  position-swapped: win {c['win']} ({c['win_rate']:.1%}) | tie {c['tie']} "
                     f"({c['tie_rate']:.1%}) | loss {c['loss']} ({c['loss_rate']:.1%})")
        lines.append(f"  win rate among decided: {_pct(c['win_rate_decided'])}; both orders agree on "
                     f"{c['order_agreement']:.1%}; first-shown answer picked in "
                     f"{_pct(c['first_position_rate'])} of decisive verdicts")
    dims = r.get("dimensions")
    if dims:
        lines.append("  per dimension (win/tie/loss, win rate among decided): " + "; ".join(
            f"{d} {v['win']}/{v['tie']}/{v['loss']} {_pct(v['win_rate_decided'])}" for d, v in dims.items()))
    s = r.get("score")
    if s:
        lines.append(f"  mean score: {name_a} {_num(s['mean_a'])} | {name_b} {_num(s['mean_b'])} "
                     f"(invalid {s['invalid_a']} / {s['invalid_b']})")
    ln = r["length"]
    lines.append(f"  avg answer length: {name_a} {ln['avg_chars_a']:.0f} chars ({ln['avg_tokens_a']:.1f} tok)"
                 f" | {name_b} {ln['avg_chars_b']:.0f} chars ({ln['avg_tokens_b']:.1f} tok)"
                 "  <- watch for length gaming")
    if c and c.get("length_controlled_win_rate") is not None:
        lines.append(f"  win rate (ties count half) {_pct(c['win_rate_ties_half'])}, length-controlled "
                     f"{_pct(c['length_controlled_win_rate'])} (AlpacaEval's: as if both answers were "
                     f"equally long)")
    rep = r.get("repetition")
    if rep:
        lines.append(f"  repetition: repeated 4-grams {name_a} {rep['a']['repeat_4']:.1%} | {name_b} "
                     f"{rep['b']['repeat_4']:.1%}; distinct-2 {name_a} {_num(rep['a']['distinct_2'], 3)} | "
                     f"{name_b} {_num(rep['b']['distinct_2'], 3)}")
    for key, label in (("categories", "category"), ("turns", "turn")):
        if len(r.get(key) or {}) > 1:
            lines.append(f"  by {label} (win/tie/loss, win rate with ties as half): " + "; ".join(
                f"{k} {v['win']}/{v['tie']}/{v['loss']} {v['win_rate_ties_half']:.1%}"
                for k, v in r[key].items()))
    lines += format_judge_stats(r.get("judge_stats", {}), indent="  ")
    if r.get("resumed"):
        lines.append(f"  resumed: {r['resumed']['verdicts']} verdicts read back from the progress file")
    return "\n".join(lines)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
