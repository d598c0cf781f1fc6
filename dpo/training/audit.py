"""Know your preference data before training on it: ``audit_preferences`` (``fastdpo audit``).

The files are streamed through the reader ``fastdpo train`` uses (``data.iter_rows``: every format,
the same ``file:line`` errors), and the audit reports what makes pairs teach the wrong lesson:

- **length bias**: the share of pairs whose chosen answer is longer, and the mean and median
  chosen/rejected length ratio (a judge that likes long answers leaves this signature);
- **formatting-only** pairs: chosen and rejected equal once lower-cased and stripped of whitespace,
  ASCII punctuation and markdown markers (``normalize``);
- **near-identical** pairs (``near_identical``, not counting formatting-only ones);
- **duplicate prompts**, **duplicate pairs** (a later copy of the same prompt, chosen and rejected)
  and **contradictions** (rows whose prompt appears elsewhere with chosen and rejected swapped);
- token lengths per field (with a tokenizer; characters without) and, with a tokenizer, how many
  rows the configured length limits would drop or truncate (the rule of ``batches.tokenize_pairs``);
- with a judge, label consistency on a sample: the position-swapped judge's agreement with the
  stored labels.

Memory does not grow with the text: per good row the audit keeps two 64-bit hashes (prompt; answer
pair regardless of order) and one flag byte, 17 bytes however long the row is (duplicates and
contradictions are found by sorting them in place at the end); lengths are counted per integer length, so
their memory follows the longest answer, not the number of rows. Python's 64-bit string hashes
make a false duplicate among a million rows a 1-in-10^7 event.

Near-identical needs a similarity that costs microseconds: the audit budget is ~20 us per row and
difflib alone takes 50-100 us on a 60-character pair. ``near_identical`` is therefore two linear
tests on C string operations: (1) the common prefix and suffix (found by binary search on slice
comparisons) cover at least ``threshold`` of the longer answer, i.e. all edits sit in one region
covering at most ``1 - threshold`` of it (this bounds 1 - edit distance / length from below); or
(2) the word sets overlap with Jaccard >= ``threshold`` (edits scattered over a long answer). Both
first require the shorter answer to be at least ``threshold`` of the longer one, which rejects
most pairs at the cost of two ``len`` calls.
"""
from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fastdpo.files import atomic_write, write_json
from fastdpo.training.data import DataStats, PreferenceExample, iter_rows

NEAR_IDENTICAL = 0.9
DROP_CLASSES = ("formatting_only", "near_identical", "duplicates", "contradictions")
CHUNK = 1024                                    # rows per batched tokenizer call
_FORMATTING_ONLY, _NEAR_IDENTICAL, _CHOSEN_FIRST = 1, 2, 4      # bits of a row's flag byte
_NOT_TEXT = bytes(b for b in range(128) if not chr(b).isalnum())  # ASCII whitespace, punctuation, markdown


def normalize(text: str) -> bytes:
    """Lower case without whitespace (any), ASCII punctuation or markdown markers (``*_#`>-|``)."""
    if not text.isascii():   # Unicode spaces too (ASCII ones go with the punctuation below)
        text = "".join(text.split())
    return text.lower().encode("utf-8").translate(None, _NOT_TEXT)


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:                               # slice comparisons run in C
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def near_identical(a: str, b: str, threshold: float = NEAR_IDENTICAL) -> bool:
    """Whether two answers differ in one small region or by a few scattered words (module docstring)."""
    la, lb = len(a), len(b)
    longer, shorter = max(la, lb), min(la, lb)
    if shorter < threshold * longer:
        return False
    p = _common_prefix(a, b)
    s = _common_suffix(a, b, shorter - p)
    if p + s >= threshold * longer:
        return True
    wa, wb = set(a.split()), set(b.split())
    return len(wa & wb) >= threshold * len(wa | wb) > 0


def judge_instruction(turns: Sequence[tuple[str, str]]) -> str:
    """The prompt as a judge reads it: the text of a single user turn, else a transcript."""
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"{role.capitalize()}: {text}" for role, text in turns)


# --------------------------------------------------------------------------- the streaming pass

FIELDS = ("prompt", "chosen", "rejected")


