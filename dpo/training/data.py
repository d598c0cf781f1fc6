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
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastdpo.training.records import DataError, read_records

__all__ = ["DataError", "DataStats", "PreferenceExample", "SFTExample", "iter_rows", "load_examples",
           "read_records"]

PREFERENCE_FORMATS = ("prompt", "implicit", "conversations", "hh")
SFT_FORMATS = ("prompt", "messages", "conversations")


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
