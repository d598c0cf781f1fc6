"""Preference and SFT data files: read local JSONL / JSON arrays and validate their rows into
examples (``fastdpo.training.batches`` tokenizes and batches them).

Three preference formats (detected per file from its first row, or forced with ``format``):

- ``prompt``:        ``{"prompt": str, "chosen": str, "rejected": str, ...extra fields kept as meta}``
- ``conversations``: ``{"conversations": [{"from": "user"|"assistant", "value": str}, ...],
  "chosen": str, "rejected": str}``; the history ends with a user turn and is rendered by the chat
  template, the two answers are the competing next assistant turns.
- ``hh``:            HH-RLHF transcripts, ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``; both share everything up to their last assistant turn.

All three become the same ``PreferenceExample``: the prompt as chat turns and the two answers.

SFT rows are ``{"prompt", "response"}`` or ``{"conversations": [...]}`` whose last turn is the
assistant's answer (the only tokens trained on).

Every bad row is reported as ``file:line: reason``; with ``on_error="skip"`` it is skipped and
counted instead of stopping the run.
"""
from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


@dataclass
class PreferenceExample:
    turns: list[tuple[str, str]]          # the prompt as chat turns, ending with a user turn
    chosen: str
    rejected: str
    source: str                           # "file:line"
    meta: dict = field(default_factory=dict)


@dataclass
class SFTExample:
    turns: list[tuple[str, str]]
    response: str
    source: str
    meta: dict = field(default_factory=dict)


@dataclass
class DataStats:
    rows: int = 0                         # rows read (good and bad)
    skipped: int = 0                      # bad rows skipped under on_error="skip"
    dropped_long_prompt: int = 0
    truncated: int = 0                    # examples with a truncated response
    formats: dict = field(default_factory=dict)   # file -> detected format
    errors: list[str] = field(default_factory=list)  # first few skipped-row messages

    def summary(self) -> str:
        return (f"{self.rows} rows, {self.skipped} bad rows skipped, {self.dropped_long_prompt} "
                f"dropped (prompt too long), {self.truncated} responses truncated")


# --------------------------------------------------------------------------- reading records


