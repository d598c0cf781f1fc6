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
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """``.NAME.tmp-XXXXXXXX`` next to ``path``: hidden, unique, on the same file system."""
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """Replace ``path`` with ``data`` (bytes, text as UTF-8, or a function that writes the file
    it is given) all at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
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
