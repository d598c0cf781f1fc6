"""Retrying calls to a remote HTTP service (a judge, a sampling server) for runs that last all night.

The policy, in one paragraph: a failed call is classified (``Failure``). Failures that waiting can
fix -- timeouts, refused or dropped connections, HTTP 429 and 5xx -- are retried with exponential
backoff and jitter, and a ``Retry-After`` header (seconds or an HTTP date) is honoured: the next
try comes no earlier than the server asked. Retrying is bounded by *time*, not by a count: the
budget is how long the service may keep failing without one success in between (an outage clock
shared by every thread using the service, reset by any success), so a five-second 429 window costs
five seconds, and a judge that is down for good stops the run once ``budget_s`` has passed.
Failures that retries cannot fix (401, 403, 404, a reply that is not the protocol at all) open the
circuit at once, and once the circuit is open every call -- in flight in other threads or later --
fails immediately with the failure that opened it, so a run stops in one place with the server's own
words.

Usage (the judge client and the HTTP sampler both work this way)::

    retrier = Retrier(RetryPolicy(budget_s=600), classify=failure_from_openai,
                      on_failure=lambda f, retrying: count(f.kind))
    try:
        reply = retrier.call(lambda: client.chat.completions.create(...))
    except GiveUp as e:                 # e.failure: the last Failure; str(e): one line
        raise MyServiceError(f"{url}: {e}") from None

``classify`` maps an exception to a ``Failure`` (``failure_from_openai`` knows the ``openai`` and
``httpx`` exceptions); a caller that finds a reply unusable raises ``BadReply`` from inside the
call, which is classified as ``unparseable`` (not retried). ``Retrier.trip(failure)`` opens the
circuit from outside (e.g. after many refused requests in a row).
"""
from __future__ import annotations

import email.utils
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# what a failure was; the first four are worth waiting for
RETRYABLE = ("timeout", "connection", "rate_limited", "http_5xx")
KINDS = (*RETRYABLE, "unparseable", "refused", "fatal")


@dataclass(frozen=True)
class Failure:
    """One failed call: its ``kind`` (``KINDS``), the server's own message (first line, clipped),
    the HTTP status when there was one and the seconds its ``Retry-After`` asked for."""
    kind: str
    message: str
    status: int | None = None
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    def __str__(self) -> str:
        what = f"HTTP {self.status}" if self.status is not None else self.kind
        if self.kind == "unparseable":
            what = f"{what}, unparseable reply" if self.status is not None else "unparseable reply"
        return f"{what}: {self.message}" if self.message else what


class GiveUp(Exception):
    """Retrying stopped: ``failure`` is the last one; ``why`` is ``"fatal"`` (retries cannot fix
    it), ``"budget"`` (the service kept failing for the whole budget), ``"tripped"`` (the circuit
    was opened by ``Retrier.trip``) or ``"refused"`` (HTTP 400/413/422: this one request was
    refused; the circuit stays closed, the caller decides). The message is one line."""

    def __init__(self, failure: Failure, why: str, detail: str):
        super().__init__(detail)
        self.failure, self.why = failure, why


class BadReply(Exception):
    """Raised inside a call whose reply is not the protocol (not JSON, no choices): ``unparseable``.
    ``raw`` is the start of the reply, kept for the report."""

    def __init__(self, message: str, raw: str = "", status: int | None = None):
        super().__init__(message)
        self.raw, self.status = raw, status


