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

import torch
from safetensors import safe_open

from fastdpo import runtime
from fastdpo.models import lora
from fastdpo.models.checkpoint import WEIGHTS, load_tokenizer, read_config, restore_interrupted_swap
from fastdpo.models.errors import CheckpointError
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
_TMP_DIR = re.compile(r"^\.(step-\d+|final)\.tmp-[0-9a-f]+$")   # a save killed before its rename


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    return [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest resumable checkpoint of a run (by its saved step; see ``checkpoints_newest_first``)."""
    return next((p for p in checkpoints_newest_first(run_dir) if (p / STATE_FILE).is_file()), None)


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """Every checkpoint directory of a run, damaged or not, newest first by the step it was saved at.
    ``final`` goes by the step in its config.json (a finished run continued with a longer plan has
    step directories past it), ahead of a step directory of the same step; a ``final`` whose step
    cannot be read comes first, so that it is checked and reported rather than skipped."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():   # a save that died between its two renames: put the previous one back
        for name in {m.group(1) for p in run_dir.glob(".*.old-*") if (m := _OLD_DIR.match(p.name))}:
            restore_interrupted_swap(run_dir / name)
    entries = [(float(step), 0, p) for step, p in _step_dirs(run_dir)]
    final = run_dir / FINAL
    if final.is_dir():
        try:
            step = float(int(read_config(final).get("step", 0)))
        except (ValueError, OSError, TypeError):
            step = float("inf")
        entries.append((step, 1, final))
    return [p for _, _, p in sorted(entries, key=lambda e: (e[0], e[1]), reverse=True)]


def resume_problem(path: Path) -> str | None:
    """What makes a checkpoint unusable for ``--resume`` (naming the file), or None when its
    config, weights, trainer state, RNG state and data position (the step) all check out. The
    trainer state is read as plain tensors and containers only (never unpickled as code)."""
    path = Path(path)
    try:
        config = read_config(path)
    except CheckpointError as e:
        return str(e)
    weights = [path / WEIGHTS] if (path / WEIGHTS).is_file() else (
        [path / lora.ADAPTER_WEIGHTS] if lora.is_adapter_dir(path) else [])
    if not weights:
        return f"{path / WEIGHTS}: missing"
    try:
        with safe_open(str(weights[0]), "pt") as f:
            f.keys()
    except Exception as e:   # truncated, or not a safetensors file at all
        return f"{weights[0]}: corrupt or truncated safetensors file ({' '.join(str(e).split())})"
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"{state_file}: missing"
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, random bytes, or a pickle asking for more than tensors
        return f"{state_file}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    if not isinstance(state, dict):
        return f"{state_file}: expected a dict, got {type(state).__name__}"
    for key in ("optimizer", "step", "total_steps", "rng"):
        if key not in state:
            return f"{state_file}: field '{key}' is missing"
    optimizer, step, total, rng = state["optimizer"], state["step"], state["total_steps"], state["rng"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        return f"{state_file}: field 'optimizer' is not an optimizer state dict"
    if not (type(step) is int and type(total) is int and 0 <= step <= total):
        return f"{state_file}: field 'step' ({step!r}) must be an integer in [0, total_steps={total!r}]"
    if step != config.get("step"):
        return (f"{state_file}: field 'step' is {step} but {path / 'config.json'} says "
                f"{config.get('step')!r} (the two files belong to different saves)")
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8
            and rng.numel() == torch.get_rng_state().numel()):
        return f"{state_file}: field 'rng' is not a CPU RNG state"
    return None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what saves killed midway left (``.step-N.tmp-*``, ``.final.tmp-*``): never renamed
    into place, so nothing refers to them, and each is as large as a checkpoint."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.iterdir() if _TMP_DIR.match(p.name)] if run_dir.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


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
    say = say_on_main()
    for p in remove_stale_temporaries(run_dir):
        say(f"removed {p}, left by a save that was interrupted", flush=True)
    if resume:
        if isinstance(resume, (str, Path)):
            problem = resume_problem(Path(resume))
            if problem:
                raise CheckpointError(f"--resume {resume}: cannot resume from it: {problem}")
            return Path(resume)
        return _newest_valid(run_dir, say)
    if latest_checkpoint(run_dir) is not None or (run_dir / "final").exists():
        if not train_cfg.overwrite:
            raise ValueError(f"{run_dir} already holds checkpoints of an earlier run; pass --resume to "
                             f"continue it, or set train.overwrite=true / another run_name")
        for p in run_dir.iterdir():
            if p.name.startswith("step-") or p.name == "final":
                shutil.rmtree(p)
    return None


def _newest_valid(run_dir: Path, say) -> Path:
    """The newest checkpoint that validates, saying which ones were damaged and skipped."""
    candidates = checkpoints_newest_first(run_dir)
    if not candidates:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir} (nothing to resume)")
    damaged = []
    for path in candidates:
        problem = resume_problem(path)
        if problem is None:
            if damaged:
                say(f"resuming from {path}, the newest checkpoint that validates", flush=True)
            return path
        damaged.append(problem)
        say(f"warning: checkpoint {path} is damaged: {problem}", flush=True)
    raise CheckpointError(f"--resume: no checkpoint in {run_dir} validates (newest: {damaged[0]})")


def is_finished(resume_path: Path | None, train_config: TrainingConfig) -> bool:
    """Resuming from a run's ``final`` checkpoint with the plan it finished (same ``max_steps``,
    ``epochs`` and ``batch_size``): the run is over, and training again would only add a duplicate
    evaluation and rewrite ``final`` with the same weights. A changed plan (more steps) continues."""
    if resume_path is None or Path(resume_path).name != FINAL:
        return False
    saved = read_config(resume_path).get("config", {}).get("train", {})
    return all(saved.get(k) == getattr(train_config, k) for k in ("max_steps", "epochs", "batch_size"))


def train_to_completion(build: Callable[[RunLogger | None], Trainer], train_config: TrainingConfig,
                        config: dict, resume_path: Path | None, say,
                        health: HealthMonitor | None = None) -> Path:
    """The run shared by SFT and DPO: open the run's logger (rank 0 only), build the trainer with
    it, attach the health alarms, resume if asked, train, write the final checkpoint, and always
    close the logger. A finished run (``is_finished``) is said so and nothing is written."""
    if is_finished(resume_path, train_config):
        say(f"{train_config.run_dir} is finished: {resume_path} (step {_checkpoint_step(resume_path)}); "
            f"nothing to resume. To train further, start a new run from that checkpoint.", flush=True)
        return Path(resume_path)
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
