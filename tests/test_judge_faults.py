"""A judge server that misbehaves the ways real ones do -- hangs past the timeout, answers 500, 401,
429 with a Retry-After far beyond the budget, drops the connection, replies with a page that is not
JSON, refuses every request as too long -- partway through ``fastdpo pairs`` and ``fastdpo eval``:
each ends with exit 2 and one line naming the judge's URL and what it said, the pairs and verdicts
already done are kept, and ``--resume`` against the recovered server finishes with exactly the
uninterrupted run's result without judging anything twice. A short 429 window is waited out."""
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [f"Reverse the words: {w} cat {i}"
           for i, w in enumerate("fox dog elk gnu hen ink jam kit owl pig".split())]
CONTEXT_ERROR = ("This model's maximum context length is 256 tokens. However, your messages resulted in 454 "
                 "tokens. Please reduce the length of the messages.")
# fault -> what the one error line must say (after the judge's URL)
FAULTS = {
    "timeout": r"timeout: .*still failing after .* retry budget 0.6s",
    "500": r"HTTP 500: model worker crashed \(still failing after",
    "401": r"HTTP 401: Invalid API key \(retrying cannot fix this\)",
    "429": r"HTTP 429: Rate limit reached \(still failing .* it asked to retry after 3600s\)",
    "close": r"connection: Connection error.*still failing after",
    "nonjson": r"HTTP 200, unparseable reply: not JSON: '<html><body>502 Bad Gateway.*retrying cannot fix",
    "400": r"HTTP 400: This model's maximum context length is 256 tokens.*8 requests in a row refused",
}


def verdict_for(content: str) -> str:
    """A deterministic stand-in judge: a score from the prompt's hash, the longer answer wins."""
    if "[Answer A]" in content:
        a = content.split("[Answer A]")[1].split("[Answer B]")[0]
        b = content.split("[Answer B]")[1].split("Better answer")[0]
        return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "TIE"
    return str(1 + int(hashlib.sha256(content.encode()).hexdigest(), 16) % 10)


