"""metrics.jsonl on --resume: rows past the resumed step go, a torn last line (the process died
while writing it) goes, and a corrupt line elsewhere is an error naming the file and line."""
import json

import pytest

from fastdpo.training.metrics import RunLogger


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_resume_drops_rows_past_the_step_and_a_torn_last_line(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)]
    _write(tmp_path / "metrics.jsonl", rows, tail='{"step": 4, "split": "tr')
    logger = RunLogger(tmp_path, mode="disabled", resume_step=2)
    logger.log(3, {"loss": 0.5})
    logger.close()
    got = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == rows[:2] + [{"step": 3, "split": "train", "loss": 0.5}]


def test_corrupt_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON metrics row"):
        RunLogger(tmp_path, mode="disabled", resume_step=3)
    assert path.read_text() == '{"step": 1}\n{"step": 2\n{"step": 3}\n'   # nothing lost
