"""Judges: reply parsing, the programmatic judge, selection by name, and OpenAIJudge against a real
``fastdpo serve`` process, a scripted fake server (retries, refusals) and a port nobody listens on."""
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fastdpo.bench.judge import make_tiny_checkpoint, start_server, stop_server
from fastdpo.generation.judge import (
    SCORE_PROMPT,
    Judge,
    JudgeError,
    OpenAIJudge,
    ProgrammaticJudge,
    available_judges,
    fill_prompt,
    format_judge_stats,
    load_prompt,
    make_judge,
    parse_score,
    parse_verdict,
    register_judge,
)


@pytest.mark.parametrize("reply,expected", [
    ("7", 7), (" 9\n", 9), ("10", 10), ("Score: 7", 7), ("7/10", 7), ("**8**", 8), ("I'd say 3 of 10", 3),
    ("7.5", 7), ("", None), (None, None), ("0", None), ("11", None), ("42", None), ("-3", None),
    ("ten", None), ("no score", None),
])
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize("reply,expected", [
    ("A", "A"), ("b", "B"), ("TIE", "TIE"), ("tie.", "TIE"), ("[[B]]", "B"), ("**A**", "A"), ('"A"', "A"),
    ("Verdict: A", "A"), ("Answer A.", "A"), ("Better answer: B", "B"), ("Final verdict: TIE", "TIE"),
    ("", None), (None, None), ("A or B", None), ("AB", None), ("The answer is A because", None),
    ("Both are fine", None), ("C", None),
])
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


def test_programmatic_judge_scores_compares_and_counts():
    j = ProgrammaticJudge(lambda i, r: None if r == "?" else min(10, 1 + len(r)), name="len")
    assert j.score("x", "abc") == 4
    assert j.compare("x", "a", "abcd") == "B" and j.compare("x", "abcd", "a") == "A"
    assert j.compare("x", "ab", "cd") == "TIE"
    assert j.score("x", "?") is None and j.compare("x", "?", "a") == "TIE"
    assert j.stats.requests == 6 and j.stats.invalid == 2
    assert j.score_many([("x", "a"), ("x", "ab")]) == [2, 3]
    assert j.compare_many([("x", "a", "ab"), ("x", "ab", "a")]) == ["B", "A"]


@pytest.mark.parametrize("bad", [0, 11, 7.5, "7", True])
def test_programmatic_judge_rejects_off_scale_scores(bad):
    with pytest.raises(ValueError, match="expected an int 1-10"):
        ProgrammaticJudge(lambda i, r: bad, name="broken").score("x", "y")