class _Rows:
    """What the audit keeps per good row: two hashes and a flag byte (no text, no lengths)."""

    def __init__(self):
        self.prompt_hash, self.pair_key = array("q"), array("q")
        self.flags = bytearray()

    def __len__(self) -> int:
        return len(self.flags)


class _Lengths:
    """Length statistics in memory bounded by the longest length, not by the rows: exact counts
    per integer length and field, running sums, and log2(chosen/rejected) in bins 1/256 wide
    (the median ratio to within 0.3%)."""
    RES, SPAN = 256, 32

    def __init__(self, limits: tuple[int, int, int | None, int | None] | None):
        self.counts = {name: np.zeros(0, np.int64) for name in FIELDS}
        self.log_ratio = np.zeros(2 * self.SPAN * self.RES + 1, np.int64)
        self.n = self.chosen_longer = self.rejected_longer = self.dropped = self.truncated = 0
        self.ratio_sum = 0.0
        self.limits = limits

    def add(self, p: np.ndarray, c: np.ndarray, r: np.ndarray) -> None:
        for name, x in zip(FIELDS, (p, c, r)):
            seen = np.bincount(x)
            total = self.counts[name]
            if len(seen) > len(total):
                total = self.counts[name] = np.pad(total, (0, len(seen) - len(total)))
            total[:len(seen)] += seen
        ratio = c / np.maximum(r, 1)
        self.n += len(c)
        self.ratio_sum += float(ratio.sum())
        self.chosen_longer += int((c > r).sum())
        self.rejected_longer += int((c < r).sum())
        bins = np.rint(np.log2(np.maximum(ratio, 1e-9)) * self.RES) + self.SPAN * self.RES
        self.log_ratio += np.bincount(np.clip(bins, 0, len(self.log_ratio) - 1).astype(np.int64),
                                      minlength=len(self.log_ratio))
        if self.limits is not None:   # batches.answer_room's rule: drop long prompts, cut answers
            max_length, max_prompt_length, block_size, max_completion_length = self.limits
            room = np.minimum(min(max_length, block_size or max_length) - p, max_completion_length or 2**31)
            dropped = (p > max_prompt_length) | (room < 1)
            self.dropped += int(dropped.sum())
            self.truncated += int((~dropped & ((c > room) | (r > room))).sum())

    def median_ratio(self) -> float | None:
        if not self.n:
            return None
        k = int(np.searchsorted(np.cumsum(self.log_ratio), self.n / 2))
        return float(2 ** ((k - self.SPAN * self.RES) / self.RES))


def _add_chunk(rows: _Rows, lengths: _Lengths, chunk: list[PreferenceExample], tok, threshold: float) -> None:
    if not chunk:
        return
    if tok is not None:
        p = tok.conversation_lengths([ex.turns for ex in chunk])
        answers = tok.answer_lengths([ex.chosen for ex in chunk] + [ex.rejected for ex in chunk])
        c, r = answers[:len(chunk)], answers[len(chunk):]
    else:
        p = [sum(len(text) for _, text in ex.turns) for ex in chunk]
        c, r = [len(ex.chosen) for ex in chunk], [len(ex.rejected) for ex in chunk]
    lengths.add(*(np.asarray(x, dtype=np.int64) for x in (p, c, r)))
    for ex in chunk:
        prompt = tuple(ex.turns)
        chosen, rejected = ex.chosen.strip(), ex.rejected.strip()
        chosen_first = chosen < rejected
        flags = _CHOSEN_FIRST if chosen_first else 0
        if normalize(chosen) == normalize(rejected):
            flags |= _FORMATTING_ONLY
        elif near_identical(chosen, rejected, threshold):
            flags |= _NEAR_IDENTICAL
        rows.flags.append(flags)
        ph = hash(prompt)
        rows.prompt_hash.append(ph)
        rows.pair_key.append(hash((ph, chosen, rejected) if chosen_first else (ph, rejected, chosen)))


