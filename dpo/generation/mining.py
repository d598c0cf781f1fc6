"""Preference mining: prompts -> K samples each -> judge -> (chosen, rejected) pairs JSONL.

Per prompt, K answers are sampled at a spread of temperatures (a careful one and a reckless
one make a useful contrast), every answer is scored 1-10 by the judge, and the best and worst
become a pair when ``best - worst >= min_gap`` (smaller gaps are judge noise) and
``best >= min_best`` (a pair of two bad answers teaches one flavour of garbage over another).

What a pair holds. Each answer is kept as the token ids the model sampled (``chosen_ids``,
``rejected_ids``, ending with the end-of-turn token when the model emitted it), with the rendered
prompt's ids (``prompt_ids``) and the ``tokenizer_hash`` they belong to, so training scores exactly
the sampled tokens; the text (decoded with special tokens skipped) is for people and the judge.
Two kinds of sample are never a chosen answer, and are counted:
- *truncated* ones, which ran out of ``max_new_tokens`` before ending their turn (finish
  ``length``): an answer cut mid-sentence is not a good answer, and closing it with an end-of-turn
  would teach the model to stop mid-answer. By default they are not judged or used at all;
  ``truncated_as_rejected`` lets them be judged and picked as the rejected answer (trained open,
  without an end-of-turn token);
- *malformed* ones, holding a special token other than the end of turn (say ``<|user|>``: the
  model starting the next turn itself). They are never judged or paired: their text with the special
  token skipped would hide the flaw from the judge, and cutting the answer there would train
  tokens the model never sampled.

Sampling of batch i+1 runs in a background thread while batch i is judged.

Resuming. Output is byte-identical whether or not a run was killed and restarted:
- batch b is sampled with a seed derived from ``(seed, b)``, so a redone batch samples exactly
  what it would have;
- after each batch the pairs are appended and fsynced, then one record is appended (and fsynced)
  to ``<out>.progress.jsonl`` holding the prompts done, the pairs file's length and the running
  statistics. Prompts that gave no pair are recorded there too, so they are never judged again;
- on restart the pairs file is cut back to the length in the last complete record (dropping a
  partial line or a batch whose record never made it) and mining continues with the next batch.
  The record's first line fingerprints the run (prompts, model, tokenizer, judge and every
  setting); a different configuration refuses to resume instead of mixing two runs in one file.

The module is long because the mining loop keeps sampling, judging, pair selection, their counters
and the stop-on-judge-failure path in one place that reads top to bottom; the on-disk state lives in
``mining_progress`` and multi-rubric scoring in ``multi_objective``.
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastdpo.files import append_durable
from fastdpo.generation.backends import UNVERIFIED, as_backend, model_fingerprint  # noqa: F401 (re-export)
from fastdpo.generation.judge import Judge, JudgeError
from fastdpo.generation.mining_progress import COUNTS, ProgressLog, write_report
from fastdpo.generation.multi_objective import RubricJudge, dimension_record, select_pair_dimensions

DEFAULT_TEMPS = (0.7, 0.9, 1.1, 1.3)


@dataclass
class MiningStats:
    prompts_total: int = 0          # prompts read
    prompts_dropped: int = 0        # dropped: rendered prompt longer than max_prompt_tokens
    prompts_done: int = 0           # prompts sampled and judged (cumulative over resumes)
    samples_judged: int = 0
    invalid_scores: int = 0         # judge replies without a usable score
    samples_truncated: int = 0      # ran out of max_new_tokens (finish "length"): never chosen
    samples_malformed: int = 0      # held a special token other than end-of-turn: never used
    samples_unverified: int = 0     # a server's text that did not re-encode to itself: never used
    pairs_kept: int = 0
    rejected_truncated: int = 0     # kept pairs whose rejected answer is a truncated sample
    score_hist: dict[str, int] = field(default_factory=dict)   # "1".."10" -> count
    resumed_at: int = 0             # prompts already done when this process started
    resumed_pairs: int = 0          # pairs already kept when this process started
    elapsed_s: float = 0.0          # this process only
    sample_s: float = 0.0
    judge_s: float = 0.0

    @property
    def kept_pct(self) -> float:
        return 100.0 * self.pairs_kept / self.prompts_done if self.prompts_done else 0.0

    @property
    def prompts_per_s(self) -> float:
        return (self.prompts_done - self.resumed_at) / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def pairs_per_min(self) -> float:
        return 60 * (self.pairs_kept - self.resumed_pairs) / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "kept_pct": self.kept_pct, "prompts_per_s": self.prompts_per_s,
                "pairs_per_min": self.pairs_per_min}


def select_pair(scores: Sequence[int | None], min_gap: int = 2, min_best: int = 6,
                can_choose: Sequence[bool] | None = None) -> tuple[int, int] | None:
    """Indices ``(best, worst)`` among the valid scores, or ``None`` when the prompt gives no pair.

    ``can_choose[i]`` False: sample i may be the worst but never the best (a truncated answer).
    Ties for best go to the earliest sample (the coolest temperature), ties for worst to the
    latest, so the choice is deterministic. Fewer than two valid scores give no pair.
    """
    valid = [(s, i) for i, s in enumerate(scores) if s is not None]
    choosable = [(s, i) for s, i in valid if can_choose is None or can_choose[i]]
    if len(valid) < 2 or not choosable:
        return None
    best = min(choosable, key=lambda si: (-si[0], si[1]))
    worst = min(valid, key=lambda si: (si[0], -si[1]))
    if best[1] == worst[1] or best[0] - worst[0] < min_gap or best[0] < min_best:
        return None
    return best[1], worst[1]


def sample_kind(tokenizer, ids: Sequence[int], finish: str) -> str:
    """``"ok"`` (ended its turn), ``"truncated"`` (ran out of tokens) or ``"malformed"`` (holds a
    special token besides the end of turn, which the sampler stops at and leaves out)."""
    if tokenizer.decode(ids) != tokenizer.decode(ids, skip_special=True):
        return "malformed"
    return "ok" if finish == "stop" else "truncated"


def load_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Instructions from a JSONL file: one object per line with a ``"prompt"`` (or
    ``"instruction"``) string. Blank lines are skipped; anything else is an error naming the line.
    A ``fastdpo serve --log-interactions`` file gives its distinct single-question chat prompts,
    ``limit`` of them sampled (see ``generation.interactions``)."""
    from fastdpo.generation.interactions import interaction_prompts, is_interaction_log
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    if is_interaction_log(path):
        return interaction_prompts(path, n=limit)
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            text = rec.get("prompt", rec.get("instruction")) if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{lineno}: field 'prompt' missing, empty or not a string")
            out.append(text)
            if limit is not None and len(out) >= limit:
                break
    return out


