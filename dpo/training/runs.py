"""A run's directory and lifecycle, shared by SFT and DPO: where checkpoints are, which one to
resume from, refusing to overwrite an earlier run, and the open-logger / resume / train / finish
sequence of one run (ending with the run's ``curves.png``)."""
from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastdpo import runtime
from fastdpo.models.checkpoint import load_tokenizer, read_config, restore_interrupted_swap
from fastdpo.models.tokenizer import ChatTokenizer, open_tokenizer
from fastdpo.training.config import TrainingConfig
from fastdpo.training.curves import plot_curves
from fastdpo.training.health import HealthMonitor
from fastdpo.training.metrics import RunLogger

if TYPE_CHECKING:
    from fastdpo.training.loop import Trainer

STATE_FILE = "trainer_state.pt"
FINAL = "final"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_DIR = re.compile(r"^\.(.+)\.old-[0-9a-f]+$")


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    return [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest resumable checkpoint of a run: ``final`` if present, else the highest step."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():   # a save that died between its two renames: put the previous one back
        for name in {m.group(1) for p in run_dir.glob(".*.old-*") if (m := _OLD_DIR.match(p.name))}:
            restore_interrupted_swap(run_dir / name)
    candidates = [(s, p) for s, p in _step_dirs(run_dir) if (p / STATE_FILE).is_file()]
    final = run_dir / FINAL
    if (final / STATE_FILE).is_file():
        candidates.append((int(read_config(final).get("step", 0)), final))
    return max(candidates)[1] if candidates else None


def resolve_tokenizer(tokenizer, checkpoint: Path | None, train_cfg: TrainingConfig) -> ChatTokenizer:
    """The tokenizer given (loaded, or a path: a tokenizer.json or a tokenizer directory), else
    ``train.tokenizer_name``, else the checkpoint's own (a Hugging Face model directory's too)."""
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    if tokenizer is not None:
        return open_tokenizer(tokenizer)
    if train_cfg.tokenizer_name:
        return open_tokenizer(train_cfg.tokenizer_name)
    if checkpoint is None:
        raise ValueError("no tokenizer: pass one (or set train.tokenizer_name)")
    return load_tokenizer(checkpoint)


def say_on_main() -> Callable:
    """A run's messages (data summary, "resumed from", "saved" ...): ``print`` on the main rank, a
    no-op on the others. ``progress: false`` hides the progress bars, not these."""
    return print if runtime.is_main() else (lambda *a, **k: None)


def prepare_run_dir(train_cfg: TrainingConfig, resume) -> Path | None:
    """The checkpoint to resume from (or None); refuses to silently overwrite an earlier run.
    Under torchrun rank 0 decides (and cleans up) and every rank resumes from its answer."""
    return runtime.run_on_main(_prepare_run_dir, train_cfg, resume)


def _prepare_run_dir(train_cfg: TrainingConfig, resume) -> Path | None:
    run_dir = train_cfg.run_dir
    if resume:
        path = Path(resume) if isinstance(resume, (str, Path)) else latest_checkpoint(run_dir)
        if path is None:
            raise ValueError(f"--resume: no resumable checkpoint in {run_dir}")
        return path
    if latest_checkpoint(run_dir) is not None or (run_dir / "final").exists():
        if not train_cfg.overwrite:
            raise ValueError(f"{run_dir} already holds checkpoints of an earlier run; pass --resume to "
                             f"continue it, or set train.overwrite=true / another run_name")
        for p in run_dir.iterdir():
            if p.name.startswith("step-") or p.name == "final":
                shutil.rmtree(p)
    return None


def train_to_completion(build: Callable[[RunLogger | None], Trainer], train_config: TrainingConfig,
                        config: dict, resume_path: Path | None, say,
                        health: HealthMonitor | None = None) -> Path:
    """The run shared by SFT and DPO: open the run's logger (rank 0 only), build the trainer with
    it, attach the health alarms, resume if asked, train, write the final checkpoint, and always
    close the logger."""
    logger = RunLogger(train_config.run_dir, mode=train_config.wandb, project=train_config.wandb_project,
                       name=train_config.run_name, config=config,
                       resume_step=_checkpoint_step(resume_path),
                       report_to=train_config.report_to) if runtime.is_main() else None
    try:
        trainer = build(logger)
        if health is not None and runtime.is_main():
            trainer.health = health
        if resume_path is not None:
            trainer.resume_from(resume_path)
            say(f"resumed from {resume_path} at step {trainer.state.step}", flush=True)
        trainer.train()
        final = trainer.finish()
    finally:
        if logger is not None:
            logger.close()
    say(f"saved {final} after {trainer.state.step} steps", flush=True)
    if runtime.is_main():
        run_dir = train_config.run_dir
        curves = plot_curves({train_config.run_name: run_dir}, run_dir / "curves.png")
        say(f"curves: {curves}", flush=True)
    return final


def join_ranks(train_config: TrainingConfig, unit: str) -> TrainingConfig:
    """Join torchrun's process group when launched by it. Only rank 0 talks (console, progress
    bars, metrics, W&B, checkpoints); the others run quietly."""
    if not runtime.init_from_env():
        return train_config
    if runtime.is_main() and train_config.progress:
        w, b = runtime.world_size(), train_config.batch_size
        print(f"distributed: {w} ranks x {b} {unit} = {w * b} {unit} per optimizer step "
              f"({train_config.parallel})", flush=True)
    return train_config if runtime.is_main() else dataclasses.replace(train_config, progress=False)


def _checkpoint_step(path: Path | None) -> int | None:
    if path is None:
        return None
    return int(read_config(path).get("step", 0))
