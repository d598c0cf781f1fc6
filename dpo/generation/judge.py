"""Judges: who decides which answer is better.

One interface, two kinds of judge:

- ``OpenAIJudge`` asks any OpenAI-compatible chat server (vLLM serving Qwen2.5-7B-Instruct is the
  reference; ``fastdpo serve`` is the one CI talks to) with the rubric prompts in ``configs/``.
- ``ProgrammaticJudge`` wraps a checking function for tasks whose answers can be verified (the
  embedded demo task); its pairwise verdict is derived from the two scores.

``score`` returns an int 1-10 or ``None`` when the judge gave no usable score; ``compare`` returns
``"A"``, ``"B"`` or ``"TIE"`` (an unusable reply is a ``"TIE"``). Unusable replies are counted in
``judge.stats``, never raised: one odd reply must not end a multi-hour mining run. Transport
failures that survive retrying (``fastdpo.generation.retry``: a time budget, the circuit opening on
failures retries cannot fix) *are* raised, as ``JudgeError``.

Judges are selectable by name (``make_judge("task")``, ``make_judge("openai", url=..., model=...)``
or ``make_judge("package.module:factory")``); other modules add names with ``register_judge``.

The module is long because the judge interface, its failure counters and the OpenAI client (with
its refusal rules) read best together; reply parsing lives in ``judge_replies`` and retrying in
``retry``.
"""
from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastdpo.configs import config_path
from fastdpo.errors import ConfigError, ServiceError
from fastdpo.generation.judge_replies import (  # noqa: F401  (parse_*, load_prompt: public here too)
    completion_text,
    fill_prompt,
    load_prompt,
    parse_score,
    parse_verdict,
)
from fastdpo.generation.retry import BadReply, Failure, GiveUp, Retrier, RetryPolicy, failure_from_openai

VERDICTS = ("A", "B", "TIE")
SCORE_PROMPT = config_path("judge_score.txt")
COMPARE_PROMPT = config_path("judge_compare.txt")
API_KEY_ENV = ("FASTDPO_JUDGE_API_KEY", "OPENAI_API_KEY")
# seconds a judge may keep failing (timeouts, 429, 5xx) without one success before the run stops
DEFAULT_RETRY_BUDGET = 600.0


class JudgeError(ServiceError):
    """The judge failed in a way retrying did not fix: unreachable or failing for the whole retry
    budget, a bad key, an unknown model, replies that are not the protocol. One line, naming the
    judge's URL and its last status in the server's own words.

    ``refusals`` is True when the judge stopped because it refused request after request: the
    refusals just before the stop were not isolated, so callers that kept them as "no score"
    drop them again (``mine_pairs``, ``evaluate``) and a resumed run asks for them anew."""

    def __init__(self, message: str, refusals: bool = False):
        super().__init__(message)
        self.refusals = refusals


@dataclass
class JudgeStats:
    """Counters over a judge's lifetime; ``invalid`` replies carried no verdict/score.

    The failure counters count failed HTTP attempts (each retry is another attempt); ``errors``
    holds the first few distinct error reasons in the server's own words with how often each came,
    ``samples`` the first few raw replies that could not be used, so a report shows *why*."""
    requests: int = 0      # calls answered by the judge (valid or not)
    invalid: int = 0       # replies without a parsable score / verdict -> None / "TIE"
    rejected: int = 0      # requests the server refused as malformed (HTTP 400/413/422) -> None / "TIE"
    retries: int = 0       # attempts retried (after a timeout, a connection error, 429 or 5xx)
    timeouts: int = 0
    connection_errors: int = 0
    http_5xx: int = 0
    rate_limited: int = 0  # HTTP 429
    unparseable: int = 0   # replies that were not an OpenAI chat completion (not JSON, no choices)
    errors: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def since(self, before: dict) -> dict:
        """What happened after ``before`` (an earlier ``as_dict()``): counters as differences,
        the reasons counted since, the raw replies kept since."""
        out = {}
        for key, now in self.as_dict().items():
            then = before.get(key)
            if isinstance(now, dict):
                diff = {k: n - (then or {}).get(k, 0) for k, n in now.items()}
                out[key] = {k: n for k, n in diff.items() if n}
            elif isinstance(now, list):
                out[key] = now[len(then or []):]
            else:
                out[key] = now - (then or 0)
        return out

    @property
    def failures(self) -> int:
        return self.timeouts + self.connection_errors + self.http_5xx + self.rate_limited + self.unparseable

    def note_error(self, reason: str) -> None:
        if reason in self.errors or len(self.errors) < MAX_REASONS:
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def note_sample(self, kind: str, raw: str | None) -> None:
        if len(self.samples) < MAX_SAMPLES:
            shown = repr(raw[:SAMPLE_CHARS]) if raw is not None else "(no text)"
            self.samples.append(f"{kind}: {shown}")