def batch_seed(seed: int, batch_index: int) -> int:
    """Sampling seed of one batch: a function of (seed, batch) only, so a resumed run redoes a
    batch exactly as an uninterrupted one would."""
    h = hashlib.sha256(f"fastdpo-pairs:{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def mine_pairs(model, tokenizer, prompts: str | Path | Sequence[str], judge: Judge, out_path: str | Path, *,
               temps: Sequence[float] = DEFAULT_TEMPS, max_new_tokens: int = 128, top_k: int = 50,
               min_gap: int = 2, min_best: int = 6, batch_size: int = 16, seed: int = 0,
               max_prompt_tokens: int | None = None, n_prompts: int | None = None,
               dtype: torch.dtype | None = None, progress: bool = True,
               shard: tuple[int, int] | None = None, truncated_as_rejected: bool = False,
               must_resume: bool = False) -> MiningStats:
    """Mine preference pairs into ``out_path`` (JSONL, appended as it goes; resumable).

    ``model`` is the policy (sampled with the built-in sampler) or a generation backend
    (``generation.backends``: an OpenAI-compatible server, in-process vLLM); either way the
    prompts are rendered here with ``tokenizer``'s chat template and the answers come back as
    token ids with their finish reasons, so the pairs are the same kind of record.
    ``prompts`` is a JSONL path (see ``load_prompts``) or a list of instructions. Prompts whose
    rendered chat prompt is longer than ``max_prompt_tokens`` (default: block_size minus
    ``max_new_tokens``) are dropped and counted. Each output line holds ``prompt``, ``chosen``,
    ``rejected``, ``score_chosen``, ``score_rejected``, ``scores`` (one per temperature, ``None``
    for a sample not judged: truncated, malformed, or without a usable reply), and the sampled
    tokens: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``tokenizer_hash``,
    ``chosen_finish`` / ``rejected_finish`` (``stop``, or ``length`` for a truncated rejected
    answer under ``truncated_as_rejected``); see the module docstring.
    ``dtype`` is the sampler's autocast dtype (``torch.bfloat16`` is ~2x faster on recent CPUs).
    ``shard=(rank, world)`` mines only batches ``rank, rank + world, ...`` into ``out_path`` (see
    ``mining_progress.shard_path``, ``merge_shards``): each batch keeps its seed, so the shards hold
    exactly the pairs of the unsharded run, and each shard resumes on its own.

    A judge that fails for good (``JudgeError``: its retry budget spent, a bad key...) stops the
    run with every finished batch kept (but the last ones whose refused requests led to the stop,
    when the judge stopped for refusing request after request); the error says how far it got, and
    running again (the CLI's
    ``--resume``; ``must_resume=True`` insists there is a run to continue) carries on from there.
    ``<out>.report.json`` holds the statistics and the judge's (its failures by kind, the servers'
    reasons, a few unusable replies), written at the end and when the judge stops the run.
    """
    temps = [float(t) for t in temps]
    if len(temps) < 2:
        raise ValueError("mining needs at least two temperatures (K >= 2 samples per prompt)")
    if batch_size < 1 or max_new_tokens < 1 or min_gap < 0:
        raise ValueError("batch_size and max_new_tokens must be >= 1, min_gap >= 0")
    backend = as_backend(model, dtype)
    block = backend.block_size
    if max_new_tokens >= block:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the model's block_size ({block})")
    limit = block - max_new_tokens
    max_prompt_tokens = limit if max_prompt_tokens is None else min(max_prompt_tokens, limit)

    instructions = load_prompts(prompts, n_prompts) if isinstance(prompts, (str, Path)) \
        else list(prompts)[:n_prompts]
    stats = MiningStats(prompts_total=len(instructions))
    rendered = [tokenizer.render_prompt(p) for p in instructions]
    keep = [i for i, ids in enumerate(rendered) if len(ids) <= max_prompt_tokens]
    stats.prompts_dropped = len(instructions) - len(keep)
    n_batches = (len(keep) + batch_size - 1) // batch_size

    settings = dict(temps=temps, max_new_tokens=max_new_tokens, top_k=top_k, min_gap=min_gap,
                    min_best=min_best, batch_size=batch_size, seed=seed, max_prompt_tokens=max_prompt_tokens,
                    dtype=str(dtype), truncated_as_rejected=truncated_as_rejected)
    fingerprint = hashlib.sha256(json.dumps({
        "settings": settings, "judge": judge.name, "tokenizer": tokenizer.hash,
        "model": backend.identity(),
        "prompts": hashlib.sha256(json.dumps(instructions).encode()).hexdigest()}, sort_keys=True).encode()
    ).hexdigest()[:16]

    my_batches = range(n_batches) if shard is None else range(shard[0], n_batches, shard[1])
    if shard is not None:   # the shard's own identity; merge_shards recovers the run's from it
        fingerprint = f"{fingerprint}:shard{shard[0]}of{shard[1]}"
        settings = {**settings, "shard": list(shard)}
    out_path = Path(out_path)
    log = ProgressLog(out_path, fingerprint, settings)
    if must_resume and not log.path.is_file():
        raise ValueError(f"--resume: {out_path} has no mining run to continue (no {log.path.name}); "
                         "leave out --resume to start one")
    start_batch, saved = log.resume()
    if saved:
        for k in (*COUNTS, "score_hist"):
            setattr(stats, k, saved.get(k, 0))   # counts added later start at 0
    stats.resumed_at, stats.resumed_pairs = stats.prompts_done, stats.pairs_kept
    k = len(temps)
    eos = tokenizer.eos_id
    rubrics = isinstance(judge, RubricJudge)

    def batch_prompts(b: int) -> list[int]:
        return keep[b * batch_size:(b + 1) * batch_size]

    # -- producer: sampling runs one batch ahead of judging ---------------------------------
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce():
        try:
            for b in my_batches:
                if b < start_batch:
                    continue
                if stop.is_set():
                    return
                idx = batch_prompts(b)
                t0 = time.perf_counter()
                rows = [rendered[i] for i in idx for _ in range(k)]
                new, finish = backend.sample(rows, temps * len(idx), max_new_tokens, top_k, eos,
                                             batch_seed(seed, b))
                samples = [Sample(tokenizer, ids, f, eos) for ids, f in zip(new, finish)]
                _put(ready, (b, samples, time.perf_counter() - t0), stop)
            _put(ready, None, stop)
        except BaseException as e:  # handed to the consumer, which re-raises it
            _put(ready, e, stop)

    from tqdm import tqdm
    bar = tqdm(total=sum(len(batch_prompts(b)) for b in my_batches), initial=stats.prompts_done,
               unit="prompt", desc="pairs", disable=not progress, dynamic_ncols=True)
    bar.set_postfix(kept=stats.pairs_kept)
    t_start = time.perf_counter()
    refusals: list[int] = []   # requests refused in each batch this process committed
    worker = threading.Thread(target=produce, name="fastdpo-sampler", daemon=True)
    worker.start()
    try:
        with open(out_path, "ab") as out:
            while True:
                item = ready.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                b, samples, dt = item
                stats.sample_s += dt
                idx = batch_prompts(b)
                usable = [x.kind == "ok" or (x.kind == "truncated" and truncated_as_rejected)
                          for x in samples]
                work = [(instructions[i], samples[j * k + r].text)
                        for j, i in enumerate(idx) for r in range(k) if usable[j * k + r]]
                t0 = time.perf_counter()
                refused = judge.refused()
                dims = None
                if rubrics:   # several rubrics: a weighted score, per-dimension gap rules
                    details = iter(judge.score_dimensions_many(work))
                    dims = [next(details) if ok else None for ok in usable]
                    scores = [judge.weighted(d) if d is not None else None for d in dims]
                else:
                    replies = iter(judge.score_many(work))
                    scores = [next(replies) if ok else None for ok in usable]
                refused = judge.refused() - refused
                stats.judge_s += time.perf_counter() - t0
                _count(stats, samples, usable, scores)
                lines = []
                for j, i in enumerate(idx):
                    group, s = samples[j * k:(j + 1) * k], scores[j * k:(j + 1) * k]
                    choosable = [x.kind == "ok" for x in group]
                    if rubrics:
                        g = dims[j * k:(j + 1) * k]
                        pick = select_pair_dimensions(s, g, judge, min_gap, min_best, choosable)
                        extra = None if pick is None else dimension_record(judge, g[pick[0]], g[pick[1]])
                    else:
                        pick, extra = select_pair(s, min_gap, min_best, choosable), None
                    if pick is not None:
                        lines.append(pair_line(instructions[i], rendered[i], group, s, *pick, tokenizer.hash,
                                               extra))
                        stats.rejected_truncated += group[pick[1]].kind == "truncated"
                stats.prompts_done += len(idx)
                stats.pairs_kept += len(lines)
                append_durable(out, "".join(lines).encode())
                log.commit(b, out.tell(), stats)
                refusals.append(refused)
                bar.update(len(idx))
                bar.set_postfix(kept=stats.pairs_kept)
    except JudgeError as e:
        stats.elapsed_s = time.perf_counter() - t_start
        if e.refusals:   # the batches whose refusals led to the stop: judged again on --resume
            k = next((n for n in range(len(refusals)) if refusals[-1 - n] == 0), len(refusals))
            if k:
                log.take_back(k, stats)
        stopped = (f"{e}; stopped with {stats.prompts_done} prompts done and {stats.pairs_kept} pairs kept "
                   f"in {out_path}: run the same command with --resume to continue")
        write_report(out_path, stats.as_dict(), judge, stopped)
        raise JudgeError(stopped, refusals=e.refusals) from None
    finally:
        stop.set()
        _drain(ready)
        worker.join(timeout=60)
        bar.close()
        log.close()
        stats.elapsed_s = time.perf_counter() - t_start
    write_report(out_path, stats.as_dict(), judge)
    return stats