def read_records(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Yield ``(line, value, error)`` for each record of a JSONL file or a JSON array file.

    JSONL is streamed line by line (memory does not grow with the file); a JSON array is one
    document and is read whole. Lines split on ``\\n`` only, so a raw U+2028 inside a string
    does not cut a record in two."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        while not head and f.peek(1):   # a long run of leading blank space
            head = f.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _read_array(path, path.read_text(encoding="utf-8"))
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield i, json.loads(raw), None
            except json.JSONDecodeError as e:
                yield i, None, f"invalid JSON ({e.msg} at column {e.colno})"
            except UnicodeDecodeError:
                yield i, None, "not valid UTF-8"


def _read_array(path: Path, text: str) -> Iterator[tuple[int, object, str | None]]:
    """Items of a top-level JSON array, each with the line it starts on. A syntax error ends the
    file (the rest cannot be located reliably), so it is raised whatever ``on_error`` says."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        if pos >= len(text):
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: invalid JSON (unterminated array)")
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); the rest of this JSON "
                            f"array cannot be read") from e
        yield line, value, None


# --------------------------------------------------------------------------- row parsing

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _string_field(row: dict, name: str) -> str:
    if name not in row:
        raise DataError(f"missing field '{name}'")
    v = row[name]
    if not isinstance(v, str):
        raise DataError(f"field '{name}' must be a string, got {type(v).__name__}")
    return v


def _turns_field(row: dict) -> list[tuple[str, str]]:
    conv = row["conversations"]
    if not isinstance(conv, list) or not conv:
        raise DataError("field 'conversations' must be a non-empty list of {from, value} turns")
    turns = []
    for j, t in enumerate(conv):
        if not (isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)):
            raise DataError(f"field 'conversations[{j}]' must be {{\"from\": str, \"value\": str}}")
        role = t["from"].lower()
        if role not in ("user", "human", "assistant", "gpt"):
            raise DataError(f"field 'conversations[{j}].from': unknown role {t['from']!r}")
        turns.append(("user" if role in ("user", "human") else "assistant", t["value"]))
    return turns


def _parse_hh(text: str, name: str) -> tuple[list[tuple[str, str]], str]:
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 5:
        raise DataError(f"field '{name}' is not an HH transcript "
                        f"('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    turns = [("user" if parts[i] == "Human" else "assistant", parts[i + 1].strip())
             for i in range(1, len(parts), 2)]
    if turns[-1][0] != "assistant":
        raise DataError(f"field '{name}': the transcript does not end with an assistant turn")
    return turns[:-1], turns[-1][1]


def detect_format(row: object, kinds: Sequence[str]) -> str | None:
    if not isinstance(row, dict):
        return None
    if "conversations" in row:
        return "conversations"
    if "prompt" in row:
        return "prompt"
    if "hh" in kinds and "chosen" in row:
        return "hh"
    return None


def parse_preference(row: object, fmt: str, source: str) -> PreferenceExample:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "hh":
        turns, chosen = _parse_hh(_string_field(row, "chosen"), "chosen")
        r_turns, rejected = _parse_hh(_string_field(row, "rejected"), "rejected")
        if r_turns != turns:
            raise DataError("chosen and rejected transcripts do not share their prompt")
        used = {"chosen", "rejected"}
    else:
        chosen, rejected = _string_field(row, "chosen"), _string_field(row, "rejected")
        if fmt == "prompt":
            turns = [("user", _string_field(row, "prompt"))]
            used = {"prompt", "chosen", "rejected"}
        else:
            if "conversations" not in row:
                raise DataError("missing field 'conversations'")
            turns = _turns_field(row)
            used = {"conversations", "chosen", "rejected"}
    if not turns or turns[-1][0] != "user":
        raise DataError("the prompt must end with a user turn")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"field '{name}' is an empty response")
    if chosen.strip() == rejected.strip():
        raise DataError("chosen and rejected are identical")
    return PreferenceExample(turns, chosen, rejected, source, {k: v for k, v in row.items() if k not in used})


def parse_sft(row: object, fmt: str, source: str) -> SFTExample:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "prompt":
        turns = [("user", _string_field(row, "prompt"))]
        response = _string_field(row, "response")
        used = {"prompt", "response"}
    else:
        if "conversations" not in row:
            raise DataError("missing field 'conversations'")
        turns = _turns_field(row)
        if "response" in row:
            response = _string_field(row, "response")
        elif turns[-1][0] == "assistant":
            turns, response = turns[:-1], turns[-1][1]
        else:
            raise DataError("conversations must end with the assistant's answer (or give 'response')")
        used = {"conversations", "response"}
    if not turns or turns[-1][0] != "user":
        raise DataError("the prompt must end with a user turn")
    if not response.strip():
        raise DataError("field 'response' is an empty response")
    return SFTExample(turns, response, source, {k: v for k, v in row.items() if k not in used})


def iter_rows(paths: Sequence[Path], fmt: str = "auto", on_error: str = "raise", kind: str = "preference",
              stats: DataStats | None = None) -> Iterator[tuple[PreferenceExample | SFTExample, object]]:
    """Stream ``(example, record)`` for every good row of the files, in order (``record`` is the
    row as read). Bad rows raise ``DataError`` naming file and line, or with ``on_error="skip"``
    are counted in ``stats`` and skipped."""
    stats = stats if stats is not None else DataStats()
    parse = parse_preference if kind == "preference" else parse_sft
    kinds = ("prompt", "conversations", "hh") if kind == "preference" else ("prompt", "conversations")
    for path in paths:
        file_fmt = None if fmt == "auto" else fmt
        stats.formats[str(path)] = file_fmt
        for line, row, err in read_records(Path(path)):
            stats.rows += 1
            source = f"{path}:{line}"
            try:
                if err:
                    raise DataError(err)
                if file_fmt is None:
                    file_fmt = detect_format(row, kinds)
                    if file_fmt is None:
                        raise DataError(f"cannot detect the data format from this row (fields "
                                        f"{sorted(row) if isinstance(row, dict) else type(row).__name__}); "
                                        f"set data.format to one of {list(kinds)}")
                    stats.formats[str(path)] = file_fmt
                example = parse(row, file_fmt, source)
            except DataError as e:
                msg = f"{source}: {e}"
                if on_error == "raise":
                    raise DataError(msg + " (set data.on_error=skip to skip bad rows)") from None
                stats.skipped += 1
                if len(stats.errors) < 20:
                    stats.errors.append(msg)
                continue
            yield example, row


def load_examples(paths: Sequence[Path], fmt: str = "auto", on_error: str = "raise", kind: str = "preference",
                  max_rows: int | None = None, stats: DataStats | None = None) -> list:
    """Parse every file into examples; bad rows raise ``DataError`` or are skipped and counted."""
    if not paths:
        raise ValueError("no data files given (set data.path)")
    stats = stats if stats is not None else DataStats()
    rows = iter_rows(paths, fmt, on_error, kind, stats)
    out = [ex for ex, _ in itertools.islice(rows, max_rows)]
    rows.close()
    if not out:
        raise DataError(f"no usable rows in {[str(p) for p in paths]} ({stats.summary()})")
    return out
