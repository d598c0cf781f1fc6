"""Preference and SFT data: read local JSONL / JSON arrays, validate rows, tokenize once, batch.

Three preference formats (detected per file from its first row, or forced with ``format``):

- ``prompt``:        ``{"prompt": str, "chosen": str, "rejected": str, ...extra fields kept as meta}``
- ``conversations``: ``{"conversations": [{"from": "user"|"assistant", "value": str}, ...],
  "chosen": str, "rejected": str}``; the history ends with a user turn and is rendered by the chat
  template, the two answers are the competing next assistant turns.
- ``hh``:            HH-RLHF transcripts, ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``; both share everything up to their last assistant turn.

All three become the same ``TokenizedPair``: prompt ids (the rendered history ending in the
assistant marker) and the two answers as ``render_answer`` ids (text + ``<|end|>``).

SFT rows are ``{"prompt", "response"}`` or ``{"conversations": [...]}`` whose last turn is the
assistant's answer (the only tokens trained on).

Every bad row is reported as ``file:line: reason``; with ``on_error="skip"`` it is skipped and
counted instead of stopping the run.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastdpo.models.tokenizer import Tokenizer


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
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def n_tokens(self) -> int:            # real (unpadded) tokens in the pair's two sequences
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def length(self) -> int:              # padded length of the pair's rows in a batch
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    @property
    def packed_length(self) -> int:       # its one row in a prompt-sharing batch
        return len(self.prompt) + len(self.chosen) + 1 + len(self.rejected)


@dataclass
class TokenizedSFT:
    prompt: list[int]
    response: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + len(self.response)

    length = n_tokens


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
    """Yield ``(line, value, error)`` for each record of a JSONL file or a JSON array file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from _read_array(path, text)
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line), None
        except json.JSONDecodeError as e:
            yield i, None, f"invalid JSON ({e.msg} at column {e.colno})"


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


def load_examples(paths: Sequence[Path], fmt: str = "auto", on_error: str = "raise", kind: str = "preference",
                  max_rows: int | None = None, stats: DataStats | None = None) -> list:
    """Parse every file into examples; bad rows raise ``DataError`` or are skipped and counted."""
    if not paths:
        raise ValueError("no data files given (set data.path)")
    stats = stats if stats is not None else DataStats()
    parse = parse_preference if kind == "preference" else parse_sft
    kinds = ("prompt", "conversations", "hh") if kind == "preference" else ("prompt", "conversations")
    out: list = []
    for path in paths:
        file_fmt = None if fmt == "auto" else fmt
        for line, row, err in read_records(Path(path)):
            if max_rows is not None and len(out) >= max_rows:
                break
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
                out.append(parse(row, file_fmt, source))
            except DataError as e:
                msg = f"{source}: {e}"
                if on_error == "raise":
                    raise DataError(msg + " (set data.on_error=skip to skip bad rows)") from None
                stats.skipped += 1
                if len(stats.errors) < 20:
                    stats.errors.append(msg)
        stats.formats[str(path)] = file_fmt
    if not out:
        raise DataError(f"no usable rows in {[str(p) for p in paths]} ({stats.summary()})")
    return out


# --------------------------------------------------------------------------- tokenization


def tokenize_pairs(examples: Sequence[PreferenceExample], tok: Tokenizer, max_length: int,
                   max_prompt_length: int, block_size: int, stats: DataStats) -> list[TokenizedPair]:
    """Render prompts with the chat template; drop over-long prompts; cut responses to fit."""
    out = []
    for ex in examples:
        prompt = tok.render_conversation(ex.turns)
        room = min(max_length, block_size - len(prompt))
        if len(prompt) > max_prompt_length or room < 1:
            stats.dropped_long_prompt += 1
            continue
        chosen, rejected = tok.render_answer(ex.chosen), tok.render_answer(ex.rejected)
        if len(chosen) > room or len(rejected) > room:
            stats.truncated += 1
        out.append(TokenizedPair(prompt, chosen[:room], rejected[:room]))
    return out


def tokenize_sft(examples: Sequence[SFTExample], tok: Tokenizer, max_length: int, max_prompt_length: int,
                 block_size: int, stats: DataStats) -> list[TokenizedSFT]:
    out = []
    for ex in examples:
        prompt = tok.render_conversation(ex.turns)
        room = min(max_length, block_size) - len(prompt)
        if len(prompt) > max_prompt_length or room < 1:
            stats.dropped_long_prompt += 1
            continue
        response = tok.render_answer(ex.response)
        if len(response) > room:
            stats.truncated += 1
        out.append(TokenizedSFT(prompt, response[:room]))
    return out


