"""An OpenAI-compatible HTTP server for a fastdpo checkpoint, on FastAPI + uvicorn.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /health``. Chat messages go through the tokenizer's chat template; completions continue raw
text or token ids. ``stream: true`` answers with server-sent events in OpenAI's chunk format,
ending ``data: [DONE]``; ``logprobs`` / ``top_logprobs``, ``stop`` (generation ends on the token
that completes the stop string), ``n``, ``seed``, ``top_k`` and vLLM's token-id extensions are
honoured (``generation.openai_api``). Requests are validated and refused in OpenAI's error shape;
bodies, ``n`` and prompts x ``n`` are capped; a full queue or a timed-out wait is a 503.

Concurrency: the event loop parses requests and writes answers; one thread, the batcher
(``generation.batcher``), owns the model and samples concurrent requests together, each row with its
own temperature, budget and seed, so an answer does not depend on its batch-mates. A seeded request
is reproducible; temperature 0 is greedy.

With ``log_interactions`` every answered request is appended to a JSONL file before its answer goes
out (``generation.interactions``). With ``api_key`` every route but ``/health`` needs
``Authorization: Bearer KEY``. SIGTERM / SIGINT stop it gracefully: no new connections, in-flight
answers finish, then the batcher stops.

This is what users chat with, the real server ``OpenAIJudge`` is tested against, and a stand-in
for vLLM's server on the subset a sampling client uses.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from pathlib import Path

import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

from fastdpo.generation.batcher import Batcher, Job, Row
from fastdpo.generation.interactions import InteractionLog
from fastdpo.generation.openai_api import (
    Limits,
    RequestError,
    Sampling,
    TokenNames,
    choice_payload,
    envelope,
    parse_request,
    usage,
)
from fastdpo.generation.web import Served, WebServer, json_body, make_app

MAX_BODY = 8 << 20


class ChatServer(Served):
    """A model behind the OpenAI routes, bound to ``host:port`` (``port=0``: a free one);
    ``start_in_thread()`` / ``stop()`` from ``web.Served``."""

    def __init__(self, model, tokenizer, *, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "fastdpo", default_max_tokens: int = 256, top_k: int | None = 50,
                 max_batch_rows: int = 64, batch_window_ms: float = 10.0, dtype: torch.dtype | None = None,
                 request_timeout: float = 600.0, max_n: int = 16, max_rows_per_request: int | None = None,
                 max_queued_rows: int = 1024, max_body: int = MAX_BODY, max_connections: int = 2048,
                 api_key: str | None = None, log_interactions: str | Path | None = None,
                 tokens_as_ids: bool = False, allow_reload: bool = False):
        self.allow_reload = allow_reload
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.block_size = model.config.block_size
        self.request_timeout = request_timeout
        self.limits = Limits(model_name, self.block_size, model.config.vocab_size, default_max_tokens, top_k,
                             max_n, max_rows_per_request or max_batch_rows, tokens_as_ids)
        self.created = int(time.time())
        self.batcher = Batcher(model, tokenizer, max_batch_rows=max_batch_rows,
                               window_s=batch_window_ms / 1000, dtype=dtype, max_queued_rows=max_queued_rows)
        self.log = InteractionLog(log_interactions) if log_interactions else None
        self._rng = random.Random()
        app, asgi = make_app("fastdpo serve", api_key=api_key, max_body=max_body)
        self._add_routes(app)
        self.web = WebServer(asgi, host, port, limit_concurrency=max_connections)

    @property
    def port(self) -> int:
        return self.web.port

    @property
    def url(self) -> str:
        return f"{self.web.base_url}/v1"

    def close(self) -> None:
        """Stop the batcher (after the answers in flight) and close the log."""
        self.batcher.close()
        if self.log is not None:
            self.log.close()

    # -- routes ------------------------------------------------------------------------------------
    def _add_routes(self, app) -> None:
        @app.get("/health")
        async def health():
            b = self.batcher
            return {"status": "ok", "model": self.model_name, "batches": b.batches, "rows": b.rows,
                    "queued_rows": b.queued_rows}

        @app.get("/v1/models")
        async def models():
            return self.models()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self.complete(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self.complete(request, chat=False)

        @app.post("/v1/load_lora_adapter")
        async def load_adapter(request: Request):
            return await self.load_adapter(await json_body(request))

        @app.post("/v1/unload_lora_adapter")
        async def unload_adapter(request: Request):
            name = (await json_body(request)).get("lora_name")
            if not self.allow_reload or name not in self.limits.aliases:
                raise RequestError(404, f"no adapter {name!r} is loaded", "lora_name")
            self.limits.aliases.discard(name)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    def models(self) -> dict:
        base = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "fastdpo",
                "max_model_len": self.block_size}
        return {"object": "list", "data": [base, *({**base, "id": a, "parent": self.model_name}
                                                   for a in sorted(self.limits.aliases))]}

    async def load_adapter(self, body: dict):
        """vLLM's ``/v1/load_lora_adapter`` (``lora_name``, ``lora_path``), as far as one policy goes:
        the checkpoint at ``lora_path`` (a fastdpo adapter or full checkpoint) replaces the served
        weights and answers to ``lora_name`` as well as the base name; vLLM instead serves each
        adapter beside its base. Batches already sampling finish on the old weights."""
        if not self.allow_reload:
            raise RequestError(404, "loading adapters is off; start fastdpo serve with --allow-reload")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise RequestError(400, "'lora_name' and 'lora_path' must be non-empty strings")
        from fastdpo.models.checkpoint import load_checkpoint
        device = next(self.model.parameters()).device
        try:
            model, _ = await asyncio.to_thread(load_checkpoint, path, self.tokenizer, device)
        except (OSError, ValueError) as e:
            raise RequestError(400, f"cannot load {path}: {e}", "lora_path") from None
        if model.config.vocab_size != self.limits.vocab_size:
            raise RequestError(400, f"{path}: vocab_size {model.config.vocab_size} differs from the served "
                                    f"model's {self.limits.vocab_size}", "lora_path")
        self.model = self.batcher.model = model.eval()
        self.block_size = self.limits.block_size = model.config.block_size
        self.limits.aliases.add(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def complete(self, request: Request, chat: bool):
        t0 = time.perf_counter()
        self.batcher.arrive()
        job = None
        try:
            s = parse_request(await json_body(request), chat, self.tokenizer, self.limits, self._rng)
            # the sampler always stops at the end of turn: listed as a stop token (vLLM clients do, so
            # that any engine stops there) it would only make every row watched token by token
            stop_ids = s.stop_ids - {self.tokenizer.eos_id}
            rows = [Row(p, s.temperature, budget, 0, tuple(s.stops), stop_ids, s.logprobs, s.stream)
                    for p, budget in zip(s.prompts, s.budgets) for _ in range(s.n)]
            for row, seed in zip(rows, s.seeds):
                row.seed = seed
            events: asyncio.Queue | None = None
            if s.stream:
                loop, events = asyncio.get_running_loop(), asyncio.Queue()
                job = Job(rows, s.top_k, s.top_p,
                          on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
            else:
                job = Job(rows, s.top_k, s.top_p)
            self.batcher.submit(job)
        finally:
            if job is None or not job.counted:
                self.batcher.leave()
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if s.stream:
            return StreamingResponse(self._stream(s, job, events, request_id, t0),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        rows = await self._wait(job)
        await self._log(s, rows, request_id, t0)
        names = TokenNames(self.tokenizer, s.tokens_as_ids)
        choices = [choice_payload(s, i, r.text, r.finish, r.entries, names, r.tokens,
                                  stop_reason=r.stop_reason) for i, r in enumerate(rows)]
        if s.return_token_ids and not s.chat:
            for c in choices:
                c["prompt_token_ids"] = s.prompts[c["index"] // s.n]
        payload = envelope(s, request_id, int(time.time()), self.model_name, choices)
        if s.return_token_ids and s.chat:
            payload["prompt_token_ids"] = s.prompts[0]
        payload["usage"] = usage(s.prompts, sum(len(r.tokens) for r in rows))
        return JSONResponse(payload)

    async def _wait(self, job: Job) -> list[Row]:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), self.request_timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            job.cancelled = True
            raise _timed_out() from None
        except RequestError:
            raise
        except Exception as e:  # a sampler failure: this request fails, the server keeps serving
            raise RequestError(500, f"generation failed: {type(e).__name__}: {e}") from e

    async def _stream(self, s: Sampling, job: Job, events: asyncio.Queue, request_id: str, t0: float):
        names = TokenNames(self.tokenizer, s.tokens_as_ids)
        created = int(time.time())
        first = [True] * len(job.rows)
        offsets = [0] * len(job.rows)
        done = False

        def chunk(choices: list[dict]) -> str:
            body = envelope(s, request_id, created, self.model_name, choices, chunk=True)
            if s.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), self.request_timeout)
                except asyncio.TimeoutError:
                    yield f"data: {json.dumps(_timed_out().body())}\n\n"
                    break
                kind, i, piece, entries, reason = event
                if kind == "end":
                    break
                if kind == "error":
                    err = i if isinstance(i, RequestError) else RequestError(500, f"generation failed: {i}")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                row = job.rows[i]
                choice = choice_payload(s, i, piece, reason, entries, names,
                                        row.tokens if reason is not None else None,
                                        stop_reason=row.stop_reason, delta=True, first=first[i],
                                        offset=offsets[i])
                first[i] = False
                offsets[i] += sum(len(names.text(t)) for t, _, _ in entries)
                yield chunk([choice])
            if job.future.done() and not job.future.cancelled() and job.future.exception() is None:
                rows = job.rows
                if s.include_usage:
                    body = envelope(s, request_id, created, self.model_name, [], chunk=True)
                    body["usage"] = usage(s.prompts, sum(len(r.tokens) for r in rows))
                    yield f"data: {json.dumps(body)}\n\n"
                await self._log(s, rows, request_id, t0)
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:   # the client went away: end its rows at the next step
                job.cancelled = True

    async def _log(self, s: Sampling, rows: list[Row], request_id: str, t0: float) -> None:
        if self.log is None:
            return
        record = {"request_id": request_id, "route": "chat.completions" if s.chat else "completions",
                  "model": self.model_name, **s.record,
                  "choices": [{"index": i, "text": r.text, "token_ids": r.tokens, "finish_reason": r.finish}
                              for i, r in enumerate(rows)],
                  "usage": usage(s.prompts, sum(len(r.tokens) for r in rows)),
                  "latency_s": round(time.perf_counter() - t0, 4)}
        try:
            await asyncio.to_thread(self.log.write, record)
        except OSError as e:
            raise RequestError(500, f"could not write the interaction log {self.log.path}: {e}") from e


def _timed_out() -> RequestError:
    return RequestError(503, "generation timed out; the server is overloaded", code="timeout")


def create_server(ckpt: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                  model_name: str | None = None, tokenizer_path: str | Path | None = None,
                  device: str = "auto", **kw) -> ChatServer:
    """Load a checkpoint and bind a ``ChatServer`` (not yet serving; see ``serve``)."""
    from fastdpo.models.checkpoint import load_policy
    from fastdpo.runtime import resolve_device
    if isinstance(device, str):
        device = resolve_device(device)
    model, tok = load_policy(ckpt, tokenizer_path, device)
    name = model_name or Path(ckpt).resolve().name
    return ChatServer(model, tok, host=host, port=port, model_name=name, **kw)


def serve(ckpt: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          tokenizer_path: str | Path | None = None, device: str = "auto", default_max_tokens: int = 256,
          top_k: int | None = 50, max_batch_rows: int = 64, batch_window_ms: float = 10.0,
          dtype: torch.dtype | None = None, threads: int | None = None, max_n: int = 16,
          max_rows_per_request: int | None = None, max_queued_rows: int = 1024, max_body: int = MAX_BODY,
          request_timeout: float = 600.0, api_key: str | None = None, allow_unauthenticated: bool = False,
          log_interactions: str | Path | None = None, tokens_as_ids: bool = False,
          allow_reload: bool = False) -> int:
    """Serve until SIGINT/SIGTERM. ``port=0`` picks a free port; the first line printed is
    ``fastdpo serve: listening on http://HOST:PORT/v1 (model NAME)``. ``threads`` sets torch's
    intra-op threads (1 is fastest for tiny models on a busy CPU). Binding beyond loopback needs
    ``api_key`` or ``allow_unauthenticated``."""
    from fastdpo.generation.web import check_exposure
    check_exposure("serve", host, api_key, allow_unauthenticated)
    if threads:
        torch.set_num_threads(threads)
    server = create_server(ckpt, host=host, port=port, model_name=model_name, tokenizer_path=tokenizer_path,
                           device=device, default_max_tokens=default_max_tokens, top_k=top_k,
                           max_batch_rows=max_batch_rows, batch_window_ms=batch_window_ms, dtype=dtype,
                           max_n=max_n, max_rows_per_request=max_rows_per_request,
                           max_queued_rows=max_queued_rows, max_body=max_body,
                           request_timeout=request_timeout, api_key=api_key,
                           log_interactions=log_interactions, tokens_as_ids=tokens_as_ids,
                           allow_reload=allow_reload)
    try:
        server.web.run_until_signal(lambda: print(f"fastdpo serve: listening on {server.url} "
                                                  f"(model {server.model_name})", flush=True))
    finally:
        server.close()
    print("fastdpo serve: stopped", file=sys.stderr, flush=True)
    return 0

