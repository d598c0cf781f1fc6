"""Where training metrics go: ``metrics.jsonl`` in the run directory, the console, and the trackers
``train.report_to`` names: Weights & Biases and TensorBoard (event files in ``run_dir/tensorboard``).

``metrics.jsonl`` holds one JSON object per log event (``{"step", "split", ...metrics}``). On
``--resume`` the lines past the resumed step are dropped first, so the file always describes the
weights that exist rather than a run that was thrown away (TensorBoard hides its events past that
step the same way). Every numeric value of a row goes to each tracker under the same name, prefixed
with ``{split}/`` unless the split is ``train``; a health alarm goes to TensorBoard as text.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
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


def tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    """A TensorBoard ``SummaryWriter``; a missing package is one clear error naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("train.report_to includes 'tensorboard' but the tensorboard package is not "
                         "installed: pip install 'fastdpo[tensorboard]'") from None
    return SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=10)


def tracker_scalars(metrics: dict, split: str) -> dict[str, float]:
    """The numeric values of a row under their tracker names (``val/loss``, ``rewards/margins``)."""
    prefix = "" if split == "train" else f"{split}/"
    return {prefix + k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunLogger:
    def __init__(self, run_dir: Path, *, mode: str = "auto", project: str = "fastdpo", name: str = "run",
                 config: dict | None = None, resume_step: int | None = None,
                 report_to: Sequence[str] = ("wandb",)):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [ln for ln, row in _read_rows(self.path) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            self.path.write_text("")
        self._tensorboard = None
        if "tensorboard" in report_to:
            self._tensorboard = tensorboard_writer(Path(run_dir) / "tensorboard",
                                                   None if resume_step is None else resume_step + 1)
        self._file = open(self.path, "a")
        self._wandb = None
        mode = wandb_mode(mode)
        if mode != "disabled" and "wandb" in report_to:
            import wandb  # slow import: only when used
            self._wandb = wandb.init(mode=mode, project=project, name=name, config=config or {},
                                     dir=str(run_dir), reinit="finish_previous")

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        row = {"step": step, "split": split, **metrics}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if split == "alarm":   # a health alarm (training.health): its message, not a one-point curve
            if self._wandb is not None:
                self._wandb.log({f"alarm/{metrics['alarm']}": metrics[metrics["alarm"]]}, step=step)
            if self._tensorboard is not None:
                self._tensorboard.add_text(f"alarm/{metrics['alarm']}", metrics["message"], step)
            return
        if self._wandb is not None:
            self._wandb.log(tracker_scalars(metrics, split), step=step)
        if self._tensorboard is not None:
            for tag, value in tracker_scalars(metrics, split).items():
                self._tensorboard.add_scalar(tag, value, step)

    @staticmethod
    def console(line: str) -> None:
        tqdm.write(line)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