class Sample:
    """One sampled answer: its ids (with the end-of-turn token when the model emitted it), text
    (special tokens skipped) and kind (``sample_kind``, or ``"unverified"``: a backend could not
    say which tokens it sampled)."""
    __slots__ = ("ids", "text", "kind", "finish")

    def __init__(self, tokenizer, ids: list[int] | None, finish: str, eos_id: int):
        if ids is None:
            self.kind, self.finish, self.text, self.ids = UNVERIFIED, finish, "", []
            return
        self.kind, self.finish = sample_kind(tokenizer, ids, finish), finish
        self.text = tokenizer.decode(ids, skip_special=True)
        self.ids = ids + [eos_id] if finish == "stop" else ids


def pair_line(instruction: str, prompt_ids: list[int], group: Sequence[Sample], scores: list,
              hi: int, lo: int, tokenizer_hash: str, extra: dict | None = None) -> str:
    """One pairs-file line (see ``mine_pairs``); ``extra``: a multi-rubric pair's ``dimensions`` and
    ``weighted_margin``."""
    return json.dumps({**(extra or {}),
        "prompt": instruction, "chosen": group[hi].text, "rejected": group[lo].text,
        "score_chosen": scores[hi], "score_rejected": scores[lo], "scores": scores,
        "chosen_finish": group[hi].finish, "rejected_finish": group[lo].finish,
        "tokenizer_hash": tokenizer_hash, "prompt_ids": prompt_ids,
        "chosen_ids": group[hi].ids, "rejected_ids": group[lo].ids}, ensure_ascii=False) + "\n"


