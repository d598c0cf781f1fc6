"""The retry policy shared by the judge client and the HTTP samplers: Retry-After parsing, backoff
bounds, a budget in time shared by all threads, the circuit breaker (fatal failures, trips from
outside waking waiting threads), refusals that leave the circuit closed."""
import email.utils
import random
import threading
import time

import pytest

from fastdpo.generation.retry import (
    BadReply,
    Failure,
    GiveUp,
    Retrier,
    RetryPolicy,
    parse_retry_after,
)


class Boom(Exception):
    def __init__(self, failure):
        super().__init__(str(failure))
        self.failure = failure


def classify(e):
    return e.failure if isinstance(e, Boom) else None


def failing(*failures, then="ok"):
    """A call that raises the given failures in turn, then returns ``then``; counts its calls."""
    todo = list(failures)

    def fn():
        fn.calls += 1
        if todo:
            raise Boom(todo.pop(0))
        return then
    fn.calls = 0
    return fn


FAST = dict(base_s=0.01, max_delay_s=0.05)


def test_parse_retry_after_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert parse_retry_after("5") == 5.0 and parse_retry_after(" 0.25 ") == 0.25
    assert parse_retry_after(email.utils.formatdate(now + 10, usegmt=True), now=now) == pytest.approx(10)
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0
    assert parse_retry_after("-3") == 0.0
    for bad in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(bad) is None


def test_backoff_grows_with_jitter_and_retry_after_is_a_floor():
    p = RetryPolicy(base_s=0.5, max_delay_s=4.0)
    rng = random.Random(0)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        waits = [p.delay(attempt, rng=rng) for _ in range(200)]
        assert all(cap / 2 <= w < cap for w in waits)
        assert max(waits) - min(waits) > cap / 4   # jittered, not lockstep
    waits = [p.delay(0, retry_after=7.0, rng=rng) for _ in range(200)]
    assert all(7.0 <= w <= 7.7 for w in waits)   # never earlier than the server asked


@pytest.mark.parametrize("bad", [dict(budget_s=-1), dict(base_s=float("nan")), dict(max_delay_s=float("inf")),
                                 dict(max_attempts=0)])
def test_policy_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="retry policy"):
        RetryPolicy(**bad)


def test_retry_after_is_honoured_then_success():
    seen = []
    r = Retrier(RetryPolicy(budget_s=5, **FAST), classify,
                on_failure=lambda f, retrying: seen.append(retrying))
    fn = failing(Failure("rate_limited", "slow down", 429, retry_after=0.3))
    t0 = time.monotonic()
    assert r.call(fn) == "ok"
    assert time.monotonic() - t0 >= 0.3 and fn.calls == 2 and seen == [True]


def test_budget_in_time_not_a_count():
    r = Retrier(RetryPolicy(budget_s=0.4, **FAST), classify)
    fn = failing(*[Failure("http_5xx", "busy", 503)] * 10_000)
    t0 = time.monotonic()
    expected = r"HTTP 503: busy \(still failing after 0\.\ds of retries, retry budget 0.4s"
    with pytest.raises(GiveUp, match=expected) as e:
        r.call(fn)
    elapsed = time.monotonic() - t0
    assert e.value.why == "budget" and e.value.failure.status == 503
    assert 0.4 <= elapsed < 3 and fn.calls > 5   # many retries, for the whole budget and no longer
    calls = fn.calls
    with pytest.raises(GiveUp):   # the circuit is open: later calls fail at once, without a request
        r.call(fn)
    assert fn.calls == calls


def test_retry_after_beyond_the_budget_gives_up_at_once():
    r = Retrier(RetryPolicy(budget_s=2, **FAST), classify)
    t0 = time.monotonic()
    with pytest.raises(GiveUp, match="asked to retry after 3600s"):
        r.call(failing(Failure("rate_limited", "quota", 429, retry_after=3600)))
    assert time.monotonic() - t0 < 1


def test_successes_reset_the_outage_clock():
    """A service that fails now and then, over far more than the budget, never gives up."""
    r = Retrier(RetryPolicy(budget_s=0.15, **FAST), classify)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:
        assert r.call(failing(Failure("timeout", "timed out"))) == "ok"


@pytest.mark.parametrize("failure", [Failure("fatal", "Invalid API key", 401),
                                     Failure("fatal", "model 'x' not found", 404)])
def test_fatal_failures_open_the_circuit_at_once(failure):
    counted = []
    r = Retrier(RetryPolicy(budget_s=60, **FAST), classify,
                on_failure=lambda f, retrying: counted.append(retrying))
    fn = failing(failure)
    with pytest.raises(GiveUp, match=f"HTTP {failure.status}: {failure.message} .retrying cannot fix") as e:
        r.call(fn)
    assert e.value.why == "fatal" and fn.calls == 1 and counted == [False]
    assert r.open.failure is e.value.failure and str(r.open) == str(e.value)
    with pytest.raises(GiveUp):
        r.call(fn)
    assert fn.calls == 1
    r.reset()
    assert r.call(fn) == "ok"


def test_a_bad_reply_is_unparseable_and_fatal():
    def fn():
        raise BadReply("not JSON: '<html>'", "<html>", 200)
    r = Retrier(RetryPolicy(budget_s=60, **FAST), classify)
    with pytest.raises(GiveUp, match="HTTP 200, unparseable reply: not JSON: '<html>' .retrying cannot") as e:
        r.call(fn)
    assert e.value.failure.kind == "unparseable"


def test_a_refusal_leaves_the_circuit_closed():
    r = Retrier(RetryPolicy(budget_s=60, **FAST), classify)
    with pytest.raises(GiveUp, match="HTTP 400: too long") as e:
        r.call(failing(Failure("refused", "too long", 400)))
    assert e.value.why == "refused" and r.open is None
    assert r.call(failing()) == "ok"


def test_unknown_exceptions_pass_through():
    r = Retrier(RetryPolicy(), classify)
    with pytest.raises(KeyError):
        r.call(lambda: {}["x"])
    assert r.open is None


def test_opening_the_circuit_wakes_threads_that_wait():
    r = Retrier(RetryPolicy(budget_s=600, **FAST), classify)
    out = {}

    def worker():
        t0 = time.monotonic()
        try:
            r.call(failing(*[Failure("rate_limited", "wait", 429, retry_after=30)] * 3))
        except GiveUp as e:
            out["why"], out["took"] = e.why, time.monotonic() - t0

    t = threading.Thread(target=worker)
    t.start()
    time.sleep(0.2)
    r.trip(Failure("fatal", "Invalid API key", 401))
    t.join(timeout=5)
    assert out["why"] == "tripped" and out["took"] < 2


def test_max_attempts_caps_the_tries_per_call():
    r = Retrier(RetryPolicy(budget_s=60, max_attempts=3, **FAST), classify)
    fn = failing(*[Failure("connection", "refused")] * 10)
    with pytest.raises(GiveUp, match="gave up after 3 attempts"):
        r.call(fn)
    assert fn.calls == 3
