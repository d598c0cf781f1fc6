"""The resumable state of a mining run: ``<out>.progress.jsonl`` next to the pairs file (a header
fingerprinting the run, then one record per finished batch: the pairs file's length and the running
statistics), the shards a multi-process run writes, merged back into one file, and the run's
``<out>.report.json``.

A run is resumed by cutting the pairs file back to the length in the last whole record (a torn
line or a batch whose record never made it is dropped and redone identically, since each batch's
sampling seed depends only on the run's seed and the batch index).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fastdpo.files import append_durable, atomic_write, write_json

PROGRESS_SUFFIX = ".progress.jsonl"
REPORT_SUFFIX = ".report.json"
# 2: pairs carry their sampled token ids; truncated and malformed samples are counted
PROGRESS_VERSION = 2
# running statistics carried from record to record (with the score histogram)
COUNTS = ("prompts_done", "samples_judged", "invalid_scores", "samples_truncated", "samples_malformed",
          "pairs_kept", "rejected_truncated", "samples_unverified")


class ProgressLog:
    """``<out>.progress.jsonl``: a header with the run's fingerprint, then one record per batch."""

    def __init__(self, out_path: Path, fingerprint: str, settings: dict):
        self.out_path, self.fingerprint, self.settings = out_path, fingerprint, settings
        self.path = out_path.with_name(out_path.name + PROGRESS_SUFFIX)
        self._f = None
        self._base: tuple[int, dict | None] = (0, None)   # (pairs bytes, stats) resumed from
        self._trail: list[tuple[int, int, dict]] = []      # this process's records: (offset, bytes, stats)

    def resume(self) -> tuple[int, dict | None]:
        """(first batch to do, statistics saved with the last committed batch)."""
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            if self.out_path.exists() and self.out_path.stat().st_size > 0:
                raise ValueError(f"{self.out_path}: exists without its progress file {self.path.name}; "
                                 "refusing to append to pairs from an unknown run "
                                 "(move it or pick another --out)")
            self._open_fresh()
            return 0, None
        good, records = self._read_records()
        header = records[0] if records else None
        _check_version(self.path, header)
        if not header or header.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.path}: written by a different run (prompts, model, judge or settings differ: "
                f"{header.get('settings') if header else 'no header'} vs {self.settings}); "
                "use another --out or delete both files to start over")
        last = records[-1] if len(records) > 1 else None
        out_bytes = last["out_bytes"] if last else 0
        size = self.out_path.stat().st_size if self.out_path.exists() else 0
        if size < out_bytes:
            raise ValueError(f"{self.out_path}: shorter ({size} bytes) than its progress file records "
                             f"({out_bytes} bytes); the pairs file was modified, cannot resume")
        # Drop what the killed run wrote after its last committed batch (a partial line, or a
        # whole batch whose record was never written: it is redone identically).
        with open(self.out_path, "ab") as f:
            f.truncate(out_bytes)
            os.fsync(f.fileno())
        with open(self.path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
        self._f = open(self.path, "ab")
        self._base = (out_bytes, last["stats"] if last else None)
        return (last["batch"] + 1 if last else 0), last["stats"] if last else None

    def _open_fresh(self) -> None:
        self.out_path.touch()
        self._f = open(self.path, "wb")
        self._append({"fastdpo_pairs_progress": PROGRESS_VERSION, "fingerprint": self.fingerprint,
                      "settings": self.settings})

    def _read_records(self) -> tuple[int, list[dict]]:
        """Complete records and the byte length they span (a torn last line is ignored)."""
        data = self.path.read_bytes()
        records, good = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
        return good, records

    def commit(self, batch: int, out_bytes: int, stats) -> None:
        """Record that ``batch`` is done: the pairs file is ``out_bytes`` long, ``stats`` (a
        ``MiningStats``) the running totals."""
        keys = (*COUNTS, "score_hist")
        rec = {"batch": batch, "out_bytes": out_bytes, "stats": {k: getattr(stats, k) for k in keys}}
        offset = self._f.tell()
        self._append(rec)
        self._trail.append((offset, out_bytes, json.loads(json.dumps(rec["stats"]))))

    def take_back(self, k: int, stats) -> None:
        """Undo the last ``k`` batches this process committed: both files are cut back to the
        record before them, so a resumed run does those batches again, and ``stats`` (a
        ``MiningStats``) goes back to that record's running totals."""
        offset = self._trail[-k][0]
        del self._trail[-k:]
        out_bytes, saved = self._trail[-1][1:] if self._trail else self._base
        for path, size in ((self.path, offset), (self.out_path, out_bytes)):
            with open(path, "r+b") as f:
                f.truncate(size)
                os.fsync(f.fileno())
        for key in COUNTS:
            setattr(stats, key, saved[key] if saved else 0)
        stats.score_hist = dict(saved["score_hist"]) if saved else {}

    def _append(self, rec: dict) -> None:
        append_durable(self._f, (json.dumps(rec, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def write_report(out_path: Path, stats: dict, judge, stopped: str | None = None) -> None:
    """``<out>.report.json``: the run's statistics and its judge's (failures by kind, the servers'
    reasons, unusable replies), and the line it stopped with when its judge stopped it."""
    write_json(out_path.with_name(out_path.name + REPORT_SUFFIX),
               {"pairs": str(out_path), "stats": stats, "judge": judge.describe(),
                "judge_stats": judge.stats.as_dict(), "stopped": stopped})


def _check_version(path: Path, header: dict | None) -> None:
    version = (header or {}).get("fastdpo_pairs_progress", PROGRESS_VERSION)
    if version != PROGRESS_VERSION:
        raise ValueError(f"{path}: written by another fastdpo version (progress format {version}, this "
                         f"one writes {PROGRESS_VERSION}: pairs with their sampled token ids); finish "
                         "it with that version, or use another --out")


def shard_path(out_path: str | Path, rank: int, world: int) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.name}.shard-{rank}-of-{world}")


def merge_shards(out_path: str | Path, world: int) -> dict:
    """Interleave the ``world`` finished shards of a sharded run back into batch order: writes
    ``out_path`` and its progress file exactly as the unsharded run would have (so the merged
    file also resumes, and reruns, as an unsharded run). Returns the final cumulative statistics.
    The shards stay: they are what a rerun of the sharded command resumes from."""
    out_path = Path(out_path)
    parts, base = [], None
    for r in range(world):
        path = shard_path(out_path, r, world)
        log = ProgressLog(path, "", {})
        if not log.path.is_file():
            raise ValueError(f"{log.path}: missing; shard {r} of {world} never started")
        _, records = log._read_records()
        _check_version(log.path, records[0] if records else None)
        fp, _, tag = records[0].get("fingerprint", "").partition(":") if records else ("", "", "")
        if tag != f"shard{r}of{world}" or (base is not None and fp != base[0]):
            raise ValueError(f"{log.path}: not shard {r} of {world} of the same run ({records[:1]})")
        base = base or (fp, {k: v for k, v in records[0]["settings"].items() if k != "shard"})
        data, end, prev = path.read_bytes(), 0, {k: 0 for k in COUNTS} | {"score_hist": {}}
        for rec in records[1:]:
            delta = {k: rec["stats"].get(k, 0) - prev.get(k, 0) for k in COUNTS}
            hist = rec["stats"]["score_hist"]
            delta["score_hist"] = {s: n - prev["score_hist"].get(s, 0) for s, n in hist.items()}
            parts.append((rec["batch"], data[end:rec["out_bytes"]], delta))
            end, prev = rec["out_bytes"], rec["stats"]
    parts.sort(key=lambda p: p[0])
    if [p[0] for p in parts] != list(range(len(parts))):
        raise ValueError(f"{out_path}: the shards are incomplete (batches {[p[0] for p in parts]}); "
                         "rerun the sharded command to finish them")
    log = ProgressLog(out_path, base[0], base[1])
    if log.path.is_file():
        _, records = log._read_records()
        if not records or records[0].get("fingerprint") != base[0]:
            raise ValueError(f"{log.path}: written by a different run; use another --out")
    elif out_path.exists() and out_path.stat().st_size > 0:
        raise ValueError(f"{out_path}: exists without its progress file {log.path.name}; refusing to "
                         "overwrite pairs from an unknown run (move it or pick another --out)")
    header = {"fastdpo_pairs_progress": PROGRESS_VERSION, "fingerprint": base[0], "settings": base[1]}
    lines, out = [json.dumps(header, sort_keys=True)], b""
    total = {k: 0 for k in COUNTS} | {"score_hist": {}}
    for b, data, delta in parts:
        out += data
        for k in COUNTS:
            total[k] += delta[k]
        for sc, n in delta["score_hist"].items():
            total["score_hist"][sc] = total["score_hist"].get(sc, 0) + n
        total["score_hist"] = {sc: n for sc, n in total["score_hist"].items() if n}
        lines.append(json.dumps({"batch": b, "out_bytes": len(out), "stats": total}, sort_keys=True))
    atomic_write(out_path, out)
    atomic_write(log.path, "".join(ln + "\n" for ln in lines))
    return total