def _pair_classes(rows: _Rows, masks: bool) -> dict:
    """Duplicate pairs (later copies), contradicting rows and distinct prompts, found by sorting the
    hashes in place (nothing needs them afterwards); with ``masks`` also which rows, for
    ``--write-clean`` (an argsort: 16 more bytes per row)."""
    n = len(rows)
    out = {"duplicate_pairs": 0, "contradictions": 0, "distinct_prompts": 0,
           "duplicate": np.zeros(n, bool), "contradiction": np.zeros(n, bool)}
    if n == 0:
        return out
    # A row's pair identity: the unordered pair's hash with its lowest bit given to the orientation
    # (63-bit identities). Sorted, a duplicate repeats its neighbour, and a contradicted pair is a
    # run of 2u followed by a run of 2u + 1.
    d = np.frombuffer(rows.pair_key, dtype=np.int64)
    d &= ~1
    d |= (np.frombuffer(rows.flags, dtype=np.uint8) & _CHOSEN_FIRST) > 0
    order = np.argsort(d, kind="stable") if masks else None   # stable: first occurrences first
    if masks:
        d = d[order]
    else:
        d.sort()
    same = d[1:] == d[:-1]
    bit = (d & 1).astype(bool)
    d >>= 1                                                   # unordered identities, still sorted
    flips = np.flatnonzero((d[1:] == d[:-1]) & (bit[1:] != bit[:-1]))
    lo, hi = np.searchsorted(d, d[flips], "left"), np.searchsorted(d, d[flips], "right")
    out["duplicate_pairs"], out["contradictions"] = int(same.sum()), int((hi - lo).sum())
    if masks:
        out["duplicate"][order[1:][same]] = True
        for a, b in zip(lo, hi):
            out["contradiction"][order[a:b]] = True
    ph = np.frombuffer(rows.prompt_hash, dtype=np.int64)
    ph.sort()
    out["distinct_prompts"] = int((ph[1:] != ph[:-1]).sum()) + 1
    return out


# --------------------------------------------------------------------------- summaries


def _length_summary(counts: np.ndarray) -> dict | None:
    n = int(counts.sum())
    if not n:
        return None
    cum, seen = np.cumsum(counts), np.flatnonzero(counts)
    p50, p90, p99 = (int(np.searchsorted(cum, q * n)) for q in (0.5, 0.9, 0.99))   # nearest rank
    return {"mean": float((np.arange(len(counts)) * counts).sum() / n), "p50": p50, "p90": p90, "p99": p99,
            "max": int(seen[-1]), "min": int(seen[0])}


def _histograms(lengths: _Lengths) -> dict:
    top = max(2, *(len(x) for x in lengths.counts.values()))
    edges = np.unique(np.round(np.geomspace(1, top, 41)))
    out = {"length_edges": edges.tolist()}
    for name, counts in lengths.counts.items():
        out[name] = np.histogram(np.arange(len(counts)), edges, weights=counts)[0].astype(int).tolist()
    centers = (np.arange(len(lengths.log_ratio)) - lengths.SPAN * lengths.RES) / lengths.RES
    seen = np.flatnonzero(lengths.log_ratio)
    lim = max(1.0, float(np.ceil(np.abs(centers[seen]).max()))) if len(seen) else 1.0
    r_edges = np.linspace(-lim, lim, 41)
    out["log2_ratio_edges"] = r_edges.tolist()
    out["log2_ratio"] = np.histogram(centers, r_edges, weights=lengths.log_ratio)[0].astype(int).tolist()
    return out


def _label_consistency(judge, sample: list[tuple[str, str, str]]) -> dict:
    """Each sampled pair judged in both orders; the stored label is confirmed when the judge picks
    the chosen answer in both, contradicted when it picks the rejected one in both."""
    first = judge.compare_many(sample)
    second = judge.compare_many([(p, r, c) for p, c, r in sample])
    agree = sum(v1 == "A" and v2 == "B" for v1, v2 in zip(first, second))
    disagree = sum(v1 == "B" and v2 == "A" for v1, v2 in zip(first, second))
    n = len(sample)
    out = {"judge": getattr(judge, "name", type(judge).__name__), "sampled": n, "agree": agree,
           "disagree": disagree, "undecided": n - agree - disagree,
           "agreement": agree / n if n else None, "disagreement": disagree / n if n else None}
    if hasattr(judge, "stats"):
        out["judge_stats"] = judge.stats.as_dict()
    return out


# --------------------------------------------------------------------------- the audit


