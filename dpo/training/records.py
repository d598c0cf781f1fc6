"""Reading data files into records: JSONL or a JSON array, and which one a file is.

A ``.jsonl`` (or ``.ndjson``) file is JSONL. Any other file that is one JSON array and nothing more
is an array file; anything else is JSONL, so a JSONL file whose first row happens to be an array
is never misread, and an array followed by more content is an error, not silently half-read.
Every record comes with its line; a record that cannot be a row (invalid JSON, bytes that are not
UTF-8, a lone UTF-16 surrogate, nesting deeper than ``MAX_DEPTH``) comes with the reason instead,
so the caller reports it as ``file:line: reason`` or skips and counts it (``on_error: skip``).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from fastdpo.errors import FastdpoError


class DataError(FastdpoError):
    """A data file or row that cannot be used; the message names the file and line."""


JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_DEPTH = 64   # JSON nesting a row may have; deeper is a bad row, not a RecursionError


def read_records(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Yield ``(line, value, error)`` for each record of a JSONL file or a JSON array file.

    Which one a file is comes from its name (``.jsonl``/``.ndjson``: JSONL) or else from its whole
    content: a file that is one JSON array and nothing more is an array file, anything else is
    JSONL (a JSONL file whose first row is itself an array stays JSONL). JSONL is streamed line by
    line (memory does not grow with the file); a JSON array is one document and is read whole.
    Lines split on ``\\n`` only, so a raw U+2028 inside a string does not cut a record in two. A
    record that is not UTF-8, nested deeper than ``MAX_DEPTH`` or holding a lone UTF-16 surrogate
    is a bad row (``error`` set), like any other."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix.lower() not in JSONL_SUFFIXES and _starts_with_bracket(path):
        data = path.read_bytes()
        if path.suffix.lower() == ".json" or _is_one_array(data):
            yield from _read_array(path, data)
            return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            value, err = _decode_record(raw)
            yield i, value, err


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        while not head and f.peek(1):   # a long run of leading blank space
            head = f.read(4096).lstrip()
    return head.removeprefix(b"\xef\xbb\xbf").startswith(b"[")


def _is_one_array(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8", "surrogateescape")), list)
    except (ValueError, RecursionError):
        return False


def _decode_record(raw: bytes) -> tuple[object, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, f"JSON nested more than {MAX_DEPTH} levels deep"
    return value, _text_problem(value)


def _text_problem(value, depth: int = 0) -> str | None:
    """Why a decoded row cannot be text for a tokenizer: too deep, or a lone UTF-16 surrogate
    (valid JSON, ``"\\ud800"``, but no character)."""
    if depth > MAX_DEPTH:
        return f"JSON nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"a string holds a lone UTF-16 surrogate (\\u{ord(value[e.start]):04x}), "
                    f"which is not text")
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        problem = _text_problem(k, depth + 1) if isinstance(k, str) else None
        problem = problem or _text_problem(v, depth + 1)
        if problem:
            return problem
    return None


def _read_array(path: Path, data: bytes) -> Iterator[tuple[int, object, str | None]]:
    """Items of a top-level JSON array, each with the line it starts on. A syntax error ends the
    file (the rest cannot be located reliably), so it is raised whatever ``on_error`` says, and so
    is anything but blank space after the array's end. Bytes that are not UTF-8 make the item
    holding them a bad row."""
    text = data.decode("utf-8", "surrogateescape")   # a bad byte becomes U+DC80..U+DCFF
    bad_lines = _non_utf8_lines(data)
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    counted, line = 0, 1   # newlines counted from the previous item on, not from the start each time
    while True:
        pos = ws.match(text, pos).end()
        line += text.count("\n", counted, min(pos, len(text)))
        counted = min(pos, len(text))
        if pos >= len(text):
            raise DataError(f"{path}:{line}: invalid JSON (unterminated array)")
        if text[pos] == "]":
            break
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); the rest of this JSON "
                            f"array cannot be read") from e
        except RecursionError:
            raise DataError(f"{path}:{line}: JSON nested more than {MAX_DEPTH} levels deep; the rest "
                            f"of this JSON array cannot be read") from None
        last = text.count("\n", pos, end) + line
        bad = [n for n in bad_lines if line <= n <= last]
        pos = end
        if bad:
            yield line, None, f"not valid UTF-8 (at line {bad[0]})"
        else:
            yield line, value, _text_problem(value)
    rest = text[pos + 1:]
    if rest.strip():
        at = text.count("\n", 0, pos + 1 + (len(rest) - len(rest.lstrip()))) + 1
        raise DataError(f"{path}:{at}: content after the end of the JSON array (a JSON array file "
                        f"holds one array; JSONL files should end in .jsonl)")


def _non_utf8_lines(data: bytes) -> list[int]:
    """The lines (1-based) holding bytes that are not UTF-8."""
    try:
        data.decode("utf-8")
        return []
    except UnicodeDecodeError:
        pass
    bad = []
    for i, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(i)
    return bad
