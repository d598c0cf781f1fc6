"""Preference and SFT data files: read local JSONL / JSON arrays and validate their rows into
examples (``fastdpo.training.batches`` tokenizes and batches them, rendering every prompt with the
model's chat template).

Messages are ``{"role": "system"|"user"|"assistant", "content": str}`` (TRL's conversational format,
OpenAI's) or ShareGPT's ``{"from": "system"|"human"|"gpt", "value": str}``, anywhere a message list
is accepted.

Preference formats (detected per file from its first row, or forced with ``format``):

- ``prompt``:        ``{"prompt", "chosen", "rejected", ...extra fields kept as meta}``; each a
  string (TRL's standard format) or a message list (TRL's conversational format: the prompt's
  messages, and one assistant message per answer).
- ``implicit``:      TRL's conversational rows with an implicit prompt: ``chosen`` and ``rejected``
  are whole conversations sharing every message but their last, assistant, one.
- ``conversations``: ``{"conversations": [messages], "chosen": ..., "rejected": ...}`` (answers as
  strings, or one assistant message each, as LLaMA-Factory writes them); the history ends with a
  user turn, the two answers are the competing next assistant turns.
- ``hh``:            HH-RLHF transcripts, ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``; both share everything up to their last assistant turn.

All of them become the same ``PreferenceExample``: the prompt as chat turns and the two answers.
Rows written by ``fastdpo pairs`` also carry the sampled token ids (``chosen_ids``,
``rejected_ids``, ``prompt_ids``, the ``tokenizer_hash`` they belong to) and each answer's finish
reason (``chosen_finish`` / ``rejected_finish``: ``stop`` or ``length``, i.e. cut off); training
uses those ids as they are (see ``fastdpo.training.batches``), the text is for people and judges.

SFT rows: ``{"prompt", "response"}`` or TRL's ``{"prompt", "completion"}`` (strings or message
lists), or ``{"messages": [...]}`` / ``{"conversations": [...]}`` whose last turn is the assistant's
answer (the only tokens trained on).

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

from fastdpo.errors import FastdpoError

PREFERENCE_FORMATS = ("prompt", "implicit", "conversations", "hh")
SFT_FORMATS = ("prompt", "messages", "conversations")


class DataError(FastdpoError):
    """A data file or row that cannot be used; the message names the file and line."""


@dataclass
class SampledIds:
    """The tokens a mined pair was sampled as: the answers end with the end-of-turn token when the
    model emitted it (finish ``stop``) and without it when the answer was cut off (``length``)."""
    tokenizer_hash: str
    chosen: list[int]
    rejected: list[int]
    prompt: list[int] | None = None       # None: re-rendered from the turns


@dataclass
class PreferenceExample:
    turns: list[tuple[str, str]]          # the prompt as chat turns, ending with a user turn
    chosen: str
    rejected: str
    source: str                           # "file:line"
    meta: dict = field(default_factory=dict)
    ids: SampledIds | None = None
    finish: tuple[str, str] = ("stop", "stop")   # chosen's, rejected's: "length" = cut off, not closed


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
    dropped_long_prompt: int = 0          # prompt > max_prompt_length, or no answer room in max_length
    truncated: int = 0                    # examples with an answer cut to max_length / max_completion_length
    identical_after_cut: int = 0          # pairs dropped: chosen and rejected the same once cut to fit
    sampled_ids: int = 0                  # mined pairs trained on their sampled token ids
    retokenized: int = 0                  # mined pairs from another tokenizer: their text encoded again
    formats: dict = field(default_factory=dict)   # file -> detected format
    errors: list[str] = field(default_factory=list)  # first few skipped-row messages

    def summary(self) -> str:
        out = (f"{self.rows} rows, {self.skipped} bad rows skipped, {self.dropped_long_prompt} "
               f"dropped (prompt over max_prompt_length or no room in max_length), {self.truncated} "
               f"with an answer cut to fit")
        if self.identical_after_cut:
            out += (f", {self.identical_after_cut} pairs dropped because chosen and rejected were "
                    f"identical once cut to fit")
        if self.sampled_ids or self.retokenized:
            out += (f", {self.sampled_ids} on their sampled token ids, {self.retokenized} re-encoded "
                    f"from text (sampled with another tokenizer)")
        return out


# --------------------------------------------------------------------------- reading records


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
    while True:
        pos = ws.match(text, pos).end()
        if pos >= len(text):
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: invalid JSON (unterminated array)")
        if text[pos] == "]":
            break
        line = text.count("\n", 0, pos) + 1
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


# --------------------------------------------------------------------------- row parsing

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _string_field(row: dict, name: str) -> str:
    if name not in row:
        raise DataError(f"missing field '{name}'")
    v = row[name]
    if not isinstance(v, str):
        raise DataError(f"field '{name}' must be a string, got {type(v).__name__}")
    return v


_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
          "assistant": "assistant", "gpt": "assistant", "model": "assistant"}


def _messages(value, name: str) -> list[tuple[str, str]]:
    """A message list (role/content or from/value) as (role, text) turns with canonical roles."""
    if not isinstance(value, list) or not value:
        raise DataError(f"field '{name}' must be a non-empty list of {{role, content}} messages")
    turns = []
    for j, m in enumerate(value):
        keys = ("role", "content") if isinstance(m, dict) and "role" in m else ("from", "value")
        if not (isinstance(m, dict) and isinstance(m.get(keys[0]), str) and isinstance(m.get(keys[1]), str)):
            raise DataError(f"field '{name}[{j}]' must be {{\"role\": str, \"content\": str}} "
                            f"(or ShareGPT's {{\"from\": str, \"value\": str}})")
        role = _ROLES.get(m[keys[0]].lower())
        if role is None:
            raise DataError(f"field '{name}[{j}].{keys[0]}': unknown role {m[keys[0]]!r} "
                            f"(expected system, user or assistant)")
        turns.append((role, m[keys[1]]))
    return turns


def _turns_field(row: dict, name: str = "conversations") -> list[tuple[str, str]]:
    if name not in row:
        raise DataError(f"missing field '{name}'")
    return _messages(row[name], name)


def _prompt_field(row: dict) -> list[tuple[str, str]]:
    """``prompt``: a string (one user turn) or a message list."""
    if isinstance(row.get("prompt"), list):
        return _messages(row["prompt"], "prompt")
    return [("user", _string_field(row, "prompt"))]


def _answer_field(row: dict, name: str) -> str:
    """An answer: a string, a message list holding one assistant message, or that one message
    (LLaMA-Factory's ShareGPT preference rows: ``"chosen": {"from": "gpt", "value": ...}``)."""
    value = row.get(name)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return _string_field(row, name)
    turns = _messages(value, name)
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise DataError(f"field '{name}' must hold exactly one assistant message")
    return turns[0][1]


def _implicit_prompt(row: dict) -> tuple[list[tuple[str, str]], str, str]:
    """TRL's implicit prompt: the messages chosen and rejected share, then one answer each."""
    chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1][0] != "assistant":
            raise DataError(f"field '{name}': the conversation does not end with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("chosen and rejected conversations do not share their prompt (every message "
                        "but the last)")
    return chosen[:-1], chosen[-1][1], rejected[-1][1]


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
    for fmt in ("messages", "conversations", "prompt"):
        if fmt in kinds and fmt in row:
            return fmt
    if "chosen" in row:
        if "implicit" in kinds and isinstance(row["chosen"], list):
            return "implicit"
        if "hh" in kinds:
            return "hh"
    return None


def parse_preference(row: object, fmt: str, source: str) -> PreferenceExample:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    used = {"chosen", "rejected"}
    if fmt == "hh":
        turns, chosen = _parse_hh(_string_field(row, "chosen"), "chosen")
        r_turns, rejected = _parse_hh(_string_field(row, "rejected"), "rejected")
        if r_turns != turns:
            raise DataError("chosen and rejected transcripts do not share their prompt")
    elif fmt == "implicit":
        turns, chosen, rejected = _implicit_prompt(row)
    else:
        turns = _prompt_field(row) if fmt == "prompt" else _turns_field(row)
        chosen, rejected = _answer_field(row, "chosen"), _answer_field(row, "rejected")
        used.add(fmt)
    if not turns or turns[-1][0] != "user":
        raise DataError("the prompt must end with a user turn")
    ids, finish = _sampled(row)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        # a sampled answer may be the end-of-turn token alone: its ids say so; a typed one may not
        if not text.strip() and ids is None:
            raise DataError(f"field '{name}' is an empty response")
    if chosen.strip() == rejected.strip() and (ids is None or ids.chosen == ids.rejected):
        raise DataError("chosen and rejected are identical")
    used |= set(SAMPLED_FIELDS)
    return PreferenceExample(turns, chosen, rejected, source, {k: v for k, v in row.items() if k not in used},
                             ids, finish)


SAMPLED_FIELDS = ("tokenizer_hash", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_finish",
                  "rejected_finish")


def _sampled(row: dict) -> tuple[SampledIds | None, tuple[str, str]]:
    """The optional sampled-ids fields of a mined pair, validated."""
    finish = []
    for name in ("chosen_finish", "rejected_finish"):
        v = row.get(name, "stop")
        if v not in ("stop", "length"):
            raise DataError(f"field '{name}' must be 'stop' or 'length', got {v!r}")
        finish.append(v)
    lists = {}
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        v = row.get(name)
        if v is not None and not (isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)):
            raise DataError(f"field '{name}' must be a list of token ids (non-negative integers)")
        lists[name] = v
    given = [n for n, v in lists.items() if v is not None]
    if not given:
        return None, (finish[0], finish[1])
    missing = [n for n in ("chosen_ids", "rejected_ids") if lists[n] is None]
    if missing:
        raise DataError(f"missing field {missing[0]!r} (token ids come as 'chosen_ids' and "
                        f"'rejected_ids' together)")
    h = row.get("tokenizer_hash")
    if not isinstance(h, str) or not h:
        raise DataError("missing field 'tokenizer_hash' (the tokenizer the token ids belong to)")
    if not lists["chosen_ids"] or not lists["rejected_ids"] or lists["prompt_ids"] == []:
        raise DataError(f"field {[n for n in given if not lists[n]][0]!r} is empty")
    return (SampledIds(h, lists["chosen_ids"], lists["rejected_ids"], lists["prompt_ids"]),
            (finish[0], finish[1]))


def parse_sft(row: object, fmt: str, source: str) -> SFTExample:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "prompt":
        turns = _prompt_field(row)
        answer = "completion" if "completion" in row and "response" not in row else "response"
        response = _answer_field(row, answer)
        used = {"prompt", answer}
    else:
        turns = _turns_field(row, fmt)
        if "response" in row:
            response = _string_field(row, "response")
        elif turns[-1][0] == "assistant":
            turns, response = turns[:-1], turns[-1][1]
        else:
            raise DataError(f"{fmt} must end with the assistant's answer (or give 'response')")
        used = {fmt, "response"}
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
    kinds = PREFERENCE_FORMATS if kind == "preference" else SFT_FORMATS
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
