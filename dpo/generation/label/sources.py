"""What is labelled: items (a conversation and two answers) from a candidates file, or from prompts
answered on the fly by two checkpoints.

- A candidates file is any preference file ``fastdpo train`` reads (mined pairs included: review and
  correct them), or rows holding K samples per prompt (``"responses"`` or ``"samples"``: a list of
  strings, next to ``"prompt"`` or ``"conversations"``), of which two distinct ones are compared.
- A prompts file (``{"prompt": ...}`` per line) or a ``fastdpo serve --log-interactions`` file
  (its distinct chat conversations, N sampled) is answered by ``--model-a`` and ``--model-b`` (or
  twice by one model, with two seeds), with the KV sampler.

An item's id is a hash of what it shows and where its answers come from, so a restart finds the
same ids and resumes. Which answer is shown on the left is drawn per item from the seed: sides are
random, recorded with each label, and stable across restarts.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from fastdpo.training.data import DataError, detect_format, parse_preference, read_records


@dataclass
class Item:
    id: str
    turns: list[tuple[str, str]]
    origins: tuple[str, str]                     # where each answer comes from ("model-a", "chosen", ...)
    source: str                                  # "file:line", "free-form", ...
    answers: tuple[str, str] | None = None       # None until generated
    truncated: tuple[bool, bool] = (False, False)
    flip: bool = False                           # show answers[1] on the left
    extra: dict = field(default_factory=dict)    # the candidate row's other fields (scores, ...)

    def shown(self) -> tuple[int, int]:
        """Indices into ``answers`` of the left (A) and right (B) panes."""
        return (1, 0) if self.flip else (0, 1)


def item_id(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


def flip_for(seed: int, iid: str) -> bool:
    return random.Random(f"{seed}:{iid}").random() < 0.5


def _dedupe(items: list[Item]) -> list[Item]:
    seen: dict[str, Item] = {}
    for it in items:
        seen.setdefault(it.id, it)
    return list(seen.values())


# -- a file of candidates ------------------------------------------------------------------------
def _samples_row(row: dict, source: str, seed: int, line: int) -> Item:
    samples = row.get("responses", row.get("samples"))
    if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
        raise DataError("field 'responses' must be a list of strings")
    distinct = sorted({s for s in samples if s.strip()}, key=samples.index)
    if len(distinct) < 2:
        raise DataError("needs at least two different non-empty responses to compare")
    if "conversations" in row:
        pair = {**row, "chosen": distinct[0], "rejected": distinct[1]}
        turns = parse_preference(pair, "conversations", source).turns
    elif isinstance(row.get("prompt"), str):
        turns = [("user", row["prompt"])]
    else:
        raise DataError("field 'prompt' (a string) or 'conversations' is needed")
    i, j = sorted(random.Random(f"{seed}:{line}").sample(range(len(distinct)), 2))
    a, b = distinct[i], distinct[j]
    origins = (f"sample {samples.index(a)}", f"sample {samples.index(b)}")
    return Item(item_id(turns, sorted([a, b])), turns, origins, source, (a, b))


def candidate_items(path: str | Path, n: int | None = None, seed: int = 0) -> list[Item]:
    """Items from a candidates file (see the module docstring); the first ``n`` distinct ones."""
    path = Path(path)
    items: list[Item] = []
    for line, row, err in read_records(path):
        source = f"{path}:{line}"
        try:
            if err:
                raise DataError(err)
            if isinstance(row, dict) and ("responses" in row or "samples" in row):
                items.append(_samples_row(row, source, seed, line))
            else:
                fmt = detect_format(row, ("prompt", "conversations", "hh"))   # per row: files may mix
                if fmt is None:
                    raise DataError("cannot tell the format of this row (expected a preference row or "
                                    "'responses' with 'prompt'/'conversations')")
                ex = parse_preference(row, fmt, source)
                a, b = ex.chosen, ex.rejected
                items.append(Item(item_id(ex.turns, sorted([a, b])), ex.turns, ("chosen", "rejected"), source,
                                  (a, b), extra=ex.meta))
        except DataError as e:
            raise ValueError(f"{source}: {e}") from None
    items = _dedupe(items)[:n]
    if not items:
        raise ValueError(f"{path}: no candidates to label")
    for it in items:
        it.flip = flip_for(seed, it.id)
    return items


# -- prompts for two checkpoints -----------------------------------------------------------------
def prompt_conversations(path: str | Path, n: int | None = None, seed: int = 0) -> list[tuple[str, list]]:
    """``(source, turns)`` from a prompts file (the first ``n``) or an interaction log (``n``
    sampled with ``seed``), de-duplicated."""
    from fastdpo.generation.interactions import interaction_conversations, is_interaction_log
    from fastdpo.generation.mining import load_prompts
    path = Path(path)
    if is_interaction_log(path):
        return [(f"{path} (interaction log)", list(t)) for t in interaction_conversations(path, n, seed)]
    seen = dict.fromkeys(load_prompts(path))
    return [(f"{path}", [("user", p)]) for p in list(seen)[:n]]


def prompt_items(path: str | Path, models: dict[str, str], n: int | None = None, seed: int = 0,
                 settings: dict | None = None) -> list[Item]:
    """Items whose answers the two models will give; ``models`` maps each side's origin name
    ("model-a", "model-b") to what it is, ``settings`` the sampling settings (both part of the id)."""
    names = tuple(models)
    items = []
    for source, turns in prompt_conversations(path, n, seed):
        iid = item_id(turns, models, settings or {})
        items.append(Item(iid, turns, names, source, flip=flip_for(seed, iid)))
    items = _dedupe(items)
    if not items:
        raise ValueError(f"{path}: no prompts to label")
    return items