def audit_preferences(paths: Sequence[str | Path] = (), *, fmt: str = "auto", tokenizer=None,
                      ckpt: str | Path | None = None, config: str | Path | None = None,
                      max_length: int | None = None, max_prompt_length: int | None = None,
                      block_size: int | None = None, max_completion_length: int | None = None,
                      near_identical_threshold: float = NEAR_IDENTICAL, judge=None, judge_sample: int = 200,
                      seed: int = 0, json_path: str | Path | None = None, png_path: str | Path | None = None,
                      write_clean: str | Path | None = None, drop: Sequence[str] = DROP_CLASSES,
                      progress: bool = False) -> dict:
    """Audit preference files; returns (and optionally writes) the report dict.

    ``tokenizer`` (a ``Tokenizer`` or a path) or ``ckpt`` (its tokenizer and block size) switch
    lengths from characters to tokens and enable the length-limit counts. ``config`` (a ``fastdpo
    train`` YAML) supplies the data files, format, tokenizer and limits it configures; explicit
    arguments win. ``judge`` (anything with ``compare_many``) measures label consistency on
    ``judge_sample`` rows drawn uniformly (reservoir sampling, ``seed``). ``write_clean`` writes the
    good rows minus the ``drop`` classes as JSONL (bad rows are always left out)."""
    from tqdm import tqdm

    paths, fmt, tok, max_length, max_prompt_length, block_size, max_completion_length = _resolve_inputs(
        paths, fmt, tokenizer, ckpt, config, max_length, max_prompt_length, block_size, max_completion_length)
    unknown = sorted(set(drop) - set(DROP_CLASSES))
    if unknown:
        raise ValueError(f"--drop: unknown class {unknown[0]!r}; choose from {', '.join(DROP_CLASSES)}")
    if not 0 < near_identical_threshold <= 1:
        raise ValueError(f"near-identical threshold must be in (0, 1], got {near_identical_threshold}")

    stats, rows, rng = DataStats(), _Rows(), random.Random(seed)
    limits = max_length, max_prompt_length, block_size, max_completion_length
    lengths = _Lengths(limits if tok is not None else None)
    sample: list[tuple[str, str, str]] = []
    files, formats = [], {}
    bar = tqdm(desc="audit", unit=" rows", disable=not progress, unit_scale=True)
    for path in paths:
        start_rows, start_bad, start_good = stats.rows, stats.skipped, len(rows)
        chunk: list[PreferenceExample] = []
        for ex, _ in iter_rows([path], fmt, "skip", "preference", stats):
            if judge is not None:   # reservoir sampling: every row equally likely, memory bounded
                i = len(rows) + len(chunk)
                j = i if i < judge_sample else rng.randrange(i + 1)
                if j < judge_sample:
                    item = (judge_instruction(ex.turns), ex.chosen, ex.rejected)
                    if j == len(sample):
                        sample.append(item)
                    else:
                        sample[j] = item
            chunk.append(ex)
            if len(chunk) == CHUNK:
                _add_chunk(rows, lengths, chunk, tok, near_identical_threshold)
                bar.update(len(chunk))
                chunk = []
        _add_chunk(rows, lengths, chunk, tok, near_identical_threshold)
        bar.update(len(chunk))
        fmt_name = stats.formats.get(str(path))
        good = len(rows) - start_good
        formats[fmt_name] = formats.get(fmt_name, 0) + good
        files.append({"path": str(path), "format": fmt_name, "rows": stats.rows - start_rows,
                      "bad_rows": stats.skipped - start_bad})
    bar.close()

    n = len(rows)
    flags = np.frombuffer(rows.flags, dtype=np.uint8)
    formatting_only, near = (flags & _FORMATTING_ONLY) > 0, (flags & _NEAR_IDENTICAL) > 0
    pairs = _pair_classes(rows, masks=write_clean is not None)
    report = {
        "files": files, "rows": stats.rows, "good_rows": n, "bad_rows": stats.skipped,
        "bad_row_errors": stats.errors, "formats": {str(k): v for k, v in formats.items()},
        "length_unit": "tokens" if tok is not None else "chars",
        "lengths": {name: _length_summary(counts) for name, counts in lengths.counts.items()},
        "limits": None if tok is None else {
            **dict(zip(("max_length", "max_prompt_length", "block_size", "max_completion_length"), limits)),
            "dropped_long_prompt": lengths.dropped, "truncated": lengths.truncated},
        "length_bias": {"chosen_longer_fraction": lengths.chosen_longer / n if n else None,
                        "rejected_longer_fraction": lengths.rejected_longer / n if n else None,
                        "mean_ratio": lengths.ratio_sum / n if n else None,
                        "median_ratio": lengths.median_ratio()},
        "formatting_only": int(formatting_only.sum()),
        "near_identical": int(near.sum()), "near_identical_threshold": near_identical_threshold,
        "distinct_prompts": pairs["distinct_prompts"], "duplicate_prompts": n - pairs["distinct_prompts"],
        "duplicate_pairs": pairs["duplicate_pairs"], "contradictions": pairs["contradictions"],
        "histograms": _histograms(lengths),
        "label_consistency": _label_consistency(judge, sample) if judge is not None else None,
    }
    if write_clean is not None:
        classes = {"formatting_only": formatting_only, "near_identical": near,
                   "duplicates": pairs["duplicate"], "contradictions": pairs["contradiction"]}
        report["clean"] = _write_clean(write_clean, paths, fmt, {k: classes[k] for k in drop}, n,
                                       report["bad_rows"])
    if json_path is not None:
        write_json(json_path, report)
    if png_path is not None:
        from fastdpo.training.audit_report import plot_audit
        plot_audit(report, png_path)
    return report