MAX_REASONS, MAX_SAMPLES, SAMPLE_CHARS = 5, 5, 300
FAILURE_COUNTERS = ("timeouts", "connection_errors", "http_5xx", "rate_limited", "unparseable")


def format_judge_stats(stats: dict, indent: str = "") -> list[str]:
    """What went wrong with a judge (``JudgeStats.as_dict()``, as saved in reports), as lines:
    unusable and refused replies, failed attempts by kind, the servers' reasons and a few raw
    replies; no lines when nothing did."""
    lines = []
    if stats.get("invalid") or stats.get("rejected"):
        lines.append(f"judge replies without a verdict: {stats.get('invalid', 0)} (counted as ties / no "
                     f"score), of which refused by the server: {stats.get('rejected', 0)}")
    failed = {k: stats.get(k, 0) for k in FAILURE_COUNTERS}
    if any(failed.values()) or stats.get("retries"):
        lines.append("judge failures: " + ", ".join(f"{k} {v}" for k, v in failed.items())
                     + f" (retried {stats.get('retries', 0)})")
    for reason, n in (stats.get("errors") or {}).items():
        lines.append(f"  the judge said ({n}x): {reason}")
    for sample in stats.get("samples") or []:
        lines.append(f"  unusable reply: {sample}")
    return [indent + ln for ln in lines]


