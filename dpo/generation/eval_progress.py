"""The resumable state of an evaluation: ``<report>.progress.jsonl`` next to the report.

Line 1 fingerprints the run (both models, the tokenizer, the prompts, the judge and every setting
that changes answers or verdicts); line 2 holds both sides' answers once they are generated; then
one line per judged chunk (``phase``: which judging pass, ``lo``: its first item, ``results``:
verdicts or scores in order, how many were refused), appended and fsynced as each chunk comes
back; a run stopped by its judge adds a line saying why, with the judge's failure counts, reasons and
unusable replies, after a line taking back the chunks whose refusals led to the stop (``void``).

A run stopped by its judge (or killed) resumes from the last whole line: answers are not generated
again, judged items are not judged again, and the report comes out as an uninterrupted run's. A
torn last line (a kill mid-append) is dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastdpo.files import append_durable, atomic_write, open_append

PROGRESS_SUFFIX = ".progress.jsonl"
PROGRESS_VERSION = 1


def progress_path(report_path: str | Path) -> Path:
    report_path = Path(report_path)
    return report_path.with_name(report_path.name + PROGRESS_SUFFIX)


class EvalProgress:
    """Answers and verdicts of one evaluation, persisted as they come (module docstring)."""

    def __init__(self, path: Path, fingerprint: str, settings: dict, resume: bool):
        self.path, self.fingerprint = Path(path), fingerprint
        self.answers: dict | None = None
        self._judged: dict[str, list] = {}
        self.resumed = 0    # verdicts / scores read back instead of asked for
        self._added: list[tuple[str, int, int]] = []   # this process's chunks: (phase, lo, refused)
        if resume:
            self._load(settings)
        else:
            self._refuse_to_discard()
            header = {"fastdpo_eval_progress": PROGRESS_VERSION, "fingerprint": fingerprint,
                      "settings": settings}
            atomic_write(self.path, json.dumps(header, sort_keys=True, default=str) + "\n")
        self._f = open_append(self.path)   # cuts a torn last line first

    def _refuse_to_discard(self) -> None:
        """Starting over would throw away an unfinished run of this same evaluation (its report not
        written yet): say so instead, so that a rerun after a judge outage keeps what it had."""
        report = self.path.with_name(self.path.name[: -len(PROGRESS_SUFFIX)])
        if not self.path.is_file() or report.is_file():
            return
        with open(self.path, "rb") as f:
            lines = [line for line in f if line.endswith(b"\n")]
        try:
            same = json.loads(lines[0]).get("fingerprint") == self.fingerprint if lines else False
        except ValueError:
            same = False
        if same and len(lines) > 1:
            raise ValueError(f"{self.path}: an unfinished run of this evaluation is kept there; pass "
                             f"--resume to continue it, or delete the file to start over")

    def _load(self, settings: dict) -> None:
        if not self.path.is_file():
            raise ValueError(f"--resume: no evaluation to continue ({self.path} does not exist); leave out "
                             "--resume to start one")
        records = []
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    records.append(json.loads(line))
                except ValueError:
                    break
        header = records[0] if records else {}
        version = header.get("fastdpo_eval_progress")
        if version != PROGRESS_VERSION:
            raise ValueError(f"{self.path}: not an evaluation progress file of this fastdpo version "
                             f"(format {version}, expected {PROGRESS_VERSION}); leave out --resume to start "
                             "over")
        if header.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{self.path}: written by a different evaluation (models, prompts, judge or "
                             f"settings differ: {header.get('settings')} vs {settings}); leave out --resume "
                             "to start over")
        for rec in records[1:]:
            if "answers" in rec:
                self.answers = rec["answers"]
            elif "phase" in rec:
                done = self._judged.setdefault(rec["phase"], [])
                if rec["lo"] == len(done):   # chunks come in order; anything else is ignored
                    done += rec["results"]
            elif "void" in rec:              # chunks recorded before this line, taken back
                for phase, lo in rec["void"]:
                    del self._judged.get(phase, [])[lo:]
        self.resumed = sum(map(len, self._judged.values()))

    def save_answers(self, answers: dict) -> None:
        self.answers = answers
        self._append({"answers": answers})

    @property
    def phases(self) -> list[str]:
        return list(self._judged)

    def judged(self, phase: str) -> list:
        """The results of ``phase`` already judged, in order (a prefix of the phase's items)."""
        return list(self._judged.get(phase, []))

    def add(self, phase: str, lo: int, results: list, refused: int = 0) -> None:
        """Keep a chunk's results; ``refused`` of them were requests the judge refused."""
        self._judged.setdefault(phase, []).extend(results)
        self._added.append((phase, lo, refused))
        self._append({"phase": phase, "lo": lo, "results": results, "refused": refused})

    def void_refused_tail(self) -> None:
        """Take back the last chunks this process kept that hold refused requests: when the judge
        then stopped for refusing request after request, those refusals were not isolated ones,
        and a resumed run must ask for them again."""
        tail = []
        while self._added and self._added[-1][2] > 0:
            phase, lo, _ = self._added.pop()
            del self._judged[phase][lo:]
            tail.append([phase, lo])
        if tail:
            self._append({"void": tail})

    def stopped(self, message: str, judge_stats: dict) -> None:
        """Note why the run stopped and what the judge's failures were (read by people, not resume)."""
        self._append({"stopped": message, "judge_stats": judge_stats})

    def _append(self, rec: dict) -> None:
        append_durable(self._f, (json.dumps(rec, ensure_ascii=False) + "\n").encode())

    def close(self) -> None:
        self._f.close()