@dataclass
class RetryPolicy:
    """``budget_s``: how long a service may fail without a success before giving up (0: never
    retry; the last retry comes when the budget ends, unless a ``Retry-After`` asks for later).
    Backoff before retry n (0-based) is ``min(max_delay_s, base_s * 2**n)`` scaled by a random
    factor in [0.5, 1) (jitter keeps many threads from retrying in lockstep); a ``Retry-After``
    replaces it (plus up to 10% jitter, at most one second). ``max_attempts`` optionally caps the
    tries per call as well (None: the budget alone decides)."""
    budget_s: float = 600.0
    base_s: float = 0.5
    max_delay_s: float = 30.0
    max_attempts: int | None = None

    def __post_init__(self):
        for name in ("budget_s", "base_s", "max_delay_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
                raise ValueError(f"retry policy: {name} must be a finite number >= 0, got {v!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"retry policy: max_attempts must be >= 1, got {self.max_attempts!r}")

    def delay(self, attempt: int, retry_after: float | None = None,
              rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0 = the first retry)."""
        r = (rng or random).random()
        if retry_after is not None:
            return retry_after + min(1.0, 0.1 * retry_after) * r
        return min(self.max_delay_s, self.base_s * 2 ** min(attempt, 60)) * (0.5 + r / 2)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for: a number of seconds or an HTTP date; ``None``
    when absent or unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    if secs != secs or secs == float("inf"):
        return None
    return max(0.0, secs)


class Retrier:
    """Calls a service under a ``RetryPolicy`` with a circuit breaker; one per service, shared by
    all threads calling it. ``on_failure(failure, retrying)`` is called for every failure (to
    count them), ``retrying`` False for the one that ends the call."""

    def __init__(self, policy: RetryPolicy, classify: Callable[[BaseException], Failure | None], *,
                 on_failure: Callable[[Failure, bool], None] | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self.policy, self.classify, self.on_failure = policy, classify, on_failure
        self._rng, self._clock = rng or random.Random(), clock
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self._opened = threading.Event()      # set with _open: wakes every thread that waits
        self._open: GiveUp | None = None

    @property
    def open(self) -> GiveUp | None:
        """The ``GiveUp`` that opened the circuit, or ``None`` while it is closed."""
        return self._open

    def trip(self, failure: Failure, detail: str | None = None, why: str = "tripped") -> GiveUp:
        """Open the circuit (the first trip wins); returns the ``GiveUp`` every call now raises."""
        with self._lock:
            if self._open is None:
                self._open = GiveUp(failure, why, detail or str(failure))
                self._opened.set()
            return self._open

    def reset(self) -> None:
        """Close the circuit and restart the outage clock (a new run against the same service)."""
        with self._lock:
            self._open, self._failing_since = None, None
            self._opened.clear()

    def call(self, fn: Callable[[], object]):
        """``fn()``, retried per the policy; raises ``GiveUp`` when retrying stops, and lets
        exceptions ``classify`` does not know (returns ``None`` for) through untouched."""
        attempt = 0
        while True:
            if self._open is not None:
                raise self._copy_open()
            try:
                out = fn()
            except Exception as e:
                failure = _bad_reply_failure(e) or self.classify(e)
                if failure is None:
                    raise
            else:
                with self._lock:
                    self._failing_since = None
                return out
            wait = self._next_wait(failure, attempt)
            if self.on_failure is not None:
                self.on_failure(failure, wait is not None)
            if wait is None:
                if failure.kind == "refused":
                    raise GiveUp(failure, "refused", str(failure))
                raise self._copy_open()
            if self._opened.wait(wait):   # another thread opened the circuit meanwhile
                raise self._copy_open()
            attempt += 1

    def _copy_open(self) -> GiveUp:
        # one exception object per raising thread: tracebacks attach to the object
        o = self._open
        return GiveUp(o.failure, o.why, str(o))

    def _next_wait(self, failure: Failure, attempt: int) -> float | None:
        """Seconds to wait before retrying, or ``None`` after opening the circuit."""
        p = self.policy
        now = self._clock()
        with self._lock:
            if self._open is not None:
                return None
            if self._failing_since is None:
                self._failing_since = now
            failing = now - self._failing_since
        if failure.kind == "refused":   # the server answered: this request alone is at fault
            with self._lock:
                self._failing_since = None
            return None
        if not failure.retryable:
            self.trip(failure, f"{failure} (retrying cannot fix this)", why="fatal")
            return None
        wait = p.delay(attempt, failure.retry_after, self._rng)
        if p.max_attempts is not None and attempt + 1 >= p.max_attempts:
            self.trip(failure, f"{failure} (gave up after {attempt + 1} attempts)", why="budget")
            return None
        remaining = p.budget_s - failing
        if wait > remaining and (remaining <= 0 or failure.retry_after is not None):
            late = failure.retry_after is not None and failure.retry_after > remaining
            asked = f"; it asked to retry after {failure.retry_after:.0f}s" if late else ""
            self.trip(failure, f"{failure} (still failing after {failing:.1f}s of retries, retry budget "
                               f"{p.budget_s:g}s{asked})", why="budget")
            return None
        return min(wait, remaining)   # the last try comes when the budget ends


def _bad_reply_failure(e: BaseException) -> Failure | None:
    if isinstance(e, BadReply):
        return Failure("unparseable", str(e), e.status)
    return None


def clip(text: str | None, n: int = 300) -> str:
    """The first line of ``text``, at most ``n`` characters (what a one-line error can show)."""
    text = (text or "").strip()
    first = text.splitlines()[0] if text else ""
    return first[:n] + ("..." if len(first) > n else "")


def failure_from_openai(e: BaseException) -> Failure | None:
    """A ``Failure`` for the exceptions of the ``openai`` client and of ``httpx`` (or a fork with
    the same exception names); ``None`` for anything else. 401/403/404 and other 4xx are ``fatal``;
    400/413/422 are ``refused`` (this one request was malformed or too long: callers usually count
    it and go on); 408 and 409 are retried like 5xx, as the servers that send them mean."""
    # Neither package is imported here: an exception of theirs means they are loaded already, and
    # importing inside many failing threads at once is what this must never do.
    openai = sys.modules.get("openai")
    if openai is not None:
        if isinstance(e, openai.APITimeoutError):
            return Failure("timeout", clip(str(e)))
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            return Failure("connection", clip(f"{e} ({type(cause).__name__}: {cause})" if cause else str(e)))
        if isinstance(e, openai.APIStatusError):
            return _status_failure(e.status_code, _server_message(e), e.response.headers.get("retry-after"))
    names = {c.__name__ for c in type(e).__mro__}
    if "TimeoutException" in names or isinstance(e, TimeoutError):
        return Failure("timeout", clip(str(e)) or type(e).__name__)
    if "TransportError" in names or isinstance(e, ConnectionError):
        return Failure("connection", clip(str(e)) or type(e).__name__)
    if "HTTPStatusError" in names and getattr(e, "response", None) is not None:
        return _status_failure(e.response.status_code, clip(e.response.text),
                               e.response.headers.get("retry-after"))
    return None


def _status_failure(status: int, message: str, retry_after: str | None) -> Failure:
    after = parse_retry_after(retry_after)
    if status == 429:
        kind = "rate_limited"
    elif status >= 500 or status in (408, 409):
        kind = "http_5xx"
    elif status in (400, 413, 422):
        kind = "refused"
    else:
        kind = "fatal"
    return Failure(kind, message, status, after)


def _server_message(e) -> str:
    """The server's own words: the OpenAI error shape's ``message``, else the body's first line."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return clip(str(msg))
    try:
        text = e.response.text
    except Exception:   # a streamed or closed response
        text = ""
    return clip(text) or clip(getattr(e, "message", "") or str(e))