def test_judge_selection_by_name(tmp_path, monkeypatch):
    register_judge("unit-test-judge", lambda **kw: ProgrammaticJudge(lambda i, r: 5, name="unit"))
    assert "unit-test-judge" in available_judges() and "openai" in available_judges()
    assert make_judge("unit-test-judge").score("x", "y") == 5
    (tmp_path / "myjudges.py").write_text("def score(instruction, response):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    j = make_judge("myjudges:score")
    assert isinstance(j, ProgrammaticJudge) and j.name == "myjudges:score" and j.score("x", "y") == 3
    oj = make_judge(url="http://127.0.0.1:9/v1", model="m")
    assert isinstance(oj, OpenAIJudge)
    with pytest.raises(ValueError, match="unknown judge 'nope'"):
        make_judge("nope")
    with pytest.raises(ValueError, match="--judge-url and --judge-model"):
        make_judge("openai", url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="choose a judge"):
        make_judge()
    with pytest.raises(ValueError, match="cannot import"):
        make_judge("no_such_module_xyz:f")


def test_task_judge_is_available_by_name():
    j = make_judge("task")
    assert j.name == "task" and 1 <= j.score("Add the digits: 3 5 2", "10") <= 10


def test_rubric_prompts_load_and_fill(tmp_path):
    t = load_prompt(SCORE_PROMPT, ("instruction", "response"))
    filled = fill_prompt(t, instruction="Add {x}", response="5 }")
    assert "Add {x}" in filled and "5 }" in filled and "{response}" not in filled
    bad = tmp_path / "bad.txt"
    bad.write_text("Score {instruction} only")
    with pytest.raises(ValueError, match=r"bad.txt.*\{response\}"):
        load_prompt(bad, ("instruction", "response"))
    with pytest.raises(FileNotFoundError, match="judge prompt not found"):
        load_prompt(tmp_path / "missing.txt", ("a",))


def test_api_key_from_environment_is_not_shown(monkeypatch):
    monkeypatch.setenv("FASTDPO_JUDGE_API_KEY", "sk-secret-123")
    j = OpenAIJudge("http://127.0.0.1:9/v1", "m")
    assert j._client.api_key == "sk-secret-123"
    assert "secret" not in repr(j) and "secret" not in j.describe() and "secret" not in j.name


# -- against the real fastdpo server ----------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("judge") / "tiny")
    proc, url, name = start_server(ckpt, env={"OMP_NUM_THREADS": "1"})
    yield ckpt, url, name
    stop_server(proc)


def _expected_replies(ckpt, template_fill, max_tokens):
    """What the served model answers at temperature 0, computed without the server."""
    from fastdpo.generation.sampler import sample
    from fastdpo.models.checkpoint import load_policy
    model, tok = load_policy(ckpt)
    prompts = [tok.render_conversation([("user", t)]) for t in template_fill]
    with torch.inference_mode():
        out = sample(model, prompts, 0.0, max_tokens, 50, tok.eos_id, 0)
    return [tok.decode(x) for x in out]


def test_openai_judge_against_fastdpo_serve(served):
    ckpt, url, name = served
    judge = OpenAIJudge(url, name, concurrency=8, max_tokens=4, timeout=30)
    items = [(f"Sort the words: fox cat {i}", f"cat fox {i}") for i in range(12)]
    scores = judge.score_many(items)
    # Greedy on the server == greedy here, so the parsed results are known exactly.
    replies = _expected_replies(ckpt, [fill_prompt(judge.score_template, instruction=i, response=r)
                                       for i, r in items], 4)
    assert scores == [parse_score(r) for r in replies]
    assert judge.stats.requests == 12 and judge.stats.invalid == scores.count(None)
    assert judge.stats.invalid >= 1, "a random tiny model should not produce valid scores for everything"

    triples = [(f"Count: {i}", "a", "b b") for i in range(6)]
    verdicts = judge.compare_many(triples)
    replies = _expected_replies(ckpt, [fill_prompt(judge.compare_template, instruction=i, a=a, b=b)
                                       for i, a, b in triples], 4)
    assert verdicts == [parse_verdict(r) or "TIE" for r in replies]
    assert judge.stats.requests == 18
    assert judge.stats.invalid == scores.count(None) + sum(parse_verdict(r) is None for r in replies)
    assert judge.stats.rejected == 0 and judge.stats.retries == 0


def test_openai_judge_wrong_model_name_is_a_clear_error(served):
    _, url, _ = served
    judge = OpenAIJudge(url, "not-the-served-model", max_retries=3)
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match="HTTP 404.*not found"):
        judge.score("x", "y")
    assert time.monotonic() - t0 < 5  # not retried


# -- against a scripted fake server -----------------------------------------------------------
class _Scripted(BaseHTTPRequestHandler):
    """Pops (status, content) off the server's script for every chat completion."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            status, content, *headers = self.server.script.pop(0) if self.server.script else (200, "5")
            self.server.calls += 1
        if isinstance(content, bytes):   # a raw body, as a broken server or a proxy sends it
            data = content
        elif status == 200:
            body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}]}
        else:
            body = {"error": {"message": content, "type": "x"}}
        if not isinstance(content, bytes):
            data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers[0] if headers else {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    srv.daemon_threads = True
    srv.script, srv.calls, srv.lock = [], 0, threading.Lock()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_verdict_replies_parse_end_to_end(scripted):
    scripted.script = [(200, "8"), (200, "Score: 3/10"), (200, "great answer"), (200, "11"),
                       (200, "B"), (200, "[[A]]"), (200, "tie"), (200, "A, no wait, B")]
    j = OpenAIJudge(_url(scripted), "m", concurrency=1, backoff=0.01)
    assert [j.score("i", "r") for _ in range(4)] == [8, 3, None, None]
    assert [j.compare("i", "a", "b") for _ in range(4)] == ["B", "A", "TIE", "TIE"]
    assert j.stats.requests == 8 and j.stats.invalid == 3  # "tie" is a verdict, not an invalid reply


def test_retries_429_and_5xx_then_succeeds(scripted):
    scripted.script = [(429, "slow down"), (503, "busy"), (500, "oops"), (200, "6")]
    j = OpenAIJudge(_url(scripted), "m", max_retries=3, backoff=0.01)
    assert j.score("i", "r") == 6
    assert j.stats.retries == 3 and scripted.calls == 4


def test_retry_after_as_an_http_date_is_honoured(scripted):
    import email.utils
    when = email.utils.formatdate(time.time() + 2, usegmt=True)   # whole seconds: 1-2 s from now
    scripted.script = [(503, "warming up", {"Retry-After": when}), (200, "6")]
    j = OpenAIJudge(_url(scripted), "m", backoff=0.01, retry_budget=30)
    t0 = time.monotonic()
    assert j.score("i", "r") == 6
    assert time.monotonic() - t0 >= 0.9 and j.stats.http_5xx == 1 and j.stats.retries == 1
    assert j.stats.errors == {"HTTP 503: warming up": 1}


def test_persistent_5xx_is_a_bounded_error(scripted):
    scripted.script = [(500, "down")] * 10
    j = OpenAIJudge(_url(scripted), "m", max_retries=2, backoff=0.01)
    with pytest.raises(JudgeError, match="HTTP 500: down .gave up after 3 attempts"):
        j.score("i", "r")
    assert scripted.calls == 3


def test_refused_request_is_none_but_auth_error_raises(scripted):
    scripted.script = [(400, "context too long"), (401, "bad key")]
    j = OpenAIJudge(_url(scripted), "m", backoff=0.01)
    assert j.compare("i", "a", "b") == "TIE"
    assert j.stats.rejected == 1 and j.stats.invalid == 1
    with pytest.raises(JudgeError, match="HTTP 401"):
        j.score("i", "r")
    assert scripted.calls == 2


def test_unusable_replies_and_refusal_reasons_are_kept(scripted):
    """A report can show why judgements failed: the server's reasons and the raw replies."""
    scripted.script = [(200, "I cannot decide."), (400, "messages is 454 tokens; context is 256"),
                       (400, "messages is 454 tokens; context is 256"), (200, "7"),
                       (200, b'{"choices": []}')]
    j = make_judge("openai", url=_url(scripted), model="m", concurrency=1, retry_budget=5)
    assert [j.score("i", "r") for _ in range(5)] == [None, None, None, 7, None]
    st = j.stats
    assert st.invalid == 4 and st.rejected == 2
    assert st.errors == {"HTTP 400: messages is 454 tokens; context is 256": 2}
    assert st.samples == ["no verdict: 'I cannot decide.'", "no verdict: (no text)"]
    text = "\n".join(format_judge_stats(st.as_dict()))
    assert "replies without a verdict: 4" in text and "refused by the server: 2" in text
    assert "the judge said (2x): HTTP 400: messages is 454 tokens" in text
    assert "unusable reply: no verdict: 'I cannot decide.'" in text


