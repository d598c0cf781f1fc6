"""The interaction log of ``fastdpo serve --log-interactions FILE``, and prompts read back from it.

One JSON line per answered request: ``request_id``, ``time`` (UTC, ISO 8601), ``route``
(``chat.completions`` / ``completions``), ``model``, the request's ``messages`` or ``prompt``,
its ``sampling`` settings, the ``choices`` returned (``text``, ``token_ids``, ``finish_reason``),
``usage`` and ``latency_s``. Lines are appended whole and fsynced under a lock before the answer
goes out, so concurrent requests never interleave and a kill leaves at most a torn last line,
which the next writer cuts and every reader skips. The file is created owner read/write only:
it holds what users typed.

``fastdpo pairs`` and ``fastdpo label`` take such a file as their prompt source: the chat requests'
conversations, de-duplicated, optionally N of them sampled (completion requests are raw text,
usually already templated, and are not used as prompts).
"""
from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from fastdpo.files import append_durable, open_append
from fastdpo.generation.openai_api import RequestError, chat_turns

Turns = tuple[tuple[str, str], ...]


class InteractionLog:
    """Appends one durable line per answered request; safe to call from many threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open_append(self.path, private=True)
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = (json.dumps({"time": now_iso(), **record}, ensure_ascii=False) + "\n").encode()
        with self._lock:
            append_durable(self._f, line)

    def close(self) -> None:
        with self._lock:
            self._f.close()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_interactions(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line, record)`` for each whole line; a torn last line (no newline) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interaction log not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return   # a writer was killed mid-line
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON in the interaction log ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, rec


def is_interaction_log(path: str | Path) -> bool:
    """Whether the file's first record looks like one of ours (a request id, a request, choices)."""
    try:
        for _, rec in read_interactions(path):
            return "request_id" in rec and "choices" in rec and ("messages" in rec or "prompt" in rec)
    except ValueError:
        return False
    return False


def interaction_conversations(path: str | Path, n: int | None = None, seed: int = 0,
                              single_turn: bool = False) -> list[Turns]:
    """The distinct conversations users sent to chat completions (system turns included: the
    server's chat template rendered them), in log order; ``n`` of them sampled with ``seed``;
    ``single_turn`` keeps only one-question conversations (system turns aside)."""
    seen: dict[Turns, None] = {}
    for lineno, rec in read_interactions(path):
        if "messages" not in rec:
            continue
        try:
            turns = tuple(chat_turns(rec["messages"]))
        except RequestError as e:
            raise ValueError(f"{path}:{lineno}: field 'messages': {e.message}") from None
        if single_turn and sum(role != "system" for role, _ in turns) != 1:
            continue
        seen.setdefault(turns, None)
    return _sampled(list(seen), n, seed)


def _sampled(convs: list, n: int | None, seed: int) -> list:
    if n is not None and n < len(convs):
        keep = sorted(random.Random(seed).sample(range(len(convs)), n))
        convs = [convs[i] for i in keep]
    return convs


def interaction_prompts(path: str | Path, n: int | None = None, seed: int = 0) -> list[str]:
    """The distinct single-question prompts of the log (what ``fastdpo pairs`` mines from), system
    text folded into the question as fastdpo's own template folds it."""
    folded = ("\n\n".join([t for r, t in turns if r == "system"] + [t for r, t in turns if r == "user"])
              for turns in interaction_conversations(path, single_turn=True))
    return _sampled(list(dict.fromkeys(folded)), n, seed)