def _count(stats: MiningStats, samples: Sequence[Sample], judged: Sequence[bool], scores: Sequence) -> None:
    for x, ok, v in zip(samples, judged, scores):
        stats.samples_truncated += x.kind == "truncated"
        stats.samples_malformed += x.kind == "malformed"
        stats.samples_unverified += x.kind == UNVERIFIED
        if ok:
            stats.samples_judged += 1
            if v is None:
                stats.invalid_scores += 1
            else:
                key = str(round(v))   # a weighted score (several rubrics) goes to its nearest bin
                stats.score_hist[key] = stats.score_hist.get(key, 0) + 1


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def combine_stats(parts: Sequence[MiningStats]) -> MiningStats:
    """The statistics of a sharded run from its ranks' own."""
    out = MiningStats(prompts_total=parts[0].prompts_total, prompts_dropped=parts[0].prompts_dropped)
    for p in parts:
        for k in (*COUNTS, "resumed_at", "resumed_pairs", "sample_s", "judge_s"):
            setattr(out, k, getattr(out, k) + getattr(p, k))
        for sc, n in p.score_hist.items():
            out.score_hist[sc] = out.score_hist.get(sc, 0) + n
        out.elapsed_s = max(out.elapsed_s, p.elapsed_s)
    return out


def format_stats(stats: MiningStats, out_path: str | Path | None = None) -> str:
    """The end-of-run summary: kept %, score histogram, throughput."""
    hist = stats.score_hist
    total = sum(hist.values()) or 1
    peak = max(hist.values(), default=0) or 1
    lines = [f"prompts: {stats.prompts_total} read, {stats.prompts_dropped} dropped as too long, "
             f"{stats.prompts_done} judged ({stats.resumed_at} before this run)",
             f"pairs kept: {stats.pairs_kept} ({stats.kept_pct:.1f}% of judged prompts)"
             + (f" -> {out_path}" if out_path else "")
             + (f"; {stats.rejected_truncated} with a truncated rejected answer"
                if stats.rejected_truncated else ""),
             f"samples judged: {stats.samples_judged}, invalid judge replies: {stats.invalid_scores}",
             f"samples never chosen: {stats.samples_truncated} truncated (ran out of max_new_tokens"
             + ("; judged, may be rejected" if stats.rejected_truncated else "") + f"), "
             f"{stats.samples_malformed} malformed (a special token inside the answer)"
             + (f", {stats.samples_unverified} unverified (the server's text did not re-encode to "
                f"itself)" if stats.samples_unverified else ""),
             "score histogram:"]
    for s in range(1, 11):
        n = hist.get(str(s), 0)
        lines.append(f"  {s:>2} {n:>7} {100 * n / total:5.1f}% {'#' * round(30 * n / peak)}")
    if stats.elapsed_s > 0 and stats.prompts_done > stats.resumed_at:
        lines.append(f"throughput (this run): {stats.prompts_per_s:.2f} prompts/s, "
                     f"{stats.pairs_per_min:.1f} pairs/min (sampling {stats.sample_s:.1f}s, "
                     f"judging {stats.judge_s:.1f}s, wall {stats.elapsed_s:.1f}s; they overlap)")
    return "\n".join(lines)