class FakeJudge(BaseHTTPRequestHandler):
    """Answers like a judge for the first ``server.healthy`` requests, then fails as ``server.fault``
    says (``None``: never). ``server.calls`` counts requests answered with a verdict."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.requests += 1
            fault = srv.fault if srv.requests > srv.healthy else None
            if fault is None:
                srv.calls += 1
        if fault == "close":
            self.close_connection = True
            return
        if fault == "timeout":
            time.sleep(1.5)
        status, headers, ctype = 200, {}, "application/json"
        if fault in (None, "timeout"):
            data = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": verdict_for(body["messages"][0]["content"])}}]}
        elif fault == "nonjson":
            data, ctype = "<html><body>502 Bad Gateway</body></html>", "text/html"
        else:
            status, message = {"500": (500, "model worker crashed"), "401": (401, "Invalid API key"),
                               "400": (400, CONTEXT_ERROR), "429": (429, "Rate limit reached"),
                               "429-short": (429, "Rate limit reached")}[fault]
            if fault == "429":
                headers["Retry-After"] = "3600"
            if fault == "429-short":
                headers["Retry-After"] = "1"
                with srv.lock:   # the window closes one second after it opened
                    srv.window_end = srv.window_end or time.monotonic() + 1.0
                    if time.monotonic() >= srv.window_end:
                        srv.fault = None
            data = {"error": {"message": message, "type": "x", "code": status}}
        raw = (data if isinstance(data, str) else json.dumps(data)).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)


class FakeJudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeJudge)
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.reset()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def reset(self, fault=None, healthy=0):
        with self.lock:
            self.fault, self.healthy, self.requests, self.calls, self.window_end = fault, healthy, 0, 0, None

    def handle_error(self, request, client_address):
        pass   # a client that gave up on a hanging request: the broken pipe is expected

    def stop(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def judge_server():
    srv = FakeJudgeServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    ckpt = make_tiny_checkpoint(d / "tiny", block_size=96, stop_logit=3.0)
    other = make_tiny_checkpoint(d / "other", block_size=96, stop_logit=1.0)  # same tokenizer
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return dict(dir=d, ckpt=ckpt, other=other, prompts=prompts)


def judge_flags(srv):
    """Short timeouts and budgets while the judge fails; a loaded machine's slow healthy replies
    are not failures (timeouts of the healthy runs are the defaults)."""
    fast = ["--judge-timeout", "0.5", "--judge-retry-budget", "0.6"] if srv.fault else []
    return ["--judge-url", srv.url, "--judge-model", "m", "--judge-concurrency", "2", "--no-progress",
            "--device", "cpu", *fast]


def pairs(files, srv, out, *extra):
    return main(["pairs", "--ckpt", str(files["ckpt"]), "--prompts", str(files["prompts"]), "--out", str(out),
                 "--batch-size", "3", "--max-new-tokens", "12", "--seed", "5", *judge_flags(srv), *extra])


def evaluate(files, srv, report, *extra):
    return main(["eval", "--a", str(files["ckpt"]), "--b", str(files["other"]),
                 "--prompts", str(files["prompts"]), "--max-new-tokens", "10", "--batch-size", "2",
                 "--mode", "both", "--report", str(report),
                 *judge_flags(srv), *extra])


def one_error_line(capsys, command: str, url: str, expected: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"fastdpo {command}: error: judge m at {url}: "), lines[0]
    assert re.search(expected, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The uninterrupted runs against a healthy judge (their own server)."""
    srv = FakeJudgeServer()
    d = tmp_path_factory.mktemp("reference")
    try:
        assert pairs(files, srv, d / "pairs.jsonl") == 0
        pairs_calls = srv.calls
        srv.calls = 0
        assert evaluate(files, srv, d / "eval.json") == 0
        eval_calls = srv.calls
    finally:
        srv.stop()
    records = [json.loads(x) for x in (d / "pairs.jsonl.progress.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 4 and records[1]["stats"]["pairs_kept"] > 0   # 10 prompts, batches of 3
    return dict(pairs=(d / "pairs.jsonl").read_bytes(), pairs_calls=pairs_calls, batches=records,
                eval=json.loads((d / "eval.json").read_text()), eval_calls=eval_calls)


def same_result(report: dict, ref: dict) -> bool:
    strip = ("judge_stats", "resumed")
    return ({k: v for k, v in report.items() if k not in strip}
            == {k: v for k, v in ref.items() if k not in strip})


@pytest.mark.parametrize("fault", FAULTS)
def test_pairs_stop_in_one_line_keep_pairs_and_resume(files, reference, judge_server, tmp_path, capsys,
                                                      fault):
    done = reference["batches"][1]["stats"]   # the judge fails during the third batch
    healthy = done["samples_judged"]
    if fault == "400":
        # refusals start 3 requests before the second batch ends: that batch is kept with 3 "no
        # score"s, then the 8th refusal in a row stops the run -- and the second batch is taken
        # back, its refusals having been the judge's failure, not isolated ones
        healthy, done = healthy - 3, reference["batches"][0]["stats"]
    judge_server.reset(fault, healthy=healthy)
    out = tmp_path / "pairs.jsonl"
    assert pairs(files, judge_server, out) == 2
    line = one_error_line(capsys, "pairs", judge_server.url, FAULTS[fault])
    n, kept_pairs = done["prompts_done"], done["pairs_kept"]
    assert f"stopped with {n} prompts done and {kept_pairs} pairs kept in {out}" in line
    assert "--resume" in line
    kept = out.read_bytes()
    assert kept == reference["pairs"][:len(kept)] and kept.count(b"\n") == done["pairs_kept"]
    saved = json.loads((tmp_path / "pairs.jsonl.report.json").read_text())
    assert line.split(": error: ", 1)[1].startswith(saved["stopped"])   # + the traceback hint
    if fault in ("500", "401", "429", "400"):   # the server's own words are kept in the report
        assert any(fault in reason for reason in saved["judge_stats"]["errors"])
    counter = {"timeout": "timeouts", "500": "http_5xx", "429": "rate_limited", "close": "connection_errors",
               "nonjson": "unparseable", "400": "rejected"}.get(fault)
    if counter:
        assert saved["judge_stats"][counter] >= 1
    if fault == "nonjson":
        assert "502 Bad Gateway" in saved["judge_stats"]["samples"][0]

    judge_server.reset()   # the judge recovers
    assert pairs(files, judge_server, out, "--resume") == 0
    assert out.read_bytes() == reference["pairs"]
    # only what was not committed is judged again
    assert judge_server.calls == reference["pairs_calls"] - done["samples_judged"]
    assert f"({done['prompts_done']} before this run)" in capsys.readouterr().out


@pytest.mark.parametrize("fault", ["500", "401", "close", "nonjson", "400"])   # timeouts, 429: as in pairs
def test_eval_stops_in_one_line_keeps_verdicts_and_resumes(files, reference, judge_server, tmp_path, capsys,
                                                           fault):
    judge_server.reset(fault, healthy=10)   # 10 prompts: A|B's 10 requests answered, B|A fails
    report = tmp_path / "eval.json"
    assert evaluate(files, judge_server, report) == 2
    line = one_error_line(capsys, "eval", judge_server.url, FAULTS[fault])
    progress = tmp_path / "eval.json.progress.jsonl"
    m = re.search(rf"; (\d+) verdicts kept in {re.escape(str(progress))}: run the same command with --resume",
                  line)
    assert m and int(m.group(1)) >= 10, line   # the first pass at least
    assert not report.exists()
    records = [json.loads(x) for x in progress.read_text().splitlines()]
    assert line.split(": error: ", 1)[1].startswith(records[-1]["stopped"])   # + the traceback hint
    kept: dict[str, list] = {}   # what a resumed run reads back: chunks in order, minus those taken back
    for r in records:
        if "phase" in r:
            kept.setdefault(r["phase"], []).extend(r["results"])
        for phase, lo in r.get("void", []):
            del kept[phase][lo:]
    assert sum(map(len, kept.values())) == int(m.group(1))
    if fault == "400":   # B|A's first chunk held refusals that led to the stop: taken back
        assert any("void" in r for r in records)
    if fault in ("500", "401", "400"):   # the server's own words are saved with the stop
        assert any(fault in reason for reason in records[-1]["judge_stats"]["errors"])
    if fault == "nonjson":
        assert "502 Bad Gateway" in records[-1]["judge_stats"]["samples"][0]

    judge_server.reset()
    assert evaluate(files, judge_server, report, "--resume") == 0
    out = json.loads(report.read_text())
    assert same_result(out, reference["eval"])
    assert out["resumed"] == {"verdicts": int(m.group(1))}
    assert judge_server.calls == reference["eval_calls"] - int(m.group(1))   # nothing judged twice
    assert "resumed: " in capsys.readouterr().out


def test_a_short_rate_limit_window_is_waited_out(files, reference, judge_server, tmp_path, capsys):
    """429 with Retry-After: 1 for about a second: within a 10 s budget the run just takes longer."""
    judge_server.reset("429-short", healthy=5)
    out = tmp_path / "pairs.jsonl"
    t0 = time.monotonic()
    assert pairs(files, judge_server, out, "--judge-retry-budget", "20") == 0
    assert time.monotonic() - t0 >= 1.0
    assert out.read_bytes() == reference["pairs"]
    text = capsys.readouterr().out
    assert re.search(r"judge failures: .*rate_limited [1-9]", text), text
    assert "the judge said" in text and "HTTP 429: Rate limit reached" in text
    saved = json.loads((tmp_path / "pairs.jsonl.report.json").read_text())
    assert saved["stopped"] is None and saved["judge_stats"]["rate_limited"] >= 1


def test_resume_needs_its_own_run(files, judge_server, tmp_path, capsys):
    assert evaluate(files, judge_server, tmp_path / "none.json", "--resume") == 2
    assert "--resume: no evaluation to continue" in capsys.readouterr().err
    assert evaluate(files, judge_server, tmp_path / "r.json") == 0
    assert evaluate(files, judge_server, tmp_path / "r.json", "--resume", "--seed", "1") == 2
    assert "r.json.progress.jsonl: written by a different evaluation" in capsys.readouterr().err
    calls = judge_server.calls
    assert evaluate(files, judge_server, tmp_path / "r.json", "--resume") == 0   # finished: nothing to ask
    assert judge_server.calls == calls
    assert pairs(files, judge_server, tmp_path / "none.jsonl", "--resume") == 2
    assert "--resume: " in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()


def test_the_installed_command_prints_no_traceback(files, reference, judge_server, tmp_path):
    """The real process (threads, progress bars off): one line on stderr, exit 2; --resume ends it."""
    judge_server.reset("close", healthy=reference["batches"][0]["stats"]["samples_judged"])
    out = tmp_path / "pairs.jsonl"
    cmd = [sys.executable, "-m", "fastdpo.cli", "pairs", "--ckpt", str(files["ckpt"]), "--prompts",
           str(files["prompts"]), "--out", str(out), "--batch-size", "3", "--max-new-tokens", "12",
           "--seed", "5", *judge_flags(judge_server)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FASTDPO_TRACEBACK", None)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith(f"fastdpo pairs: error: judge m at {judge_server.url}: connection: ")
    judge_server.reset()
    assert pairs(files, judge_server, out, "--resume") == 0
    assert out.read_bytes() == reference["pairs"]
