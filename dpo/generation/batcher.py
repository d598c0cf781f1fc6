"""One thread owns the model: requests are queued as jobs and sampled together.

Jobs that arrive within ``window_s`` of each other (or while the previous batch is running) share
one ``fastdpo.generation.sampler.sample`` call per sampling-filter setting (top-k, top-p), each row
with its own temperature, token budget and seed, so an answer does not depend on what it was
batched with. The window is cut short once every request that has arrived is in the batch, unless
the previous batch held several requests: a client sending bursts (a mining client's requests, one
per temperature) is then given the whole window for the rest of its burst, which would otherwise
straggle into a second batch that costs as many decode steps as the first.

Per-token work happens in the sampler's ``on_token`` hook, only for rows that need it: a row with
stop strings is decoded each step and ended on the token that completes one (its text is cut
before the stop string, its token ids keep every generated token); a row with ``stop_ids`` ends on
such a token; a row asking for log-probs gets the log-softmax of the raw logits at the chosen token
and its top alternatives; a streaming row sends its new text as it grows, holding back what could
still turn into a stop string or an unfinished character. A cancelled job (its client went away)
has its rows ended at the next step.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from fastdpo.generation.openai_api import RequestError

# Streaming events, sent from the batcher thread to ``Job.on_event``:
#   ("delta", row_index, text, entries, None)      new text (and its log-prob entries) of a row
#   ("delta", row_index, text, entries, reason)    the row's last piece, with its finish reason
#   ("end", None, "", [], None)                    every row finished (the job's future is set)
#   ("error", exception, "", [], None)             the batch failed
Event = tuple


@dataclass(eq=False)
class Row:
    """One answer to produce, and (once sampled) the answer."""
    prompt: list[int]
    temperature: float
    budget: int
    seed: int
    stops: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None         # None: none; k: the chosen token and k alternatives
    stream: bool = False
    # -- filled by the batcher ------------------------------------------------------------------
    tokens: list[int] = field(default_factory=list)   # every generated token (eos excluded)
    entries: list = field(default_factory=list)       # log-prob entries, one per token
    text: str = ""                      # the answer (cut before a stop string / stop token)
    finish: str | None = None           # "stop" or "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    _cut: int | None = None             # text index where a stop string begins
    _drop_last: bool = False            # ended on a stop token id: not part of the text
    _sent: int = 0                      # characters streamed so far
    _sent_entries: int = 0

    @property
    def watched(self) -> bool:
        return bool(self.stops or self.stop_ids or self.logprobs is not None or self.stream)


class Job:
    """A request's rows, sampled with one (top_k, top_p); ``future`` resolves to the rows."""

    def __init__(self, rows: list[Row], top_k: int | None, top_p: float = 1.0,
                 on_event: Callable[[Event], None] | None = None):
        self.rows, self.top_k, self.top_p, self.on_event = rows, top_k, top_p, on_event
        self.future: Future = Future()
        self.cancelled = False          # set by the request's side: end its rows, drop it if queued
        self.counted = False            # its arrival is counted until the batcher collects it

    def emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)