class Judge:
    """Base class. Subclasses implement ``_score`` and optionally ``_compare``.

    ``concurrency`` bounds how many requests ``score_many`` / ``compare_many`` keep in flight.
    """
    name = "judge"
    concurrency = 1

    def __init__(self):
        self.stats = JudgeStats()
        self._lock = threading.Lock()

    # -- to implement --------------------------------------------------------------------
    def _score(self, instruction: str, response: str) -> int | None:
        raise TypeError(f"{type(self).__name__} must implement _score")

    def _compare(self, instruction: str, a: str, b: str) -> str | None:
        """Default: the higher score wins; equal or missing scores tie."""
        sa, sb = self._score(instruction, a), self._score(instruction, b)
        if sa is None or sb is None:
            return None
        return "A" if sa > sb else "B" if sb > sa else "TIE"

    # -- public API ----------------------------------------------------------------------
    def refused(self) -> int:
        """Requests the judge's server refused as malformed so far (the counter a stop takes back)."""
        return self.stats.rejected

    def score(self, instruction: str, response: str) -> int | None:
        s = self._score(instruction, response)
        self._count(valid=s is not None)
        return s

    def compare(self, instruction: str, a: str, b: str) -> str:
        v = self._compare(instruction, a, b)
        self._count(valid=v is not None)
        return "TIE" if v is None else v

    def score_many(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        """Scores for ``(instruction, response)`` pairs, in order."""
        return self._map(lambda p: self.score(*p), pairs)

    def compare_many(self, triples: Sequence[tuple[str, str, str]]) -> list[str]:
        """Verdicts for ``(instruction, a, b)`` triples, in order."""
        return self._map(lambda t: self.compare(*t), triples)

    def _map(self, fn, items):
        items = list(items)
        if self.concurrency <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _count(self, valid: bool) -> None:
        with self._lock:
            self.stats.requests += 1
            self.stats.invalid += not valid

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        pass


class ProgrammaticJudge(Judge):
    """A judge backed by a checking function ``score_fn(instruction, response) -> int (1-10)``.

    A score outside 1-10 (or not an int) is a bug in ``score_fn``, so it raises instead of
    being counted as an invalid reply. ``score_fn`` may return ``None`` for "cannot judge".
    """

    def __init__(self, score_fn: Callable[[str, str], int | None], name: str = "programmatic"):
        super().__init__()
        self.score_fn, self.name = score_fn, name

    def _score(self, instruction: str, response: str) -> int | None:
        s = self.score_fn(instruction, response)
        if s is None:
            return None
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 10:
            raise ValueError(f"judge {self.name!r}: score function returned {s!r}; expected an int 1-10")
        return s


# -- the OpenAI-compatible judge -------------------------------------------------------------
class OpenAIJudge(Judge):
    """Judge through an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Temperature 0 and a few ``max_tokens`` (the rubric asks for one number or one letter).
    Failures follow ``fastdpo.generation.retry``: timeouts, connection errors, HTTP 429 and 5xx are
    retried with exponential backoff and jitter (``backoff`` seconds at first), honouring
    ``Retry-After``, for as long as the judge keeps failing within ``retry_budget`` seconds (and at
    most ``max_retries`` retries per request when given); then ``JudgeError``. HTTP 400/413/422
    (e.g. a response too long for the judge's context) make that one judgement ``None``/``"TIE"``
    and are counted in ``stats.rejected`` with the server's reason, unless
    ``max_refusals_in_row`` requests in a row are refused (the judge cannot judge these at all: a
    rubric longer than its context, say), which raises. 401/403/404, other 4xx and a reply that is
    not a chat completion (not JSON) raise at once, since every later request would fail the same
    way. Once raised, every request in flight stops too. The API key comes from
    ``$FASTDPO_JUDGE_API_KEY`` or ``$OPENAI_API_KEY`` (vLLM ignores it) and is never logged or
    shown in ``repr``.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 score_prompt: str | Path = SCORE_PROMPT, compare_prompt: str | Path = COMPARE_PROMPT,
                 max_tokens: int = 8, concurrency: int = 16, timeout: float = 60.0,
                 retry_budget: float = DEFAULT_RETRY_BUDGET, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_retries: int | None = None, max_refusals_in_row: int = 8, max_chars: int = 4000):
        super().__init__()
        import openai  # imported here: programmatic judging must not need it

        if not base_url:
            raise ValueError("OpenAIJudge needs a base URL, e.g. http://localhost:8000/v1")
        if not model:
            raise ValueError("OpenAIJudge needs a model name (the one the server serves)")
        if concurrency < 1 or max_tokens < 1 or max_refusals_in_row < 1 or \
                (max_retries is not None and max_retries < 0):
            raise ValueError("OpenAIJudge: concurrency, max_tokens and max_refusals_in_row must be >= 1, "
                             "max_retries >= 0")
        if not (isinstance(retry_budget, (int, float)) and 0 <= retry_budget < float("inf")):
            raise ConfigError(f"OpenAIJudge: retry_budget (--judge-retry-budget) must be a finite number of "
                              f"seconds >= 0, got {retry_budget!r}")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.name = f"openai:{model}"
        self.max_tokens, self.concurrency, self.timeout = max_tokens, concurrency, timeout
        self.max_chars, self.max_refusals_in_row = max_chars, max_refusals_in_row
        self.policy = RetryPolicy(budget_s=retry_budget, base_s=backoff, max_delay_s=max_backoff,
                                  max_attempts=None if max_retries is None else max_retries + 1)
        self._retrier = Retrier(self.policy, failure_from_openai, on_failure=self._on_failure)
        self._refused_in_row = 0
        self.score_template = load_prompt(score_prompt, ("instruction", "response"))
        self.compare_template = load_prompt(compare_prompt, ("instruction", "a", "b"))
        key = api_key or next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), "EMPTY")
        # Our own retry loop (max_retries=0 here) so the policy and the counts are ours.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout,
                                     max_retries=0)

    def __repr__(self) -> str:
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r})"

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"

    def _score(self, instruction: str, response: str) -> int | None:
        reply = self._ask(fill_prompt(self.score_template, instruction=instruction,
                                      response=response[: self.max_chars]))
        return self._parsed(parse_score, reply)

    def _compare(self, instruction: str, a: str, b: str) -> str | None:
        reply = self._ask(fill_prompt(self.compare_template, instruction=instruction,
                                      a=a[: self.max_chars], b=b[: self.max_chars]))
        return self._parsed(parse_verdict, reply)

    def _parsed(self, parse, reply: str | None | _Refused):
        if isinstance(reply, _Refused):
            return None
        out = parse(reply)
        if out is None:
            with self._lock:
                self.stats.note_sample("no verdict", reply)
        return out

    def _ask(self, content: str) -> str | None | _Refused:
        """The reply's text (``None``: the reply had none), or ``REFUSED`` when the server refused
        this one request."""
        def post():
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, temperature=0.0, max_tokens=self.max_tokens,
                messages=[{"role": "user", "content": content}])
            try:
                return completion_text(raw.text, raw.status_code)
            except BadReply as e:
                with self._lock:
                    self.stats.note_sample("not a chat completion", e.raw)
                raise

        try:
            text = self._retrier.call(post)
        except GiveUp as e:
            if e.why != "refused":
                raise JudgeError(f"judge {self.describe()}: {e}", refusals=e.why == REFUSED_IN_ROW) from None
            with self._lock:
                self.stats.rejected += 1
                self._refused_in_row += 1
                refused_all = self._refused_in_row >= self.max_refusals_in_row
            if refused_all:
                self._retrier.trip(e.failure, f"{e.failure} ({self._refused_in_row} requests in a row "
                                              "refused: the judge cannot judge these)", why=REFUSED_IN_ROW)
                raise JudgeError(f"judge {self.describe()}: {self._retrier.open}", refusals=True) from None
            return REFUSED
        with self._lock:
            self._refused_in_row = 0
        return text

    def _on_failure(self, failure: Failure, retrying: bool) -> None:
        with self._lock:
            st = self.stats
            st.retries += retrying
            counter = {"timeout": "timeouts", "connection": "connection_errors", "http_5xx": "http_5xx",
                       "rate_limited": "rate_limited", "unparseable": "unparseable"}.get(failure.kind)
            if counter:
                setattr(st, counter, getattr(st, counter) + 1)
            if failure.status is not None:
                st.note_error(str(failure))

    def close(self) -> None:
        self._client.close()


class _Refused:
    """The judge refused one request (HTTP 400/413/422): no verdict for it."""


REFUSED = _Refused()
REFUSED_IN_ROW = "refused_in_row"   # the Retrier's ``why`` when refusals opened the circuit


# -- selection by name -----------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Judge]] = {}
# Installed packages add judges through this entry-point group (name = factory), read lazily: the
# embedded task registers its checker as "task" this way, so this module never imports it.
ENTRY_POINT_GROUP = "fastdpo.judges"


def register_judge(name: str, factory: Callable[..., Judge]) -> None:
    """Make ``make_judge(name, **kw)`` call ``factory(**kw)``; kw may be ignored by the factory."""
    _REGISTRY[name] = factory


def _openai_factory(url: str | None = None, model: str | None = None, **kw) -> Judge:
    if not url or not model:
        raise ValueError("the openai judge needs --judge-url and --judge-model")
    return OpenAIJudge(url, model, **kw)


register_judge("openai", _openai_factory)


def available_judges() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def _load_plugins() -> None:
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def make_judge(name: str | None = None, *, url: str | None = None, model: str | None = None,
               **kw) -> Judge:
    """A judge by name: ``"openai"`` (default when ``url`` is given), a registered name such as
    ``"task"``, or ``"module:attr"`` where ``attr`` is a ``Judge``, a factory returning one, or a
    scoring function ``(instruction, response) -> int`` (wrapped in a ``ProgrammaticJudge``)."""
    if name is None:
        if not url:
            raise ValueError("choose a judge: --judge NAME, or --judge-url URL --judge-model MODEL")
        name = "openai"
    if ":" in name and name not in _REGISTRY:
        return _judge_from_path(name)
    _load_plugins()  # plugins may add names or override the built-in ones
    if name not in _REGISTRY:
        raise ValueError(f"unknown judge {name!r}; available: {', '.join(available_judges())} "
                         f"(or module:attr)")
    factory = _REGISTRY[name]
    return factory(url=url, model=model, **kw) if name == "openai" else factory(**kw)


def _judge_from_path(spec: str) -> Judge:
    mod_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge {spec!r}: cannot import ({e})") from e
    if isinstance(obj, Judge):
        return obj
    if isinstance(obj, type) and issubclass(obj, Judge):
        return obj()
    if callable(obj):
        try:
            import inspect
            n_params = len(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            n_params = 2
        out = obj() if n_params == 0 else obj
        return out if isinstance(out, Judge) else ProgrammaticJudge(out, name=spec)
    raise ValueError(f"judge {spec!r} is neither a Judge nor a callable")
