"""An OpenAI-compatible HTTP server for a fastdpo checkpoint.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /health``. Chat messages go through the tokenizer's chat template; plain completions
continue the raw text. Non-streaming only (``stream: true`` is a clear 400).

Concurrency: every HTTP connection gets a thread, but only one thread, the batcher, touches the
model. Requests that arrive within ``batch_window_ms`` of each other (or while the previous batch
is running) are sampled together in one ``fastdpo.generation.sampler.sample`` call, each row with its own
temperature, token budget and seed, so a request's answer does not depend on what it was
batched with. A request with a ``seed`` is reproducible; temperature 0 is greedy.

This is what users chat with, and the real server ``OpenAIJudge`` is tested against in CI. The
module is long because it holds the whole HTTP surface: request validation, the batcher and the
handler.
"""
from __future__ import annotations

import json
import queue
import random
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

MAX_BODY = 8 << 20


class RequestError(Exception):
    """A request this server refuses; becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# -- batching ----------------------------------------------------------------------------------
@dataclass
class _Job:
    prompts: list[list[int]]       # one per returned choice
    temperatures: list[float]
    budgets: list[int]
    seeds: list[int]
    top_k: int | None
    top_p: float
    future: Future = field(default_factory=Future)


class Batcher:
    """Collects jobs from handler threads and samples them together on one worker thread."""

    def __init__(self, model, eos_id: int, *, max_batch_rows: int = 64, window_s: float = 0.01,
                 dtype: torch.dtype | None = None):
        self.model, self.eos_id, self.dtype = model, eos_id, dtype
        self.max_batch_rows, self.window_s = max_batch_rows, window_s
        self.batches = self.rows = 0          # counters, for /health and tests
        # HTTP requests between arrival and answer (set by the handlers): once every one of them is
        # in the batch being collected, waiting out the window would only add latency.
        self.active = 0
        self._active_lock = threading.Lock()
        self._q: queue.Queue = queue.Queue()
        # submit's check-and-put and close's flag-and-sentinel are one step each under this lock,
        # so no job can land behind the sentinel and wait out its request timeout
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fastdpo-batcher", daemon=True)
        self._thread.start()

    def track(self, delta: int) -> None:
        with self._active_lock:
            self.active += delta

    def submit(self, job: _Job) -> Future:
        with self._lock:
            if self._closed:
                raise RequestError(503, "server is shutting down")
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
            if job is None:
                continue
            if not job.future.done():
                job.future.set_exception(RequestError(503, "server is shutting down"))
        self._q.put(None)   # a worker still finishing a batch stops after it

    def _collect(self) -> list[_Job] | None:
        first = self._q.get()
        if first is None:
            return None
        jobs, rows = [first], len(first.prompts)
        deadline = time.monotonic() + self.window_s
        while rows < self.max_batch_rows and len(jobs) < self.active:
            try:
                job = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._q.put(None)  # finish this batch, then stop
                break
            jobs.append(job)
            rows += len(job.prompts)
        return jobs

    def _run(self) -> None:
        from fastdpo.generation.sampler import sample

        with torch.inference_mode():
            while (jobs := self._collect()) is not None:
                try:
                    self._serve(jobs, sample)
                except Exception as e:  # a bug here must fail these requests, not kill the worker
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(e)

    def _serve(self, jobs: list[_Job], sample) -> None:
        """Sample ``jobs`` (one sample() call per sampling-filter setting) and answer them."""
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault((job.top_k, job.top_p), []).append(job)
        for (top_k, top_p), group in groups.items():
            try:
                out = sample(self.model, [p for j in group for p in j.prompts],
                             [t for j in group for t in j.temperatures],
                             [b for j in group for b in j.budgets], top_k, self.eos_id,
                             [s for j in group for s in j.seeds], top_p=top_p, dtype=self.dtype)
            except Exception as e:  # answer every waiting request, keep serving
                for j in group:
                    j.future.set_exception(e)
                continue
            self.batches += 1
            self.rows += len(out)
            at = 0
            for j in group:
                j.future.set_result(out[at: at + len(j.prompts)])
                at += len(j.prompts)


# -- request parsing ---------------------------------------------------------------------------
def _number(body: dict, name: str, default, lo: float, hi: float, kind=float):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
        raise RequestError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if not lo <= v <= hi:
        raise RequestError(400, f"'{name}' = {v} is out of range [{lo}, {hi}]", name)
    return kind(v)


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            ok = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            if not ok:
                raise RequestError(400, f"{where}: only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, f"{where}: 'content' must be a string or a list of text parts", "messages")


def chat_turns(messages) -> list[tuple[str, str]]:
    """OpenAI messages -> template turns, system turns included (the tokenizer's chat template
    renders them; fastdpo's own folds them into the first user turn); the conversation must end
    with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object", "messages")
        role, text = m.get("role"), _text_content(m.get("content"), f"messages[{i}]")
        if role in ("system", "developer"):
            turns.append(("system", text))
        elif role in ("user", "assistant"):
            turns.append((role, text))
        else:
            raise RequestError(400, f"messages[{i}]: unsupported role {role!r}", "messages")
    if [role for role, _ in turns if role != "system"][-1:] != ["user"]:
        raise RequestError(400, "the last non-system message must have role 'user'", "messages")
    return turns


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# -- the server --------------------------------------------------------------------------------
class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, model, tokenizer, *, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "fastdpo", default_max_tokens: int = 256, top_k: int | None = 50,
                 max_batch_rows: int = 64, batch_window_ms: float = 10.0, dtype: torch.dtype | None = None,
                 request_timeout: float = 600.0):
        super().__init__((host, port), _Handler)
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.block_size = model.config.block_size
        self.default_max_tokens, self.top_k, self.request_timeout = default_max_tokens, top_k, request_timeout
        self.created = int(time.time())
        self.batcher = Batcher(model, tokenizer.eos_id, max_batch_rows=max_batch_rows,
                               window_s=batch_window_ms / 1000, dtype=dtype)
        self._rng = random.Random()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.port}/v1"

    def start_in_thread(self) -> ChatServer:
        self._thread = threading.Thread(target=self.serve_forever, name="fastdpo-serve", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, finish the running batch, release the port."""
        self.shutdown()
        self.batcher.close()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- request handling, called from handler threads -------------------------------------
    def complete(self, body: dict, chat: bool) -> dict:
        if body.get("stream"):
            raise RequestError(400, "streaming is not supported by fastdpo serve; send stream=false",
                               "stream")
        requested = body.get("model")
        if requested is not None and requested != self.model_name:
            raise RequestError(404, f"model {requested!r} not found; this server serves {self.model_name!r}",
                               "model", "model_not_found")
        if chat:
            try:
                prompts = [self.tokenizer.render_conversation(chat_turns(body.get("messages")))]
            except ValueError as e:   # the chat template refused the messages
                raise RequestError(400, str(e), "messages") from None
        else:
            raw = body.get("prompt")
            raw = [raw] if isinstance(raw, str) else raw
            if not isinstance(raw, list) or not raw or not all(isinstance(p, str) for p in raw):
                raise RequestError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
            prompts = [self.tokenizer.encode(p) or [self.tokenizer.eos_id] for p in raw]
        n = _number(body, "n", 1, 1, 16, int)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", self.default_max_tokens,
                             1, 1 << 20, int)
        stops = _stops(body)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, "'seed' must be an integer", "seed")
        rng = random.Random(seed) if seed is not None else self._rng

        rows, budgets = [], []
        for i, ids in enumerate(prompts):
            room = self.block_size - len(ids)
            if room < 1:
                where = "messages" if chat else f"prompt[{i}]"
                raise RequestError(400, f"{where} is {len(ids)} tokens; this model's context is "
                                   f"{self.block_size} tokens", where.split("[")[0],
                                   "context_length_exceeded")
            rows += [ids] * n
            budgets += [min(max_tokens, room)] * n
        job = _Job(rows, [temperature] * len(rows), budgets, [rng.getrandbits(62) for _ in rows],
                   self.top_k, top_p)
        try:
            out = self.batcher.submit(job).result(timeout=self.request_timeout)
        except FutureTimeout:
            raise RequestError(503, "generation timed out; the server is overloaded") from None

        choices, n_new = [], 0
        for i, new in enumerate(out):
            text, stopped = _cut_at_stop(self.tokenizer.decode(new), stops)
            finish = "stop" if stopped or len(new) < budgets[i] else "length"
            n_new += len(new)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
        n_prompt = sum(map(len, prompts))
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                          "total_tokens": n_prompt + n_new}}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "fastdpo", "max_model_len": self.block_size}]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections
    server: ChatServer

    def setup(self):
        super().setup()
        # Headers and body go out in two writes; with Nagle on, the client's delayed ACK would
        # hold the body back ~40 ms on every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # quiet: one line per request would swamp the judge
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError) -> None:
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}
        self._send(e.status, {"error": {"message": e.message, "type": kind.get(e.status, "server_error"),
                                        "param": e.param, "code": e.code}})

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self):
        path = self._path()
        if path in ("/v1/models", "/models"):
            self._send(200, self.server.models())
        elif path == "/health":
            b = self.server.batcher
            self._send(200, {"status": "ok", "model": self.server.model_name, "batches": b.batches,
                             "rows": b.rows})
        else:
            self._error(RequestError(404, f"no route GET {self.path}"))

    def do_POST(self):
        self.server.batcher.track(+1)
        try:
            self._post()
        finally:
            self.server.batcher.track(-1)

    def _post(self):
        path = self._path()
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                raise RequestError(413, f"request body of {length} bytes exceeds {MAX_BODY}")
            raw = self.rfile.read(length)
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise RequestError(404, f"no route POST {self.path}")
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"request body is not valid JSON ({e})") from None
            if not isinstance(body, dict):
                raise RequestError(400, "request body must be a JSON object")
            self._send(200, self.server.complete(body, chat=path.endswith("chat/completions")))
        except RequestError as e:
            self._error(e)
        except Exception as e:  # a bug or a sampler failure: report it, keep the server up
            self._error(RequestError(500, f"{type(e).__name__}: {e}"))


def create_server(ckpt: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                  model_name: str | None = None, tokenizer_path: str | Path | None = None,
                  device: str = "cpu", **kw) -> ChatServer:
    """Load a checkpoint and bind a ``ChatServer`` (not yet serving; see ``serve``)."""
    from fastdpo.models.checkpoint import load_policy
    model, tok = load_policy(ckpt, tokenizer_path, device)
    name = model_name or Path(ckpt).resolve().name
    return ChatServer(model, tok, host=host, port=port, model_name=name, **kw)


def serve(ckpt: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          tokenizer_path: str | Path | None = None, device: str = "cpu", default_max_tokens: int = 256,
          top_k: int | None = 50, max_batch_rows: int = 64, batch_window_ms: float = 10.0,
          dtype: torch.dtype | None = None, threads: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM. ``port=0`` picks a free port; the first line printed is
    ``fastdpo serve: listening on http://HOST:PORT/v1 (model NAME)``. ``threads`` sets torch's
    intra-op threads (1 is fastest for tiny models on a busy CPU)."""
    if threads:
        torch.set_num_threads(threads)
    server = create_server(ckpt, host=host, port=port, model_name=model_name, tokenizer_path=tokenizer_path,
                           device=device, default_max_tokens=default_max_tokens, top_k=top_k,
                           max_batch_rows=max_batch_rows, batch_window_ms=batch_window_ms, dtype=dtype)

    def on_signal(signum, frame):
        # shutdown() waits for serve_forever to return, so it must run on another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"fastdpo serve: listening on {server.url} (model {server.model_name})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.batcher.close()
        server.server_close()
    print("fastdpo serve: stopped", file=sys.stderr, flush=True)
    return 0