@pytest.mark.parametrize("body,why", [(b"<html>502 Bad Gateway</html>", "not JSON: '<html>502 Bad Gateway"),
                                      (b'{"object": "list", "data": []}', "not a chat completion"),
                                      (b'{"choices": [{"index": 0}]}', "its first choice has no 'message'")])
def test_a_reply_that_is_not_a_chat_completion_says_the_judge_failed(scripted, body, why):
    scripted.script = [(200, body)] * 3
    j = OpenAIJudge(_url(scripted), "m", backoff=0.01)
    with pytest.raises(JudgeError, match=f"judge m at .*: HTTP 200, unparseable reply: {re.escape(why)}"):
        j.score("i", "r")
    assert scripted.calls == 1 and j.stats.unparseable == 1   # not retried
    assert j.stats.samples == [f"not a chat completion: {body.decode()!r}"]   # the reply as sent


def test_retry_budget_is_validated():
    with pytest.raises(ValueError, match="retry_budget .--judge-retry-budget. must be a finite number"):
        OpenAIJudge("http://127.0.0.1:1/v1", "m", retry_budget=-1)


def test_nothing_listening_fails_fast_with_clear_error():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", max_retries=3, backoff=0.2, timeout=5)
    t0 = time.monotonic()
    expected = rf"127.0.0.1:{port}/v1: connection: .*refused.*gave up after 4 attempts"
    with pytest.raises(JudgeError, match=expected):
        j.score_many([("i", "r")] * 3)
    assert time.monotonic() - t0 < 10
    assert j.stats.retries >= 3


def test_judge_base_class_concurrency_keeps_order():
    class Slow(Judge):
        name, concurrency = "slow", 8

        def _score(self, instruction, response):
            time.sleep(0.01 * (5 - int(response) % 5))
            return int(response)

    assert Slow().score_many([("i", str(k)) for k in range(1, 11)]) == list(range(1, 11))


def test_stats_since_an_earlier_snapshot(scripted):
    scripted.script = [(400, "too long"), (200, "what?"), (400, "too long"), (200, "huh")]
    j = OpenAIJudge(_url(scripted), "m", concurrency=1, backoff=0.01)
    j.score("i", "r"), j.score("i", "r")
    before = j.stats.as_dict()
    j.score("i", "r"), j.score("i", "r")
    since = j.stats.since(before)
    assert since["requests"] == 2 and since["rejected"] == 1 and since["invalid"] == 2
    assert since["errors"] == {"HTTP 400: too long": 1} and since["samples"] == ["no verdict: 'huh'"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
