"""Where training metrics go: ``metrics.jsonl`` in the run directory, Weights & Biases, the console.

``metrics.jsonl`` holds one JSON object per log event (``{"step", "split", ...metrics}``). On
``--resume`` the lines past the resumed step are dropped first, so the file always describes the
weights that exist rather than a run that was thrown away.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm


def wandb_mode(mode: str) -> str:
    """``auto``: online when an API key is configured, offline otherwise (never a login prompt)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """``(line, row)`` per log event. A torn last line (no newline: the process died while writing
    it) is dropped; a bad line anywhere else is an error naming the file and line."""
    text = path.read_text()
    lines = text.split("\n")
    torn = lines.pop() if lines else ""   # what follows the last newline: "" unless torn
    rows = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON metrics row ({e.msg}); fix or remove that line") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((ln, row))
    if torn.strip():
        try:
            row = json.loads(torn)
        except json.JSONDecodeError:
            return rows   # the line being written when the process died
        if isinstance(row, dict):
            rows.append((torn, row))
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a torn last line, from a killed process, is left out)."""
    return [row for _, row in _read_rows(Path(path))]


class RunLogger:
    def __init__(self, run_dir: Path, *, mode: str = "auto", project: str = "fastdpo", name: str = "run",
                 config: dict | None = None, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [ln for ln, row in _read_rows(self.path) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            self.path.write_text("")
        self._file = open(self.path, "a")
        self._wandb = None
        mode = wandb_mode(mode)
        if mode != "disabled":
            import wandb  # slow import: only when used
            self._wandb = wandb.init(mode=mode, project=project, name=name, config=config or {},
                                     dir=str(run_dir), reinit="finish_previous")

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        row = {"step": step, "split": split, **metrics}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            prefix = "" if split == "train" else f"{split}/"
            self._wandb.log({prefix + k: v for k, v in metrics.items()}, step=step)

    @staticmethod
    def console(line: str) -> None:
        tqdm.write(line)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
