"""A bounded load test of OpenAI-compatible chat servers on loopback: many concurrent clients,
latency percentiles, and whether every request got an answer or a clear refusal.

Each round sends ``--requests`` chat completions with ``--concurrency`` in flight (one keep-alive
connection per client thread, as the openai client keeps) to each server in turn, so servers
compared in one run see the same load at the same time of day (rounds interleave them). A fraction
of the requests can be malformed (``--bad-fraction``: they must get a 4xx) or streamed
(``--stream-fraction``: read to ``data: [DONE]``). A request "fails" only when it gets no answer,
a connection error, or a status other than 200 / 4xx / 503; after each round the server's
``/health`` must still answer.

    python -m fastdpo.bench.serve_load --ckpt DIR                    # starts fastdpo serve itself
    python -m fastdpo.bench.serve_load --url new=http://127.0.0.1:8000/v1 --url old=http://...:8001/v1
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from fastdpo.files import write_json

WORDS = "ant bee cat dog elk fox gnu hen owl pig rat yak".split()


class _Client(threading.local):
    conn: http.client.HTTPConnection | None = None


def _request(target: dict, body: bytes, stream: bool, timeout: float, local: _Client) -> tuple[str, float]:
    """One POST; returns (outcome, seconds). Outcomes: "200", "4xx", "503", "5xx", "error"."""
    t0 = time.perf_counter()
    for attempt in range(2):   # a keep-alive connection the server closed meanwhile: reconnect once
        if local.conn is None:
            local.conn = http.client.HTTPConnection(target["host"], target["port"], timeout=timeout)
        try:
            local.conn.request("POST", target["path"] + "/chat/completions", body,
                               {"Content-Type": "application/json", **target["headers"]})
            r = local.conn.getresponse()
            data = r.read()
            if r.status == 200 and stream and not data.rstrip().endswith(b"data: [DONE]"):
                return "error", time.perf_counter() - t0
            if r.getheader("Connection", "").lower() == "close":
                local.conn.close()
                local.conn = None
            s = r.status
            kind = "200" if s == 200 else "503" if s == 503 else "4xx" if 400 <= s < 500 else "5xx"
            return kind, time.perf_counter() - t0
        except (OSError, http.client.HTTPException):
            if local.conn is not None:
                local.conn.close()
            local.conn = None
            if attempt:
                return "error", time.perf_counter() - t0
    return "error", time.perf_counter() - t0


def _bodies(n: int, model: str, max_tokens: int, bad_fraction: float, stream_fraction: float,
            seed: int) -> list[tuple[bytes, bool]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < bad_fraction:
            bad = [b"{not json", b'{"messages": []}', b'{"messages": "x", "temperature": 9}']
            out.append((rng.choice(bad), False))
            continue
        stream = rng.random() < stream_fraction
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        body = {"model": model, "messages": [{"role": "user", "content": f"Sort the words: {words}"}],
                "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": stream}
        out.append((json.dumps(body).encode(), stream))
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _alive(target: dict) -> bool:
    try:
        conn = http.client.HTTPConnection(target["host"], target["port"], timeout=30)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _model(target: dict) -> str:
    conn = http.client.HTTPConnection(target["host"], target["port"], timeout=30)
    conn.request("GET", target["path"] + "/models", headers=target["headers"])
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data["data"][0]["id"]


def run_round(target: dict, bodies: list[tuple[bytes, bool]], concurrency: int, timeout: float) -> dict:
    local = _Client()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda b: _request(target, b[0], b[1], timeout, local), bodies))
    wall = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for kind, _ in results:
        counts[kind] = counts.get(kind, 0) + 1
    ok = [dt for kind, dt in results if kind == "200"]
    return {"requests": len(bodies), "counts": counts, "wall_s": wall, "ok_latencies": ok,
            "alive_after": _alive(target)}


def summarize(name: str, rounds: list[dict]) -> dict:
    lat = [x for r in rounds for x in r["ok_latencies"]]
    counts: dict[str, int] = {}
    for r in rounds:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
    n = sum(r["requests"] for r in rounds)
    return {"name": name, "requests": n, "counts": counts,
            "failed": counts.get("error", 0) + counts.get("5xx", 0),
            "alive": all(r["alive_after"] for r in rounds),
            "p50_s": _pct(lat, 0.50), "p99_s": _pct(lat, 0.99), "max_s": max(lat, default=float("nan")),
            "ok_per_s": len(lat) / sum(r["wall_s"] for r in rounds)}


def target_of(url: str, api_key: str | None) -> dict:
    u = urlparse(url)
    return {"url": url, "host": u.hostname, "port": u.port or 80, "path": u.path.rstrip("/") or "/v1",
            "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.bench.serve_load",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", action="append", default=[], metavar="NAME=URL",
                    help="a running server's base URL (repeat to compare; rounds interleave them)")
    ap.add_argument("--ckpt", default=None, help="start 'fastdpo serve' on this checkpoint and load it too")
    ap.add_argument("--serve-args", default="--threads 1", help="extra arguments for the started server")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--requests", type=int, default=400, help="per server per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--bad-fraction", type=float, default=0.0, help="malformed requests (must get a 4xx)")
    ap.add_argument("--stream-fraction", type=float, default=0.0, help="streamed requests")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request")
    ap.add_argument("--api-key", default=os.environ.get("FASTDPO_API_KEY"))
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 40 requests, concurrency 20, one round")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.requests, a.concurrency, a.rounds = 40, 20, 1
    targets = [(spec.split("=", 1)[0], target_of(spec.split("=", 1)[1], a.api_key)) for spec in a.url]
    proc = None
    if a.ckpt:
        from fastdpo.bench.judge import start_server
        proc, url, _ = start_server(a.ckpt, extra_args=tuple(a.serve_args.split()))
        targets.append(("fastdpo-serve", target_of(url, a.api_key)))
    if not targets:
        ap.error("give --url NAME=URL and/or --ckpt")
    try:
        models = {name: _model(t) for name, t in targets}
        per: dict[str, list[dict]] = {name: [] for name, _ in targets}
        for r in range(a.rounds):
            for name, t in (targets if r % 2 == 0 else targets[::-1]):
                bodies = _bodies(a.requests, models[name], a.max_tokens, a.bad_fraction, a.stream_fraction,
                                 seed=r)
                per[name].append(run_round(t, bodies, a.concurrency, a.timeout))
                print(f"round {r + 1} {name}: {per[name][-1]['counts']}", flush=True)
    finally:
        if proc is not None:
            from fastdpo.bench.judge import stop_server
            stop_server(proc)
    rows = [summarize(name, rounds) for name, rounds in per.items()]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"concurrency {a.concurrency}, {a.requests} requests x {a.rounds} rounds per server, max_tokens "
          f"{a.max_tokens}; load average {' '.join(load)}")
    for row in rows:
        print(f"{row['name']:<16} p50 {row['p50_s'] * 1000:8.0f} ms  p99 {row['p99_s'] * 1000:8.0f} ms  "
              f"{row['ok_per_s']:6.1f} ok/s  {row['counts']}  failed {row['failed']}  "
              f"{'up' if row['alive'] else 'DOWN'}")
    if a.json:
        from fastdpo.bench.run import provenance

        def redact(text):   # never a secret in a file (the key may sit in --serve-args too)
            return text.replace(a.api_key, "<redacted>") if a.api_key and isinstance(text, str) else text

        meta = provenance("fastdpo.bench.serve_load", argv)
        meta["command"] = redact(meta["command"])
        settings = {k: redact(v) for k, v in vars(a).items()}
        write_json(a.json, {"meta": meta, "loadavg": load, "settings": settings, "servers": rows})
    return 1 if any(r["failed"] or not r["alive"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
