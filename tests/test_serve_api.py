"""``fastdpo serve`` as an OpenAI/vLLM stand-in: streaming, log-probs, stop strings ending generation,
token-id prompts and answers, limits, access control, and the interaction log."""
import json
import os
import signal
import stat
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from openai import OpenAI

from fastdpo.bench.judge import make_tiny_checkpoint, start_server
from fastdpo.generation.batcher import Batcher, Job, Row
from fastdpo.generation.interactions import interaction_conversations, interaction_prompts, read_interactions
from fastdpo.generation.sampler import sample
from fastdpo.generation.serve import ChatServer
from fastdpo.generation.web import check_exposure
from fastdpo.models.checkpoint import load_policy

KEY = "sk-test-key-123"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve_api") / "tiny", block_size=128)


@pytest.fixture(scope="module")
def policy(ckpt):
    return load_policy(ckpt)


@pytest.fixture(scope="module")
def server(policy, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = policy
    log = tmp_path_factory.mktemp("log") / "interactions.jsonl"
    srv = ChatServer(model, tok, port=0, model_name="tiny", default_max_tokens=12, batch_window_ms=5,
                     max_body=64 << 10, log_interactions=log).start_in_thread()
    yield srv
    srv.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def _greedy(policy, prompt_ids, n):
    model, tok = policy
    with torch.inference_mode():
        return sample(model, [prompt_ids], 0.0, n, 50, tok.eos_id, 0)[0]


def _sse(url, body, headers=None):
    """The raw event stream: a list of the ``data:`` payloads."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), raw
    return [e[len("data: "):] for e in events]


def _post(url, body=None, raw=None, headers=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


MSG = [{"role": "user", "content": "Sort the words: fox cat"}]


# -- streaming --------------------------------------------------------------------------------------
def test_chat_stream_equals_the_whole_answer_and_ends_with_done(server, client):
    whole = client.chat.completions.create(model="tiny", messages=MSG, n=2, seed=3, temperature=1.0,
                                           max_tokens=10)
    events = _sse(server.url + "/chat/completions", {"model": "tiny", "messages": MSG, "n": 2, "seed": 3,
                                                     "temperature": 1.0, "max_tokens": 10, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text, finish, roles = ["", ""], [None, None], [[], []]
    for c in chunks[:-1]:
        (ch,) = c["choices"]
        roles[ch["index"]].append(ch["delta"].get("role"))
        text[ch["index"]] += ch["delta"].get("content", "")
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert text == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert [r[0] for r in roles] == ["assistant", "assistant"]       # the role comes once, first
    assert all(r[1:] == [None] * (len(r) - 1) for r in roles)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)


def test_openai_client_streams_completions_with_logprobs(client):
    kw = dict(model="tiny", prompt=["cat dog", "fox"], temperature=0.8, seed=5, max_tokens=8, logprobs=2)
    whole = client.completions.create(**kw)
    got: dict[int, dict] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            g = got.setdefault(ch.index, {"text": "", "tokens": [], "lps": [], "finish": None})
            g["text"] += ch.text
            if ch.logprobs:
                g["tokens"] += ch.logprobs.tokens
                g["lps"] += ch.logprobs.token_logprobs
            g["finish"] = ch.finish_reason or g["finish"]
    for c in whole.choices:
        g = got[c.index]
        assert g["text"] == c.text and g["finish"] == c.finish_reason
        assert g["tokens"] == c.logprobs.tokens and g["lps"] == pytest.approx(c.logprobs.token_logprobs)


# -- log-probs --------------------------------------------------------------------------------------
def test_logprobs_are_the_models_own_distribution(server, client, policy):
    model, tok = policy
    out = client.chat.completions.create(model="tiny", messages=MSG, temperature=0, max_tokens=6,
                                         logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True})
    choice = out.choices[0]
    ids = tok.render_conversation([("user", MSG[0]["content"])])
    new = choice.model_extra["token_ids"]
    assert new == _greedy(policy, ids, 6) and out.model_extra["prompt_token_ids"] == ids
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([ids + new]))[0, len(ids) - 1:-1].float(), -1)
    content = choice.logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in new]
    for i, (c, t) in enumerate(zip(content, new)):
        assert c.logprob == pytest.approx(lsm[i, t].item(), abs=1e-4)
        top = lsm[i].topk(3)
        assert [a.logprob for a in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-4)   # greedy: chosen = top
        assert c.bytes == list(tok.decode([t]).encode())


def test_completions_take_token_ids_and_return_them_as_token_ids(client, policy):
    """vLLM's sampling-client subset: token-id prompts, n, seed, top_k, token ids back, finish per choice."""
    _, tok = policy
    prompts = [tok.encode("cat dog fox"), tok.encode("ant")]
    out = client.completions.create(model="tiny", prompt=prompts, n=2, seed=9, temperature=1.0, max_tokens=7,
                                    logprobs=0, extra_body={"top_k": 5, "return_tokens_as_token_ids": True,
                                                            "return_token_ids": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="tiny", prompt=[tok.decode(p) for p in prompts], n=2, seed=9,
                                      temperature=1.0, max_tokens=7, logprobs=0,
                                      extra_body={"top_k": 5, "return_token_ids": True})
    for c, d in zip(out.choices, again.choices):
        ids = c.model_extra["token_ids"]
        assert c.logprobs.tokens == [f"token_id:{t}" for t in ids]
        assert c.logprobs.top_logprobs == [{}] * len(ids)     # logprobs=0: the chosen token only
        # the same seed with the prompts as text: the same answers
        assert d.model_extra["token_ids"] == ids and d.text == c.text == tok.decode(ids)
        assert c.finish_reason == ("length" if len(ids) == 7 else "stop")
        assert c.model_extra["prompt_token_ids"] == prompts[c.index // 2]
    assert out.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in out.choices)
    assert out.usage.prompt_tokens == sum(map(len, prompts))


# -- stop strings -----------------------------------------------------------------------------------
def _first_completing(tok, tokens, stop):
    """How many tokens until the decoded text first contains ``stop``."""
    return next(k for k in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:k]))