def _resolve_inputs(paths, fmt, tokenizer, ckpt, config, max_length, max_prompt, block_size, max_answer):
    """Files, format, tokenizer and limits from the arguments, then the config, then defaults."""
    from fastdpo.training.config import DPOConfig, load_config

    dpo = DPOConfig()
    if config is not None:
        cfg = load_config(config, kind="dpo")
        dpo = cfg["dpo"]
        paths = list(paths) or cfg["data"].paths
        fmt = cfg["data"].format if fmt == "auto" else fmt
        tokenizer = tokenizer or cfg["tokenizer"]
        ckpt = ckpt or cfg["sft_checkpoint"]
    if not paths:
        raise ValueError("no data files given (name them, or --config with data.path)")
    if ckpt is not None:
        block_size = block_size or _block_size(Path(ckpt))
        if tokenizer is None:
            from fastdpo.models.checkpoint import load_tokenizer
            tokenizer = load_tokenizer(Path(ckpt))
    if isinstance(tokenizer, (str, Path)):
        from fastdpo.models.tokenizer import open_tokenizer
        tokenizer = open_tokenizer(tokenizer)
    return ([Path(x) for x in paths], fmt, tokenizer, max_length or dpo.max_length, max_prompt
            or dpo.max_prompt_length, block_size, max_answer or dpo.max_completion_length)


def _block_size(ckpt: Path) -> int:
    """The context of a fastdpo checkpoint or a Hugging Face model directory (no weights read)."""
    from fastdpo.models.hf_import import read_hf_config
    hf = read_hf_config(ckpt)
    if hf is not None:
        from fastdpo.models.hf_config import config_from_hf
        return int(config_from_hf(hf, ckpt)[1].block_size)
    from fastdpo.models.checkpoint import read_config
    return int(read_config(ckpt)["model"]["block_size"])


def _write_clean(out: str | Path, paths, fmt: str, drop: dict[str, np.ndarray], n: int, bad: int) -> dict:
    """Second pass: the good rows, in order, as read, minus the dropped classes."""
    import json

    dropped = np.zeros(n, bool)
    for mask in drop.values():
        dropped |= mask
    kept = 0

    def write(tmp: Path) -> None:
        nonlocal kept
        with open(tmp, "w", encoding="utf-8") as f:
            for i, (_, record) in enumerate(iter_rows(paths, fmt, "skip", "preference", DataStats())):
                if not dropped[i]:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    kept += 1

    atomic_write(out, write)
    return {"path": str(out), "kept": kept, "dropped": int(dropped.sum()) + bad,
            "dropped_by_class": {"bad_rows": bad, **{k: int(m.sum()) for k, m in drop.items()}}}
