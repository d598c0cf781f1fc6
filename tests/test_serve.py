"""``fastdpo serve``: OpenAI-compatible routes, the chat template, batching of concurrent requests
(answers independent of what they were batched with), errors, and clean shutdown."""
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future

import pytest
import torch
from openai import OpenAI

from fastdpo.bench.judge import make_tiny_checkpoint, start_server
from fastdpo.generation import sampler
from fastdpo.generation.batcher import Batcher, Job, Row
from fastdpo.generation.openai_api import RequestError, chat_turns
from fastdpo.generation.sampler import sample
from fastdpo.generation.serve import ChatServer
from fastdpo.models.checkpoint import load_policy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", block_size=256)


@pytest.fixture(scope="module")
def server(ckpt):
    """In-process server with a wide batching window so concurrent requests surely share a batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's small ops: OpenMP barriers only cost on a shared box
    model, tok = load_policy(ckpt)
    srv = ChatServer(model, tok, port=0, model_name="tiny", batch_window_ms=300, default_max_tokens=16)
    srv.start_in_thread()
    yield srv
    srv.stop()
    torch.set_num_threads(threads)


def _direct(ckpt, prompt_ids, max_tokens, temperature=0.0, seed=0):
    model, tok = load_policy(ckpt)
    with torch.inference_mode():
        return tok.decode(sample(model, [prompt_ids], temperature, max_tokens, 50, tok.eos_id, seed)[0])


def _post(url, body, raw=None):
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(server):
    client = OpenAI(base_url=server.url, api_key="x")
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    with urllib.request.urlopen(server.url.replace("/v1", "/health"), timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_chat_uses_the_chat_template_and_reports_usage(server, ckpt):
    client = OpenAI(base_url=server.url, api_key="x")
    out = client.chat.completions.create(model="tiny", temperature=0, max_tokens=12,
                                         messages=[{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Reverse: cat dog"}])
    _, tok = load_policy(ckpt)
    ids = tok.render_conversation([("user", "Be brief.\n\nReverse: cat dog")])
    expected = _direct(ckpt, ids, 12)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert choice.finish_reason == ("length" if out.usage.completion_tokens == 12 else "stop")
    assert out.object == "chat.completion" and out.model == "tiny"


def test_completions_continue_raw_text(server, ckpt):
    client = OpenAI(base_url=server.url, api_key="x")
    out = client.completions.create(model="tiny", prompt=["cat dog", "fox"], temperature=0, max_tokens=6)
    _, tok = load_policy(ckpt)
    assert [c.text for c in out.choices] == [_direct(ckpt, tok.encode(p), 6) for p in ("cat dog", "fox")]
    assert [c.index for c in out.choices] == [0, 1]


def test_concurrent_requests_are_batched_and_independent_of_batching(server):
    """Seeded requests sent together give the same answers as sent one by one, and the server
    sampled them in fewer batches than requests."""
    client = OpenAI(base_url=server.url, api_key="x")

    def ask(i):
        r = client.chat.completions.create(model="tiny", temperature=1.0, max_tokens=8 + i, seed=100 + i,
                                           messages=[{"role": "user", "content": f"Count: {' x' * i}"}])
        return r.choices[0].message.content

    solo = [ask(i) for i in range(6)]
    before = server.batcher.batches
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(6)] == solo
    assert server.batcher.batches - before < 6


def test_n_choices_and_stop_strings(server):
    client = OpenAI(base_url=server.url, api_key="x")
    out = client.chat.completions.create(model="tiny", n=3, temperature=1.2, max_tokens=10, seed=1,
                                         messages=[{"role": "user", "content": "hi"}])
    assert [c.index for c in out.choices] == [0, 1, 2]
    text = out.choices[0].message.content
    if len(text) > 2:
        cut = client.chat.completions.create(model="tiny", n=3, temperature=1.2, max_tokens=10, seed=1,
                                             stop=[text[1:3]], messages=[{"role": "user", "content": "hi"}])
        assert cut.choices[0].message.content == text[: text.find(text[1:3])]
        assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,status,needle", [
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "'stream'"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "limit of 16"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400, "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "needs 'logprobs'"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, 400, "up to 4"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "not found"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "role 'user'"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "unsupported role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "'temperature'"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400,
     "'max_tokens': Input should be a valid integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "greater than or equal to 1"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context is 256 tokens"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, needle):
    code, payload = _post(server.url + "/chat/completions", body)
    assert code == status and needle in payload["error"]["message"], payload
    assert payload["error"]["type"] == "invalid_request_error"


def test_bad_json_and_unknown_route(server):
    code, payload = _post(server.url + "/chat/completions", None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in payload["error"]["message"]
    code, payload = _post(server.url + "/nope", {})
    assert code == 404


def test_chat_turns_keep_system_and_join_text_parts():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    turns = chat_turns([{"role": "system", "content": "S"}, {"role": "user", "content": parts},
                        {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}])
    assert turns == [("system", "S"), ("user", "ab"), ("assistant", "c"), ("user", "d")]
    with pytest.raises(RequestError, match="text content"):
        chat_turns([{"role": "user", "content": [{"type": "image_url"}]}])


def test_cli_serve_port_zero_and_clean_shutdown(ckpt):
    """SIGTERM while an answer is streaming: the answer finishes, then the server exits 0."""
    proc, url, name = start_server(ckpt, env={"OMP_NUM_THREADS": "1"})
    try:
        client = OpenAI(base_url=url, api_key="x")
        assert client.chat.completions.create(model=name, max_tokens=3, messages=[
            {"role": "user", "content": "hi"}]).choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model=name, max_tokens=200, stream=True, temperature=1.0,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "tell me more"}])
        next(iter(stream))                                   # the answer has started
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)                                  # ... and is not cut off
        assert rest[-1].usage is not None and rest[-2].choices[0].finish_reason is not None
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(urllib.error.URLError):  # the port is released: nothing answers any more
        urllib.request.urlopen(url + "/models", timeout=2)


class _Tok:
    eos_id = 0

    @staticmethod
    def decode(ids):
        return "".join(chr(97 + t % 26) for t in ids)


def _job(top_p=1.0):
    return Job([Row([1, 2], 0.0, 2, 0)], None, top_p)


@pytest.fixture
def fake_sample(monkeypatch):
    """The batcher without a model: sample() answers [7] per row, after ``gate`` opens."""
    gate = threading.Event()
    gate.set()

    def fake(model, prompts, *a, **k):
        gate.wait(10)
        return [[7] for _ in prompts], ["length" for _ in prompts]

    monkeypatch.setattr(sampler, "sample", fake)
    return gate


def _tokens(future):
    return [r.tokens for r in future.result(timeout=5)]


def test_submit_racing_close_never_strands_a_job(fake_sample):
    batcher = Batcher(None, _Tok, window_s=0.0)
    put = batcher._q.put
    closer = []

    def put_while_closing(item):
        if item is not None and not closer:   # close() runs while submit holds its lock
            closer.append(threading.Thread(target=batcher.close))
            closer[0].start()
            time.sleep(0.2)
        put(item)

    batcher._q.put = put_while_closing
    future = batcher.submit(_job())
    closer[0].join(10)
    assert _tokens(future) == [[7]]   # before the sentinel, so served, not left waiting


def test_close_fails_jobs_the_worker_never_reached(fake_sample):
    batcher = Batcher(None, _Tok, window_s=0.0)
    fake_sample.clear()                        # the worker is stuck in a long batch
    first = batcher.submit(_job())
    time.sleep(0.1)
    second = batcher.submit(_job())
    batcher.close(timeout=0.1)
    with pytest.raises(RequestError, match="shutting down"):
        second.result(timeout=5)
    fake_sample.set()
    assert _tokens(first) == [[7]]
    with pytest.raises(RequestError, match="shutting down"):
        batcher.submit(_job())


def test_a_bug_in_the_batcher_fails_the_batch_and_keeps_serving(fake_sample):
    batcher = Batcher(None, _Tok, window_s=0.0)
    with pytest.raises(TypeError):
        batcher.submit(_job(top_p=[1.0])).result(timeout=5)   # unhashable: grouping itself fails
    assert _tokens(batcher.submit(_job())) == [[7]]
    batcher.close()


def test_a_full_queue_is_a_503_at_once(fake_sample):
    batcher = Batcher(None, _Tok, window_s=0.0, max_queued_rows=3)
    fake_sample.clear()                        # the worker holds one job; the queue fills behind it
    running = batcher.submit(_job())
    time.sleep(0.1)
    queued = [batcher.submit(_job()) for _ in range(3)]
    with pytest.raises(RequestError, match="busy") as e:
        batcher.submit(_job())
    assert e.value.status == 503
    fake_sample.set()
    assert [_tokens(f) for f in (running, *queued)] == [[[7]]] * 4
    batcher.close()


def test_generation_timeout_is_a_503(ckpt, monkeypatch):
    model, tok = load_policy(ckpt)
    srv = ChatServer(model, tok, port=0, request_timeout=0.05).start_in_thread()
    try:
        monkeypatch.setattr(srv.batcher, "submit", lambda job: Future())   # never answered
        code, payload = _post(srv.url + "/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert code == 503 and "timed out" in payload["error"]["message"]
        assert srv.batcher._pending == 0      # the arrival was not left counted
    finally:
        srv.stop()


def test_after_a_batch_of_several_requests_the_next_waits_its_window_for_stragglers(fake_sample):
    """A mining client sends one request per temperature: once its bursts are seen, a burst's
    late request joins its batch instead of costing a second one."""
    batcher = Batcher(None, _Tok, window_s=0.3)

    def request():
        batcher.arrive()                       # as the server does when a request comes in
        return batcher.submit(_job())

    batcher.arrive()                           # two requests arrive together: one batch
    first = [request(), batcher.submit(_job())]
    [f.result(timeout=5) for f in first]
    assert batcher.batches == 1
    early = request()
    time.sleep(0.05)                           # the straggler comes after the batch would have started
    late = request()
    early.result(timeout=5), late.result(timeout=5)
    assert batcher.batches == 2                # one batch for both
    batcher.close()