def _settle(future: Future, result=None, error: BaseException | None = None) -> bool:
    """Resolve ``future`` unless it already is (its request may have timed out and cancelled it
    from the event loop's thread meanwhile); returns whether this call resolved it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
        return True
    except InvalidStateError:
        return False


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters a stream must hold: an unfinished character (shown as U+FFFD
    until its last byte arrives) or the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k], 0, end):
                hold = max(hold, k)
                break
    return len(text) - end + hold


class Batcher:
    """Collects jobs from request handlers and samples them together on one worker thread."""

    def __init__(self, model, tokenizer, *, max_batch_rows: int = 64, window_s: float = 0.01,
                 dtype: torch.dtype | None = None, max_queued_rows: int = 1024):
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.eos_id = tokenizer.eos_id
        self.max_batch_rows, self.window_s, self.max_queued_rows = max_batch_rows, window_s, max_queued_rows
        self.batches = self.rows = 0          # counters, for /health and tests
        self.queued_rows = 0
        self._pending = 0                     # requests arrived whose job is not yet in a batch
        self._q: queue.Queue = queue.Queue()
        # submit's check-and-put and close's flag-and-sentinel are one step each under this lock,
        # so no job can land behind the sentinel and wait out its request timeout
        self._lock = threading.Lock()
        self._closed = False
        self._bursts = False                  # the last batch held several jobs
        self._thread = threading.Thread(target=self._run, name="fastdpo-batcher", daemon=True)
        self._thread.start()

    # -- the request side -------------------------------------------------------------------------
    def arrive(self) -> None:
        """A request arrived: a batch being collected may wait (up to the window) for its job."""
        with self._lock:
            self._pending += 1

    def leave(self) -> None:
        """A request that arrived ends without submitting a job (a bad request)."""
        with self._lock:
            self._pending -= 1

    def submit(self, job: Job) -> Future:
        """Queue ``job`` (its request's arrival is handed over to it); 503 when closed or full."""
        with self._lock:
            if self._closed:
                raise RequestError(503, "server is shutting down")
            if self.queued_rows + len(job.rows) > self.max_queued_rows:
                raise RequestError(503, f"server is busy ({self.queued_rows} answers queued); retry later",
                                   code="overloaded")
            self.queued_rows += len(job.rows)
            job.counted = True
            self._q.put(job)
        return job.future

    def close(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued (up to ``timeout``); any still waiting then fail with 503."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._q.put(None)
        self._thread.join(timeout=timeout)
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._fail([job], RequestError(503, "server is shutting down"))
        self._q.put(None)   # a worker still finishing a batch stops after it

    # -- the worker -------------------------------------------------------------------------------
    def _take(self, job: Job) -> bool:
        with self._lock:
            self.queued_rows -= len(job.rows)
            if job.counted:
                self._pending -= 1
        if job.cancelled:   # its client has gone (timed out); nobody reads the answer
            job.future.cancel()
            return False
        return True

    def _collect(self) -> list[Job] | None:
        jobs: list[Job] = []
        while not jobs:
            first = self._q.get()
            if first is None:
                return None
            if self._take(first):
                jobs.append(first)
        rows = len(jobs[0].rows)
        deadline = time.monotonic() + self.window_s
        while rows < self.max_batch_rows and (self._pending > 0 or self._bursts):
            try:
                job = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._q.put(None)  # finish this batch, then stop
                break
            if self._take(job):
                jobs.append(job)
                rows += len(job.rows)
        self._bursts = len(jobs) > 1
        return jobs

    def _run(self) -> None:
        from fastdpo.generation.sampler import sample

        while (jobs := self._collect()) is not None:
            try:
                self._serve(jobs, sample)
            except Exception as e:  # a bug here must fail these requests, not kill the worker
                self._fail(jobs, e)

    @staticmethod
    def _fail(jobs: list[Job], e: BaseException) -> None:
        for j in jobs:
            if _settle(j.future, error=e):
                j.emit(("error", e, "", [], None))

    def _serve(self, jobs: list[Job], sample) -> None:
        """Sample ``jobs`` (one sample() call per sampling-filter setting) and answer them."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.top_k, job.top_p), []).append(job)
        for (top_k, top_p), group in groups.items():
            flat = [(j, i, r) for j in group for i, r in enumerate(j.rows)]
            hook = self._hook(flat) if any(r.watched for _, _, r in flat) else None
            try:
                out, finish = sample(
                    self.model, [r.prompt for _, _, r in flat], [r.temperature for _, _, r in flat],
                    [r.budget for _, _, r in flat], top_k, self.eos_id, [r.seed for _, _, r in flat],
                    top_p=top_p, dtype=self.dtype, on_token=hook, return_finish=True)
            except Exception as e:  # answer every waiting request, keep serving
                self._fail(group, e)
                continue
            self.batches += 1
            self.rows += len(out)
            for (job, i, row), tokens, reason in zip(flat, out, finish):
                row.tokens, row.finish = tokens, reason
                if row._cut is not None:
                    pass                                  # text was cut at the stop string
                elif row._drop_last:
                    row.text = self.tokenizer.decode(tokens[:-1])
                else:
                    row.text = self.tokenizer.decode(tokens)
                if row.stream:
                    self._send(job, i, row, final=True)
            for job in group:
                _settle(job.future, job.rows)   # before "end": the stream reads the result then
                job.emit(("end", None, "", [], None))

    def _hook(self, flat: list[tuple[Job, int, Row]]):
        decode = self.tokenizer.decode

        def on_token(step, rows_t, toks_t, logits):
            idx, toks = rows_t.tolist(), toks_t.tolist()
            lp_at = [j for j, r in enumerate(idx) if flat[r][2].logprobs is not None]
            if lp_at:
                sel = torch.tensor(lp_at, device=logits.device)
                lsm = torch.log_softmax(logits[sel].float(), dim=-1)
                chosen = lsm.gather(1, toks_t[sel, None]).squeeze(1).tolist()
                k = max(flat[idx[j]][2].logprobs for j in lp_at)
                top_v, top_i = lsm.topk(k, dim=-1) if k else (None, None)
                top_v, top_i = (top_v.tolist(), top_i.tolist()) if k else ([], [])
                lp_pos = {j: p for p, j in enumerate(lp_at)}
            halt = [False] * len(idx)
            for j, r in enumerate(idx):
                job, i, row = flat[r]
                if job.cancelled:
                    halt[j] = True
                    continue
                if not row.watched:
                    continue
                t = toks[j]
                row.tokens.append(t)
                if row.logprobs is not None:
                    p = lp_pos[j]
                    alts = list(zip(top_i[p][:row.logprobs], top_v[p][:row.logprobs])) if k else []
                    row.entries.append((t, chosen[p], alts))
                if t in row.stop_ids:
                    row.stop_reason, row._drop_last, halt[j] = t, True, True
                    row.text = decode(row.tokens[:-1])
                elif row.stops or row.stream:
                    row.text = decode(row.tokens)
                    hits = [(pos, s) for s in row.stops if (pos := row.text.find(s)) >= 0]
                    if hits:
                        pos, s = min(hits)
                        row.text, row._cut, row.stop_reason, halt[j] = row.text[:pos], pos, s, True
                if row.stream and not halt[j]:
                    self._send(job, i, row, final=False)
            return torch.tensor(halt) if any(halt) else None

        return on_token

    @staticmethod
    def _send(job: Job, i: int, row: Row, final: bool) -> None:
        """Stream the part of ``row.text`` that can no longer change (all of it when final)."""
        end = len(row.text) if final else len(row.text) - _held_back(row.text, row.stops)
        piece = row.text[row._sent:end] if end > row._sent else ""
        entries = row.entries[row._sent_entries:] if (piece or final) else []
        if piece or entries or final:
            job.emit(("delta", i, piece, entries, row.finish if final else None))
            row._sent = max(row._sent, end)
            row._sent_entries += len(entries)
