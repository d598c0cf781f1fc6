"""The training loop SFT and DPO share: AdamW, warmup + cosine, accumulation, clipping, autocast,
logging, evaluation, checkpoints, ``--resume``, Ctrl-C and NaN handling.

What is trained on is a *task* (``fastdpo.training.dpo.DPOTask``,
``fastdpo.training.sft.SFTTask``): it turns a list of example indices into a loss and a dict of
summed statistics. The loop only knows indices, which is what makes resuming exact: the
micro-batches of step ``s`` are a pure function of ``(seed, s)`` (see
``fastdpo.training.data.epoch_batches``), so a checkpoint needs the step number, the weights, the
optimizer state and the RNG state, nothing else, and a resumed run is bit-identical to an
uninterrupted one on the same machine.

The module is long because those parts share one trainer's state (step, optimizer, RNG, logger,
health monitor); the pieces that stand alone live elsewhere (``runs``, ``health``, ``metrics``).
"""
from __future__ import annotations

import abc
import contextlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastdpo import runtime
from fastdpo.models import lora
from fastdpo.models.checkpoint import load_checkpoint, save_checkpoint
from fastdpo.models.errors import CheckpointError
from fastdpo.models.memory import check_training_fits
from fastdpo.models.recompute import set_gradient_checkpointing
from fastdpo.runtime import autocast, resolve_device, resolve_precision
from fastdpo.training import parallel
from fastdpo.training.batches import epoch_batches
from fastdpo.training.config import HealthConfig, TrainingConfig
from fastdpo.training.finetuning import apply_finetuning
from fastdpo.training.health import HealthMonitor
from fastdpo.training.metrics import RunLogger
from fastdpo.training.runs import FINAL, STATE_FILE, _step_dirs, latest_checkpoint, resume_problem


class TrainingDiverged(ValueError):
    """A non-finite loss or gradient: the run stops before the bad update touches the weights."""


# --------------------------------------------------------------------------- schedule and optimizer