def test_stop_string_ends_generation_on_the_token_that_completes_it(client, policy):
    _, tok = policy
    prompt = tok.encode("cat dog")
    full = _greedy(policy, prompt, 20)
    text = tok.decode(full)
    stop = text[5:7]
    k = _first_completing(tok, full, stop)
    for stream in (False, True):
        kw = dict(model="tiny", prompt=prompt, temperature=0, max_tokens=20, stop=[stop, "\u2603never"],
                  extra_body={"return_token_ids": True})
        if not stream:
            out = client.completions.create(**kw)
            c = out.choices[0]
            assert c.text == text[: text.find(stop)] and c.finish_reason == "stop"
            assert c.model_extra["token_ids"] == full[:k] and c.model_extra["stop_reason"] == stop
            assert out.usage.completion_tokens == k < 20     # what was generated, not the whole budget
        else:
            pieces = [ch.choices[0].text for ch in client.completions.create(stream=True, **kw)]
            assert "".join(pieces) == text[: text.find(stop)]   # the stop string never leaks into the stream


def test_stop_token_ids_end_a_row_like_eos(client, policy):
    _, tok = policy
    prompt = tok.encode("fox")
    full = _greedy(policy, prompt, 12)
    out = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=12,
                                    extra_body={"stop_token_ids": [full[3]], "return_token_ids": True})
    c = out.choices[0]
    cut = full.index(full[3]) + 1
    assert c.model_extra["token_ids"] == full[:cut] and c.finish_reason == "stop"
    assert c.text == tok.decode(full[: cut - 1])


# -- limits and errors ------------------------------------------------------------------------------
def test_rows_per_request_and_body_size_are_capped(server):
    code, payload = _post(server.url + "/completions", {"prompt": ["a"] * 5, "n": 16})
    assert code == 400 and "80 answers exceeds this server's limit of 64" in payload["error"]["message"]
    code, payload = _post(server.url + "/completions", {"prompt": "x" * (70 << 10)})
    assert code == 413 and "exceeds" in payload["error"]["message"]