def split_val(items: list, val_size: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split: ``val_size`` < 1 is a fraction, otherwise a count."""
    if not val_size:
        return items, []
    n_val = int(val_size) if val_size >= 1 else max(1, round(len(items) * val_size))
    if n_val >= len(items):
        raise ValueError(f"val_size {val_size} leaves no training data ({len(items)} examples)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(items), generator=g).tolist()
    val_idx = set(perm[:n_val])
    return ([x for i, x in enumerate(items) if i not in val_idx],
            [x for i, x in enumerate(items) if i in val_idx])


# --------------------------------------------------------------------------- batching


def epoch_batches(lengths: Sequence[int], micro_batch_size: int, seed: int, epoch: int,
                  bucket: int = 64) -> list[list[int]]:
    """One epoch of length-bucketed micro-batches, a pure function of (seed, epoch).

    Shuffle, sort by length within windows of ``bucket`` micro-batches (so rows in a batch have
    similar lengths and little padding), then shuffle the batch order. Being a function of the
    epoch alone is what lets ``--resume`` restart mid-epoch from the step number.
    """
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    window = micro_batch_size * bucket
    batches = []
    for s in range(0, n, window):
        part = sorted(perm[s:s + window], key=lambda i: lengths[i])
        batches += [part[j:j + micro_batch_size] for j in range(0, len(part), micro_batch_size)]
    batches = [b for b in batches if len(b) == micro_batch_size]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def eval_batches(lengths: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Every example once, sorted by length (least padding); the last batch may be short."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[j:j + micro_batch_size] for j in range(0, len(order), micro_batch_size)]


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one length, in ONE (2B, T) batch so the
    policy runs a single forward per micro-batch. ``mask`` is 1 on answer tokens."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    return _collate(rows, pad_id)


@dataclass
class PackedPairs:
    ids: torch.Tensor          # (B, T) prompt | chosen | copy of the prompt's last token | rejected | pad
    pos: torch.Tensor          # (B, T) positions: the rejected branch restarts where the prompt ends
    attn_mask: torch.Tensor    # (B, 1, T, T) bool: causal, and neither answer sees the other
    chosen_mask: torch.Tensor  # (B, T) bool, 1 on chosen-answer tokens
    rejected_mask: torch.Tensor

    def to(self, device) -> PackedPairs:
        return PackedPairs(*(t.to(device) for t in (self.ids, self.pos, self.attn_mask, self.chosen_mask,
                                                     self.rejected_mask)))


def collate_packed_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> PackedPairs:
    """Each pair as ONE row whose prompt is computed once for both answers.

    Row: ``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected``. The chosen branch sees the
    shared prompt and itself; the rejected branch sees ``prompt[:-1]``, a copy of the prompt's last
    token at that token's position, and itself. Every token therefore has exactly the context and
    position it has in the separate ``prompt + answer`` row, so the log-probs are the same (up to
    float rounding) while the prompt's tokens are run once instead of twice. The copy is needed
    because the prompt's last position predicts the first token of *each* answer."""
    rows = []
    for p in pairs:
        P, C, R = len(p.prompt), len(p.chosen), len(p.rejected)
        seq = p.prompt + p.chosen + p.prompt[-1:] + p.rejected
        pos = [*range(P + C), P - 1, *range(P, P + R)]
        # segment of each token: 0 shared prompt, 1 chosen branch, 2 rejected branch
        seg = [0] * (P - 1) + [1] * (C + 1) + [2] * (R + 1)
        rows.append((seq, pos, seg, P, C, R))
    B, T = len(rows), max(len(r[0]) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), 3, dtype=torch.long)      # padding: its own segment
    chosen = torch.zeros(B, T, dtype=torch.bool)
    rejected = torch.zeros(B, T, dtype=torch.bool)
    for i, (s, ps, sg, P, C, _) in enumerate(rows):
        n = len(s)
        ids[i, :n], pos[i, :n], seg[i, :n] = torch.tensor(s), torch.tensor(ps), torch.tensor(sg)
        chosen[i, P:P + C] = True
        rejected[i, P + C + 1:n] = True
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    return PackedPairs(ids, pos, (causal & visible).unsqueeze(1), chosen, rejected)


def collate_sft(items: Sequence[TokenizedSFT], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _collate([(x.prompt, x.response) for x in items], pad_id)


def _collate(rows, pad_id):
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        mask[i, len(p):n] = True
    return ids, mask


def load_preference_data(cfg, tok: Tokenizer, max_length: int, max_prompt_length: int, block_size: int,
                         seed: int) -> tuple[list[TokenizedPair], list[TokenizedPair], DataStats]:
    """``PreferenceDatasetConfig`` -> (train pairs, val pairs, stats)."""
    stats = DataStats()
    examples = load_examples(cfg.paths, cfg.format, cfg.on_error, "preference", cfg.max_rows, stats)
    pairs = tokenize_pairs(examples, tok, max_length, max_prompt_length, block_size, stats)
    if not pairs:
        raise DataError(f"every pair was dropped ({stats.summary()}); raise max_prompt_length?")
    train, val = split_val(pairs, cfg.val_size, seed)
    return train, val, stats


def load_sft_data(cfg, tok: Tokenizer, max_length: int, max_prompt_length: int, block_size: int,
                  seed: int) -> tuple[list[TokenizedSFT], list[TokenizedSFT], DataStats]:
    stats = DataStats()
    examples = load_examples(cfg.paths, cfg.format, cfg.on_error, "sft", cfg.max_rows, stats)
    items = tokenize_sft(examples, tok, max_length, max_prompt_length, block_size, stats)
    if not items:
        raise DataError(f"every example was dropped ({stats.summary()}); raise max_prompt_length?")
    train, val = split_val(items, cfg.val_size, seed)
    return train, val, stats
