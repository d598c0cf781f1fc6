"""Files that are whole or absent: every whole-file write goes through ``atomic_write`` (a hidden
temporary sibling, flushed to disk, then renamed over the target), so a crash or a kill never
leaves a half-written report, cache or data file where a good one was. Append-only logs use
``append_durable`` and are cut back to their last whole record by their readers."""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """``.NAME.tmp-XXXXXXXX`` next to ``path``: hidden, unique, on the same file system."""
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None], private: bool = False) -> Path:
    """Replace ``path`` with ``data`` (bytes, text as UTF-8, or a function that writes the file
    it is given) all at once. ``private`` creates it owner read/write only (users' text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        if callable(data):
            data(tmp)
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable) -> Path:
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_durable(f, data: bytes) -> None:
    """Append to an open binary file and make it durable before returning."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def open_append(path: str | Path, private: bool = False):
    """Open ``path`` for appending (binary), creating it -- owner read/write only when ``private``
    (files that hold users' text) -- after cutting a torn last line left by a killed writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_torn_tail(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600 if private else 0o666)
    return os.fdopen(fd, "ab")


def cut_torn_tail(path: str | Path) -> int:
    """Truncate a line-oriented file after its last newline (a kill mid-append can leave part of
    a line); returns the number of bytes removed."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = pos - step + nl + 1
                break
            pos -= step
        else:
            end = 0
        if end < size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        return size - end


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure to ``path`` as PNG atomically, then close it (pyplot keeps every
    open figure alive until closed)."""
    import matplotlib.pyplot as plt
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