def test_a_body_without_a_length_is_capped_too(server):
    """A chunked upload over the limit is cut off with 413 (the limit is not only a header check)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    body = json.dumps({"prompt": "y" * (80 << 10)}).encode()
    try:
        for i in range(0, len(body), 8192):
            piece = body[i:i + 8192]
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    r = conn.getresponse()
    assert r.status == 413 and "exceeds" in json.loads(r.read())["error"]["message"]
    conn.close()


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    code, payload = _post(server.url + "/embeddings", {})
    assert code == 404 and payload["error"]["message"].startswith("no route POST")
    try:
        urllib.request.urlopen(server.url + "/chat/completions", timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 405 and "not allowed" in json.loads(e.read())["error"]["message"]


def test_a_stream_whose_client_leaves_is_ended_at_the_next_step(policy):
    """Cancelling a job (what the server does when a streaming client disconnects) ends its rows."""
    model, tok = policy
    batcher = Batcher(model, tok, window_s=0.0)
    try:
        job = None

        def on_event(ev):
            if ev[0] == "delta":
                job.cancelled = True

        job = Job([Row(tok.encode("cat"), 1.0, 60, 1, stream=True)], None, 1.0, on_event=on_event)
        rows = batcher.submit(job).result(timeout=30)
        assert 1 <= len(rows[0].tokens) <= 3
    finally:
        batcher.close()


# -- access control ---------------------------------------------------------------------------------
def test_api_key_is_required_on_every_route_but_health(policy):
    model, tok = policy
    srv = ChatServer(model, tok, port=0, model_name="tiny", api_key=KEY, default_max_tokens=3)
    srv.start_in_thread()
    try:
        for wrong in (None, "Bearer sk-wrong", "Basic " + KEY, "Bearer " + KEY + "x"):
            code, payload = _post(srv.url + "/chat/completions", {"messages": MSG},
                                  headers={"Authorization": wrong} if wrong else {})
            assert code == 401 and payload["error"]["code"] == "invalid_api_key", wrong
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=srv.url, api_key="sk-wrong", max_retries=0).models.list()
        good = OpenAI(base_url=srv.url, api_key=KEY, max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        assert good.chat.completions.create(model="tiny", messages=MSG).choices[0].message.role == "assistant"
        with urllib.request.urlopen(srv.url.replace("/v1", "/health"), timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        srv.stop()


def test_binding_beyond_loopback_needs_a_key_or_an_explicit_opt_out(capsys):
    check_exposure("serve", "127.0.0.1", None, False)
    check_exposure("serve", "::1", None, False)
    check_exposure("serve", "0.0.0.0", KEY, False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost"):
        with pytest.raises(ValueError, match="--allow-unauthenticated"):
            check_exposure("serve", host, None, False)
    check_exposure("serve", "0.0.0.0", None, True)
    assert "WARNING" in capsys.readouterr().err


def test_cli_refuses_an_open_public_bind_in_one_line(ckpt, monkeypatch, capsys):
    from fastdpo.cli import main
    monkeypatch.delenv("FASTDPO_API_KEY", raising=False)
    assert main(["serve", "--ckpt", str(ckpt), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdpo serve: error:") and err.count("\n") == 1
    assert "--allow-unauthenticated" in err


# -- the interaction log ----------------------------------------------------------------------------
def test_concurrent_requests_give_one_whole_private_line_each(server):
    before = sum(1 for _ in read_interactions(server.log.path))
    results: dict[int, str] = {}

    def ask(i):
        c = OpenAI(base_url=server.url, api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny", max_tokens=4 + i % 5, seed=i, stream=i % 3 == 0,
                                      messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": f"question {i}"}])
        if i % 3 == 0:
            results[i] = "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices)
        else:
            results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 50
    assert stat.S_IMODE(os.stat(server.log.path).st_mode) == 0o600
    records = [r for _, r in read_interactions(server.log.path)][before:]
    assert len(records) == 50 and len({r["request_id"] for r in records}) == 50
    by_question = {r["messages"][1]["content"]: r for r in records}
    for i in range(50):
        r = by_question[f"question {i}"]
        (choice,) = r["choices"]
        assert choice["text"] == results[i] and choice["finish_reason"] in ("stop", "length")
        assert r["sampling"]["seed"] == i and r["sampling"]["max_tokens"] == 4 + i % 5
        assert r["usage"]["completion_tokens"] == len(choice["token_ids"])
        assert r["route"] == "chat.completions"
        assert r["time"].endswith("+00:00") and r["latency_s"] >= 0


def test_a_kill_mid_load_leaves_only_whole_lines_and_the_log_feeds_prompts(ckpt, tmp_path):
    """(The server also takes its API key from the environment here.)"""
    log = tmp_path / "log.jsonl"
    proc, url, name = start_server(ckpt, extra_args=("--log-interactions", str(log), "--max-tokens", "3"),
                                   env={"OMP_NUM_THREADS": "1", "FASTDPO_API_KEY": KEY})
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
    stop = threading.Event()

    def load(i):
        c = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=10)
        k = 0
        while not stop.is_set() and k < 200:
            try:
                c.chat.completions.create(model=name,
                                          messages=[{"role": "user", "content": f"q{(i * 7 + k) % 9}"}])
            except openai.APIError:
                return
            k += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while (not log.exists() or log.read_bytes().count(b"\n") < 12) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        stop.set()
        for t in threads:
            t.join()
    data = log.read_bytes()
    lines = data.split(b"\n")
    whole, tail = lines[:-1], lines[-1]
    assert len(whole) >= 10
    for line in whole:
        json.loads(line)
    assert tail == b"" or not tail.endswith(b"\n")   # at most one torn line, never a torn line mid-file
    prompts = interaction_prompts(log)
    assert set(prompts) <= {f"q{j}" for j in range(9)} and len(prompts) == len(set(prompts)) >= 3
    three = interaction_prompts(log, n=3)
    assert len(three) == 3 and set(three) <= set(prompts) and three == interaction_prompts(log, n=3)
    # the next writer cuts a torn tail; mining reads the log as its prompt source
    from fastdpo.generation.interactions import InteractionLog
    from fastdpo.generation.mining import load_prompts
    log.write_bytes(data + b'{"request_id": "torn')
    InteractionLog(log).close()
    assert log.read_bytes() == b"\n".join(whole) + b"\n"
    assert load_prompts(log) == prompts and load_prompts(log, limit=2) == interaction_prompts(log, n=2)


def test_interaction_conversations_keep_system_turns_and_prompts_fold_them(tmp_path):
    log = tmp_path / "i.jsonl"
    recs = [
        {"request_id": "1", "choices": [],
         "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}]},
        {"request_id": "2", "messages": [{"role": "user", "content": "S\n\na"}], "choices": []},
        {"request_id": "3", "prompt": "raw text", "choices": []},
        {"request_id": "4", "choices": [],
         "messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
                      {"role": "user", "content": "d"}]},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    # a system turn is the template's to render (fastdpo's own folds it, a Hugging Face one may not)
    assert interaction_conversations(log) == [(("system", "S"), ("user", "a")), (("user", "S\n\na"),),
                                              (("user", "b"), ("assistant", "c"), ("user", "d"))]
    assert interaction_prompts(log) == ["S\n\na"]   # both fold to one question for mining
    log.write_text(json.dumps(recs[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"i.jsonl:2: invalid JSON"):
        interaction_prompts(log)


def test_the_listening_socket_turns_nagle_off_for_its_connections():
    """asyncio disables Nagle only on sockets whose proto says TCP; without it a response written in
    two parts waits ~40 ms for the client's delayed ACK on every keep-alive request."""
    import socket

    from fastdpo.generation.web import bind
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_the_load_bench_answers_every_request_and_keeps_no_secret(tmp_path):
    """``python -m fastdpo.bench.serve_load --quick`` against a started ``fastdpo serve`` with a key:
    every request answered, latencies reported, and the key never written to the JSON."""
    import json

    from fastdpo.bench.judge import make_tiny_checkpoint
    from fastdpo.bench.serve_load import main

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", stop_logit=3.0)
    out = tmp_path / "load.json"
    rc = main(["--ckpt", str(ckpt), "--serve-args", "--threads 1 --api-key sekrit-123",
               "--api-key", "sekrit-123", "--quick", "--json", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "sekrit-123" not in text
    doc = json.loads(text)
    (row,) = doc["servers"]
    assert row["counts"] == {"200": 40} and row["alive"] and 0 < row["p50_s"] <= row["p99_s"]
    assert doc["meta"]["git"].keys() == {"revision", "dirty"}