def lr_at(step: int, cfg: TrainingConfig, total_steps: int) -> float:
    """Linear warmup to ``learning_rate`` over ``warmup_steps`` (or ``warmup_ratio`` of the run),
    then cosine to ``min_lr_ratio``. A pure function of the step, so restoring the step restores
    the schedule."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    t = (step - warmup) / max(1, total_steps - warmup)
    floor = cfg.min_lr_ratio
    return cfg.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm gains (1-D parameters), as in nanoGPT.

    ``fused``: torch's single-kernel AdamW where every parameter is a plain float tensor on CPU or
    CUDA (measured on the tiny preset: 2-18 ms instead of 37 ms per step, no temporaries);
    otherwise (e.g. FSDP2 shards) the default implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = fused and all(type(p.data) is torch.Tensor and p.is_floating_point()
                          and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, fused=fused or None)


def planned_steps(n_train: int, cfg: TrainingConfig, world: int = 1) -> tuple[int, int]:
    """``(steps per epoch, steps of the run)``: an epoch is the whole optimizer steps its examples
    fill (the remainder sits out; each epoch's shuffle picks another); ``max_steps`` wins over
    ``epochs``."""
    per_epoch = (n_train // cfg.micro_batch_size) // (cfg.gradient_accumulation_steps * world)
    return per_epoch, cfg.max_steps or math.ceil(cfg.epochs * per_epoch)


# --------------------------------------------------------------------------- task interface


class Task(abc.ABC):
    """What a trainer trains on. Subclasses implement the abstract methods below."""
    n_train: int
    lengths: list[int]          # per training example, for length bucketing
    n_val: int = 0

    @abc.abstractmethod
    def step_norm(self, micro_batches: list[list[int]], train: bool = True) -> dict:
        """Normalizers for one optimizer step (e.g. pairs or answer tokens in the whole step), so
        that accumulated micro-batch losses add up to the full-batch mean exactly."""

    @abc.abstractmethod
    def loss(self, idx: list[int], norm: dict, train: bool = True) -> tuple[torch.Tensor, dict]:
        """``(loss contribution, {stat: summed tensor})`` for one micro-batch."""

    @abc.abstractmethod
    def summarize(self, sums: dict) -> dict:
        """Summed statistics -> logged metrics (floats)."""

    @abc.abstractmethod
    def n_tokens(self, idx: list[int], train: bool = True) -> int:
        """Real (unpadded) tokens in the micro-batch, for tokens/s."""

    def val_batches(self) -> list[list[int]]:
        return []

    def heldout_prompts(self) -> list[list[int]]:   # what the health checks answer by default
        return []

    def bind_policy(self, policy: torch.nn.Module) -> None:
        """Run the trained model's forwards through ``policy``, its DDP/FSDP2 wrapper."""
        raise TypeError(f"{type(self).__name__} does not support multi-process training")


@dataclass
class TrainState:
    step: int = 0
    total_steps: int = 0
    history: list = field(default_factory=list)   # the logged train/val metrics of this process


# --------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, model: torch.nn.Module, task: Task, cfg: TrainingConfig, *,
                 run_dir: Path | None = None,
                 tokenizer=None, meta: dict | None = None, device: torch.device | None = None,
                 precision: str | None = None, logger: RunLogger | None = None,
                 on_step: Callable[[Trainer, int], None] | None = None):
        self.cfg, self.task, self.model = cfg, task, model
        self.device = device or resolve_device(cfg.device)
        self.precision = precision or resolve_precision(cfg.mixed_precision, self.device)
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
        self.tokenizer, self.meta, self.logger, self.on_step = tokenizer, meta or {}, logger, on_step
        apply_finetuning(model, cfg)   # LoRA: adapters (unless continued), everything else frozen
        if cfg.gradient_checkpointing:
            set_gradient_checkpointing(model, True)
        # Under torchrun: DDP or FSDP2 (which turns parameters into shards: before the optimizer).
        self.world = runtime.world_size()
        self.parallel = parallel.parallelize(model, cfg.parallel, self.device) if self.world > 1 else None
        if self.parallel is not None:
            task.bind_policy(self.parallel)
        if self.world == 1:   # refuse, naming the parts, what cannot fit (before the optimizer state;
            #                   FSDP's shards are not counted, so only a single process is checked)
            check_training_fits(model, self.device, cfg.micro_batch_size, max(task.lengths, default=1),
                                cfg.gradient_checkpointing)
        self.optimizer = make_optimizer(model, cfg, fused=self.parallel is None)
        # the NaN/Inf guard without a host read per step (see _guard)
        self.device_side_guard = self.device.type != "cpu" and bool(self.optimizer.defaults.get("fused"))
        self._first_bad: torch.Tensor | None = None
        self.steps_per_epoch, total = planned_steps(task.n_train, cfg, self.world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{task.n_train} training examples are fewer than one optimizer step "
                             f"(batch_size {cfg.batch_size} x {self.world} ranks); lower batch_size "
                             f"or add data")
        self.state = TrainState(step=0, total_steps=total)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self._stop_requested = False
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.health = HealthMonitor(HealthConfig(enabled=False))   # alarms: train_to_completion sets them

    # -- data position -------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_batches(self.task.lengths, self.cfg.micro_batch_size,
                                                      self.cfg.seed, epoch, bucket=self.cfg.length_bucket))
        accum = self.cfg.gradient_accumulation_steps * self.world
        return self._epoch_cache[1][k * accum:(k + 1) * accum]

    def rank_micro_batches(self, step: int) -> list[list[int]]:
        """This rank's share of the step: the r-th run of ``gradient_accumulation_steps``
        micro-batches of the global step (all of them in a single process)."""
        accum, r = self.cfg.gradient_accumulation_steps, runtime.rank()
        return self.micro_batches(step)[r * accum:(r + 1) * accum]

    # -- one optimizer step --------------------------------------------------------------
    def train_step(self, sums: dict) -> torch.Tensor:
        """Forward/backward over the step's micro-batches, clip, check, update. Returns the grad
        norm; adds the step's statistics into ``sums``."""
        step = self.state.step
        micro = self.micro_batches(step)
        norm = self.task.step_norm(micro)
        if self.parallel is not None:
            # Normalizers of the global step / world: the ranks' gradients, averaged by DDP/FSDP2,
            # are then the gradient of the global batch's loss, as in one process.
            micro = self.rank_micro_batches(step)
            norm = {k: v / self.world for k, v in norm.items()}
        self.model.train()
        step_loss = torch.zeros((), device=self.device)
        for i, idx in enumerate(micro):
            with parallel.no_sync(self.parallel, skip=i + 1 < len(micro)):
                with autocast(self.device, self.precision):
                    loss, stats = self.task.loss(idx, norm)
                loss.backward()
            step_loss += loss.detach()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = parallel.plain(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
        self._guard(step_loss, grad_norm, step)
        lr = lr_at(step, self.cfg, self.state.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach().float()
        sums["steps"] = sums.get("steps", 0) + 1
        sums["tokens"] = sums.get("tokens", 0) + sum(self.task.n_tokens(i) for i in micro)
        self.state.step += 1
        self._last_lr = lr
        return grad_norm

    def _guard(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> None:
        """The NaN/Inf guard: no update is ever applied from a non-finite loss or gradient.

        Reading a device value on the host waits for the device, so where that costs something
        (CUDA) and the optimizer can skip a step by itself (the fused AdamW), the guard stays on
        the device, as AMP's GradScaler does: ``found_inf`` = 1 makes the fused AdamW leave the
        weights, moments and step counts as they were; the first bad step is remembered on the
        device and the run stops with ``TrainingDiverged`` at the next log step (or its last
        step), where the host reads it once. Otherwise (CPU, where a read is free; a non-fused
        optimizer, e.g. FSDP2's) the host checks every step and stops before the update."""
        bad = runtime.any_rank_on_device(~(torch.isfinite(loss) & torch.isfinite(grad_norm)))
        if not self.device_side_guard:
            if bool(bad):
                self._diverged(step, step, float(loss), float(grad_norm))
            return
        self.optimizer.found_inf = bad.float()
        first = torch.stack([torch.full_like(loss, step, dtype=torch.float32), loss.float(),
                             grad_norm.float()])
        if self._first_bad is None:
            self._first_bad = torch.full_like(first, -1.0)
        self._first_bad = torch.where(bad & (self._first_bad[0] < 0), first, self._first_bad)
        log_step = self.cfg.log_every and (step + 1) % self.cfg.log_every == 0
        if log_step or step + 1 == self.state.total_steps:
            bad_step, bad_loss, bad_norm = self._first_bad.tolist()   # the one host read
            if bad_step >= 0:
                self._diverged(int(bad_step), step, bad_loss, bad_norm)

    def _diverged(self, bad_step: int, step: int, loss: float, grad_norm: float):
        last = latest_checkpoint(self.run_dir)
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        what = "loss" if not math.isfinite(loss) else "gradient"
        when = ("stopped before updating the weights" if bad_step == step else
                f"that update was skipped and the run stopped at step {step + 1}")
        raise TrainingDiverged(
            f"non-finite {what} at step {bad_step + 1} (loss={loss:.4g}, grad_norm={grad_norm:.4g}); "
            f"{when}; {keep}. Lower learning_rate, raise beta, or check the data.")

    # -- the run ---------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> TrainState:
        """Run to ``total_steps`` (or ``steps`` more steps): log, evaluate, save, handle Ctrl-C."""
        from tqdm import tqdm

        cfg = self.cfg
        total = self.state.total_steps
        end = total if steps is None else min(self.state.step + steps, total)
        bar = tqdm(total=self.state.total_steps, initial=self.state.step, disable=not cfg.progress,
                   desc=self.run_dir.name, dynamic_ncols=True, leave=False)
        sums: dict = {}
        seconds = 0.0   # training time only: evaluation and checkpoint writes do not count in tokens/s
        self._health(self.health.on_start(self))
        with self._sigint_saves():
            try:
                while self.state.step < end:
                    t0 = time.perf_counter()
                    self.train_step(sums)
                    seconds += time.perf_counter() - t0
                    step = self.state.step
                    bar.update(1)
                    if cfg.log_every and step % cfg.log_every == 0:
                        self._log_train(sums, seconds)
                        sums, seconds = {}, 0.0
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                        self.evaluate()
                    saved = cfg.save_every and step % cfg.save_every == 0 and step < total
                    if saved:
                        self._save(self.run_dir / f"step-{step:06d}")
                        # the newest step checkpoint stays even with keep_checkpoints=0: until the
                        # final one exists it is the only way back (and what Ctrl-C reports)
                        self._prune(max(1, cfg.keep_checkpoints))
                    if self.on_step is not None:
                        self.on_step(self, step)
                    if runtime.any_rank(self._stop_requested):   # all ranks stop at one step
                        path = self.run_dir / f"step-{step:06d}"
                        if not saved:
                            self._save(path)
                        self._console(f"interrupted at step {step}: saved {path}; continue with --resume")
                        raise KeyboardInterrupt
            finally:
                bar.close()
        if sums.get("steps"):
            self._log_train(sums, seconds)
        return self.state

    def finish(self) -> Path:
        """Final evaluation and the final checkpoint (with its trainer state)."""
        if self.task.n_val or self.health.probes(self):
            self.evaluate()
        path = self._save(self.run_dir / FINAL, merged=self.cfg.lora_save_merged)
        self._prune()
        return path

    def evaluate(self) -> dict:
        """Loss metrics on the val split (when there is one), then the health checks' held-out answers."""
        metrics = self._val_metrics() if self.task.n_val else {}
        self._health(self.health.on_evaluate(self))
        return metrics

    @torch.no_grad()
    def _val_metrics(self) -> dict:
        self.model.eval()
        sums: dict = {}
        for idx in self.task.val_batches():
            with autocast(self.device, self.precision):
                _, stats = self.task.loss(idx, self.task.step_norm([idx], train=False), train=False)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v
        metrics = self.task.summarize(sums)
        self._record(metrics, "val")
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("loss", "rewards/accuracies",
                                                                              "rewards/margins"))
        self._console(f"eval step={self.state.step} {shown}")
        return metrics

    def _health(self, rows: list[tuple[str, dict]]) -> None:
        for split, row in rows:   # training.health's rows: held-out answer statistics, alarms
            self._record(row, split)

    def _log_train(self, sums: dict, seconds: float) -> None:
        sums = runtime.all_reduce_sums(sums, keep=("grad_norm", "steps"))
        metrics = self.task.summarize(sums)
        metrics["lr"] = self._last_lr
        metrics["grad_norm"] = float(sums["grad_norm"]) / sums["steps"]
        metrics["tokens/s"] = sums["tokens"] / max(seconds, 1e-9)
        self._record(metrics, "train")
        line = f"step={self.state.step} loss={metrics['loss']:.4f}"
        if "rewards/accuracies" in metrics:
            line += f" accuracy={100 * metrics['rewards/accuracies']:.2f}%"
        line += f" lr={metrics['lr']:.3e}"
        if "rewards/margins" in metrics:
            line += f" margin={metrics['rewards/margins']:.4f}"
        line += f" grad_norm={metrics['grad_norm']:.3f} tokens/s={metrics['tokens/s']:.0f}"
        self._console(line)

    def _record(self, metrics: dict, split: str) -> None:
        self.state.history.append({"step": self.state.step, "split": split, **metrics})
        if self.logger is not None:
            self.logger.log(self.state.step, metrics, split)
        if split == "alarm":
            self._console(f"WARNING [health] step {self.state.step}: {metrics['message']}")
        elif split in ("train", "val"):
            self._health(self.health.on_record(metrics, split))

    def _console(self, line: str) -> None:
        if self.logger is not None:
            self.logger.console(line)
        elif runtime.is_main():   # progress: false hides the bar only
            print(line, flush=True)

    # -- checkpoints -----------------------------------------------------------------------
    def _save(self, path: Path, merged: bool = False) -> Path:
        """``merged``: a LoRA model's checkpoint also holds the merged weights."""
        if self.parallel is not None:
            return self._save_distributed(path, merged)
        # Never persist weights that may hold a bad update (the CUDA path checks lazily).
        for p in self._params:
            if not torch.isfinite(p).all():
                raise TrainingDiverged(f"non-finite weights at step {self.state.step}; not saving {path}; "
                                       f"the last good checkpoint is {latest_checkpoint(self.run_dir)}")
        return self._write_checkpoint(path, self.model, self.optimizer.state_dict(), merged=merged)

    def _save_distributed(self, path: Path, merged: bool = False) -> Path:
        """Every rank joins the gather (FSDP2 shards, RNG states); rank 0 writes; all wait for it."""
        model, optim = parallel.gather_for_save(self.model, self.optimizer, self.parallel)
        rngs = runtime.all_gather_object(torch.get_rng_state())
        finite = runtime.is_main() and all(bool(torch.isfinite(v).all())
                                               for v in model.state_dict().values())
        if not runtime.broadcast_object(finite):
            raise TrainingDiverged(f"non-finite weights at step {self.state.step}; not saving {path}; "
                                   f"the last good checkpoint is {latest_checkpoint(self.run_dir)}")
        if runtime.is_main():
            self._write_checkpoint(path, model, optim, merged=merged, rng_per_rank=rngs)
        runtime.barrier()
        return path

    def _write_checkpoint(self, path: Path, model, optimizer_state: dict, merged: bool = False,
                          **extra) -> Path:
        state = {"optimizer": optimizer_state, "step": self.state.step,
                 "total_steps": self.state.total_steps, "rng": torch.get_rng_state(), **extra}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        meta = {**self.meta, "step": self.state.step}
        return save_checkpoint(path, model, step=self.state.step, tokenizer=self.tokenizer, meta=meta,
                               extra_files={STATE_FILE: lambda f: torch.save(state, f)}, merged=merged)

    def _prune(self, keep: int | None = None) -> None:
        if not runtime.is_main():
            return
        keep = self.cfg.keep_checkpoints if keep is None else keep
        steps = sorted(_step_dirs(self.run_dir))
        for _, path in steps[:max(0, len(steps) - keep)]:
            shutil.rmtree(path, ignore_errors=True)

    def resume_from(self, path: Path) -> None:
        """Restore weights, optimizer, RNG and the step (= data position and lr schedule)."""
        path = Path(path)
        problem = resume_problem(path)   # damaged or not a training checkpoint: one line naming the file
        if problem:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if lora.has_lora(self.model):   # the frozen base is this run's own: only the adapters trained
            lora.load_adapter_weights(path, self.model)
            self.optimizer.load_state_dict(state["optimizer"])
        elif parallel.is_fsdp(self.parallel):   # every rank reads the full checkpoint, keeps its shard
            model, _ = load_checkpoint(path, map_location=self.device)
            parallel.load_full_state(self.model, self.optimizer, self.parallel, model.state_dict(),
                                     state["optimizer"])
        else:
            model, _ = load_checkpoint(path, map_location=self.device)
            with torch.no_grad():
                for p, q in zip(self.model.state_dict().values(), model.state_dict().values()):
                    p.copy_(q)
            self.optimizer.load_state_dict(state["optimizer"])
        rngs = state.get("rng_per_rank")
        torch.set_rng_state(rngs[runtime.rank()] if rngs and len(rngs) == self.world else state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.state.step = int(state["step"])
        if int(state["total_steps"]) != self.state.total_steps:
            self._console(f"note: the checkpoint planned {state['total_steps']} steps, this run "
                          f"{self.state.total_steps}; the lr schedule follows this run's")

    @contextlib.contextmanager
    def _sigint_saves(self):
        """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: stop at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self._console("Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
