"""Where labels go: one durable JSON line per choice, in the conversations format ``fastdpo train``
reads unchanged.

``OUT`` holds the preferences (Prefer A / Prefer B)::

    {"conversations": [{"from": "user", "value": ...}, ...], "chosen": ..., "rejected": ...,
     "meta": {"item", "choice", "sides": {"A": origin, "B": origin}, "models", "source",
              "annotator", "note", "time", "tab", "truncated"}}

and ``OUT``'s sibling ``<stem>.ties_skips.jsonl`` the Tie and Skip decisions (``answers`` instead of
chosen/rejected: they are not pairs, and a trainer must not read them as such).

Every append is flushed and fsynced before the choice is acknowledged; a kill leaves at most a torn
last line, cut when the store is opened again, so a restart resumes exactly after the last
acknowledged choice. Undo rewrites the file without that row (atomically, so a kill leaves the old or
the new file). Both files are created owner read/write only: they hold users' text. An exclusive
lock on ``.OUT.lock`` keeps a second ``fastdpo label`` process from writing the same store.
"""
from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path

from fastdpo.files import append_durable, atomic_write, open_append

PAIRED = ("A", "B")
CHOICES = ("A", "B", "tie", "skip")


def other_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.ties_skips.jsonl")


class StoreBusy(OSError):
    """Another process holds the store."""


class LabelStore:
    """The labels written so far (``done``: item id -> row) and the two append-only files."""

    def __init__(self, out: str | Path):
        self.paths = {True: Path(out), False: other_path(Path(out))}
        self.done: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._files: dict[bool, object] = {}
        self.paths[True].parent.mkdir(parents=True, exist_ok=True)
        self._owner = open(self.paths[True].parent / f".{self.paths[True].name}.lock", "ab")
        try:
            fcntl.flock(self._owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._owner.close()
            raise StoreBusy(f"{self.paths[True]}: another fastdpo label process is writing this "
                            f"file") from None
        try:
            for paired, path in self.paths.items():
                self._files[paired] = open_append(path, private=True)   # cuts a torn last line first
                for row in self._read(path):
                    self.done[row["meta"]["item"]] = row
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _read(path: Path) -> list[dict]:
        rows = []
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                    row["meta"]["item"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{lineno}: not a label row written by fastdpo label "
                                     f"(no meta.item); use another --out file") from None
                rows.append(row)
        return rows

    def append(self, row: dict) -> None:
        """Write one choice durably (returns once it is on disk)."""
        paired = row["meta"]["choice"] in PAIRED
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        with self._lock:
            append_durable(self._files[paired], line)
            self.done[row["meta"]["item"]] = row

    def remove(self, item_id: str) -> dict | None:
        """Take back a choice: rewrite its file without that row. Returns the row (None if absent)."""
        with self._lock:
            row = self.done.get(item_id)
            if row is None:
                return None
            paired = row["meta"]["choice"] in PAIRED
            path = self.paths[paired]
            keep = [r for r in self._read(path) if r["meta"]["item"] != item_id]
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
            old = self._files[paired]
            atomic_write(path, data, private=True)
            self._files[paired] = open_append(path, private=True)
            old.close()
            del self.done[item_id]
            return row

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._owner.close()   # releases the lock
