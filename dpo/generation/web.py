"""The web plumbing ``fastdpo serve`` and ``fastdpo label`` share, on FastAPI + uvicorn.

- access control: a bearer token checked on every route but ``/health`` (compared in constant
  time; a page may also carry it as ``?key=`` so a browser can open it), 401 in OpenAI's error shape;
  binding beyond loopback without a key is refused unless explicitly allowed;
- a request-body size limit (413) that also holds for bodies sent without a Content-Length;
- errors in OpenAI's shape for unknown routes and methods;
- ``WebServer``: an app on a socket bound up front (so ``port=0`` is known before serving), run
  by uvicorn on its own thread, stopped gracefully (in-flight requests finish) on ``stop()`` or,
  with ``run_until_signal``, on SIGTERM / SIGINT.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs

try:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
except ImportError as e:  # pragma: no cover - exercised by the CLI's own check
    raise ImportError(f"{e}; fastdpo's server and labeling page need the web stack: "
                      f"pip install 'fastdpo[serve]'") from e

from fastdpo.generation.openai_api import RequestError, error_body


# -- exposure and keys -----------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a name: it may resolve to anything


def check_exposure(command: str, host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve beyond this machine without a key unless explicitly allowed (then warn)."""
    if api_key or is_loopback(host):
        return
    if not allow_unauthenticated:
        raise ValueError(f"--host {host} exposes {command} beyond this machine without an API key: "
                         f"pass --api-key KEY (or set FASTDPO_API_KEY), or --allow-unauthenticated to "
                         f"serve it open")
    print(f"fastdpo {command}: WARNING: serving on {host} without an API key: anyone who can reach "
          f"this port can use it", file=sys.stderr, flush=True)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()   # equal lengths, so compare_digest's time says nothing


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every route but ``open_paths``; the paths
    in ``page_paths`` also accept ``?key=KEY`` (a page opened from a link)."""

    def __init__(self, app, key: str, open_paths=("/health",), page_paths=()):
        self.app, self.open_paths, self.page_paths = app, set(open_paths), set(page_paths)
        self._want = _digest(key.encode())

    def _ok(self, given: bytes) -> bool:
        return hmac.compare_digest(_digest(given), self._want)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        ok = scheme.lower() == b"bearer" and self._ok(token.strip())
        if not ok and scope["path"] in self.page_paths:
            keys = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [])
            ok = bool(keys) and self._ok(keys[0].encode())
        if ok:
            return await self.app(scope, receive, send)
        response = JSONResponse(error_body(401, "missing or incorrect API key (send 'Authorization: Bearer "
                                                "KEY')", None, "invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413, whether or not they say their
    length up front (a body streamed past the limit fails the route reading it with 413)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse(error_body(413, self.message), status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, self.message)
            return message

        await self.app(scope, counted_receive, send)

    @property
    def message(self) -> str:
        return f"request body exceeds {self.max_bytes} bytes"


def make_app(title: str, *, api_key: str | None, max_body: int, page_paths=()) -> tuple[FastAPI, object]:
    """A FastAPI app answering errors in OpenAI's shape, wrapped in the body limit and (with a
    key) the bearer check. Returns ``(app, asgi)``: add routes to ``app``, serve ``asgi``."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        where = f"{request.method} {request.url.path}"
        message = {404: f"no route {where}", 405: f"method not allowed: {where}"}.get(e.status_code,
                                                                                     str(e.detail))
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(error_body(400, f"'{where}': {first['msg']}", where or None), status_code=400)

    asgi = BodyLimit(app, max_body)
    if api_key:
        asgi = BearerAuth(asgi, api_key, page_paths=page_paths)
    return app, asgi


async def json_body(request: Request) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    return body


# -- running -------------------------------------------------------------------------------------
def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket: connections made before the server starts wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio turns Nagle off only on sockets whose proto says TCP, and with
    # Nagle on, a response written in two parts waits out the client's delayed ACK (~40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(backlog)
    return sock


class WebServer:
    """An ASGI app on ``host:port`` (bound at construction; port 0 picks a free one), served by
    uvicorn on a thread of its own."""

    def __init__(self, asgi, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 2048,
                 limit_concurrency: int | None = None, graceful_s: float = 30.0):
        self.sock = bind(host, port, backlog)
        self.host = host
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(asgi, log_level="warning", access_log=False, lifespan="off", loop="asyncio",
                                backlog=backlog, limit_concurrency=limit_concurrency,
                                timeout_graceful_shutdown=graceful_s, timeout_keep_alive=15)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> WebServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]},
                                        name="fastdpo-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web server on {self.base_url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, let in-flight requests finish (up to the graceful timeout), release the port."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self.sock.close()

    def run_until_signal(self, started: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT (a second one stops at once), then stop gracefully.
        ``started`` is called once the server answers (e.g. to print its address)."""
        stop = threading.Event()

        def on_signal(signum, frame):
            if stop.is_set():
                self._server.force_exit = True
            stop.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if started is not None:
                started()
            while not stop.wait(0.5):
                if not self._thread.is_alive():
                    raise RuntimeError("the web server stopped unexpectedly")
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)


class Served:
    """Base of the objects that own a ``WebServer`` (``self.web``) and resources of their own."""
    web: WebServer

    def start_in_thread(self):
        self.web.start()
        return self

    def stop(self) -> None:
        """Stop accepting, finish what is in flight, release the port, then ``close()``."""
        self.web.stop()
        self.close()

    def close(self) -> None:
        pass
