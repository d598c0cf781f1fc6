"""``fastdpo label``: the labeling page and its small JSON API, on FastAPI + uvicorn.

Routes: ``GET /`` (the page, ``page.html``), ``GET /health``, ``GET /api/info``, and ``POST``
``/api/next``, ``/api/choice``, ``/api/undo``, ``/api/prompt`` (bodies carry the tab's id; see
``session.LabelSession``). With an API key, the page is opened as ``/?key=KEY`` and sends the key
as a bearer token on every call.
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from starlette.responses import HTMLResponse

from fastdpo.generation.label.answers import Answerer
from fastdpo.generation.label.session import MAX_NOTE, MAX_PROMPT, LabelSession
from fastdpo.generation.label.sources import candidate_items, prompt_items
from fastdpo.generation.label.store import LabelStore
from fastdpo.generation.web import Served, WebServer, check_exposure, make_app


class _Tab(BaseModel):
    tab: str = Field(min_length=1, max_length=100)


class _Choice(_Tab):
    id: str = Field(min_length=1, max_length=100)
    choice: str
    note: str = Field("", max_length=MAX_NOTE)
    annotator: str = Field("", max_length=200)


class _Undo(_Tab):
    id: str = Field(min_length=1, max_length=100)


class _Prompt(_Tab):
    prompt: str = Field(max_length=MAX_PROMPT)


def page_html() -> str:
    return resources.files("fastdpo.generation.label").joinpath("page.html").read_text(encoding="utf-8")


class LabelServer(Served):
    """The page and API for ``session`` on ``host:port`` (``port=0``: a free one)."""

    def __init__(self, session: LabelSession, *, host: str = "127.0.0.1", port: int = 7860,
                 api_key: str | None = None, title: str = "fastdpo label"):
        self.session = session
        app, asgi = make_app("fastdpo label", api_key=api_key, max_body=1 << 20, page_paths=("/",))
        html = page_html().replace("{{TITLE}}", title)
        info = {"title": title, "can_prompt": session.answerer is not None,
                "out": str(session.store.paths[True])}

        @app.get("/")
        def page():
            return HTMLResponse(html, headers={"Cache-Control": "no-store"})

        @app.get("/health")
        def health():
            return {"status": "ok", **session.progress()}

        @app.get("/api/info")
        def api_info():
            return {**info, "progress": session.progress()}

        @app.post("/api/next")
        def api_next(body: _Tab):
            return session.next(body.tab)

        @app.post("/api/choice")
        def api_choice(body: _Choice):
            return session.choose(body.tab, body.id, body.choice, body.note, body.annotator)

        @app.post("/api/undo")
        def api_undo(body: _Undo):
            return session.undo(body.tab, body.id)

        @app.post("/api/prompt")
        def api_prompt(body: _Prompt):
            return session.add_prompt(body.tab, body.prompt)

        self.web = WebServer(asgi, host, port)

    @property
    def url(self) -> str:
        return f"{self.web.base_url}/"

    def close(self) -> None:
        self.session.store.close()


def label(out: str | Path, *, candidates: str | Path | None = None, prompts: str | Path | None = None,
          model_a: str | Path | None = None, model_b: str | Path | None = None, n: int | None = None,
          seed: int = 0, tokenizer: str | Path | None = None, max_new_tokens: int = 128,
          temperature: float = 0.7, top_k: int | None = 50, device: str = "auto",
          dtype: torch.dtype | None = None, host: str = "127.0.0.1", port: int = 7860,
          api_key: str | None = None, allow_unauthenticated: bool = False, lease_s: float = 600.0,
          generation=None, generation_b=None) -> int:
    """Serve the labeling page until SIGINT/SIGTERM; every choice is appended to ``out`` at once.

    Items come from ``candidates`` (a preference or K-samples file) or from ``prompts`` (a prompts
    file or a ``serve --log-interactions`` file) answered by ``model_a`` and ``model_b`` (or twice
    by ``model_a``). With a model, the page also takes free-form prompts. ``generation`` (and
    ``generation_b`` for B), a ``generation.backends.GenerationConfig``, says what samples them
    (default: the built-in sampler). Rerunning the same command resumes where ``out`` ends."""
    from fastdpo.runtime import resolve_device
    check_exposure("label", host, api_key, allow_unauthenticated)
    if (candidates is None) == (prompts is None):
        raise ValueError("give exactly one source: --candidates FILE, or --prompts FILE with --model-a")
    if prompts is not None and model_a is None:
        raise ValueError("--prompts needs --model-a (and --model-b) to answer them")
    if model_b is not None and model_a is None:
        raise ValueError("--model-b needs --model-a")
    answerer = None
    if model_a is not None:
        answerer = Answerer(model_a, model_b, device=resolve_device(device), tokenizer=tokenizer,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                            dtype=dtype, generation=generation, generation_b=generation_b)
        if model_b is None and temperature == 0:
            raise ValueError("with one checkpoint both answers come from it: use --temperature above 0")
    if candidates is not None:
        items = candidate_items(candidates, n, seed)
    else:
        items = prompt_items(prompts, answerer.models, n, seed, answerer.settings)
    store = LabelStore(out)
    session = LabelSession(items, store, answerer, seed=seed, lease_s=lease_s)
    try:
        server = LabelServer(session, host=host, port=port, api_key=api_key)
    except BaseException:
        store.close()
        raise
    p = session.progress()
    key_hint = " (add ?key=YOUR_KEY)" if api_key else ""
    try:
        server.web.run_until_signal(lambda: print(
            f"fastdpo label: open {server.url}{key_hint} -- {p['done']} of {p['total']} labelled, choices go "
            f"to {out}", flush=True))
    finally:
        server.close()
    print(f"fastdpo label: stopped ({session.progress()['done']} of {p['total']} labelled)", file=sys.stderr,
          flush=True)
    return 0
