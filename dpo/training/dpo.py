"""DPO training: ``run_dpo`` (the Python API), ``run_sweep`` (β sweeps) and ``fastdpo train``.

One micro-batch is one forward. By default each pair is one packed row whose prompt is computed
once for both answers (``fastdpo.training.data.collate_packed_pairs``; ``shared_prompt: false`` gives the seed's
layout, chosen rows and rejected rows concatenated on the batch dimension). The answers' log-probs
come from ``kernels.linear_sequence_logprobs`` on the final hidden states, so the (B, T, V) logits
are never materialized (``kernel: reference`` uses the naive oracle instead). The reference
log-probs are, by default, computed once up front and cached on disk (``fastdpo.training.reference_cache``);
``reference: model`` keeps a frozen copy and runs it every step, ``reference: none`` trains
reference-free.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastdpo import kernels
from fastdpo import runtime as distributed
from fastdpo.models.checkpoint import load_checkpoint, load_tokenizer
from fastdpo.training.config import DPOConfig, PreferenceDatasetConfig, TrainingConfig, load_config, to_dict
from fastdpo.training.data import TokenizedPair, collate_packed_pairs, collate_pairs, eval_batches, load_preference_data
from fastdpo.training.losses import dpo_losses
from fastdpo.training.metrics import RunLogger
from fastdpo.training.reference_cache import cached_reference_logprobs
from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.loop import (
    Task,
    Trainer,
    autocast,
    latest_checkpoint,
    resolve_device,
    resolve_precision,
    sequence_logprobs,
)


def pair_logprobs(model, pairs: Sequence[TokenizedPair], *, pad_id: int, device: torch.device,
                  kernel: str = "fused", backend: str = "auto",
                  shared_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs ``(chosen (B,), rejected (B,))`` of a micro-batch, in one forward.

    ``shared_prompt``: one packed row per pair (``collate_packed_pairs``), the prompt computed
    once. Otherwise the seed's layout: chosen rows then rejected rows on the batch dimension (also
    used for a DDP/FSDP-wrapped policy, whose forward takes that layout)."""
    if not shared_prompt or distributed.is_wrapped_policy(model):
        ids, mask = collate_pairs(pairs, pad_id)
        lp = sequence_logprobs(model, ids.to(device), mask.to(device), kernel, backend).float()
        return lp[:len(pairs)], lp[len(pairs):]
    b = collate_packed_pairs(pairs, pad_id).to(device)
    if kernel == "reference":
        logits = model(b.ids, pos=b.pos, attn_mask=b.attn_mask)
        return (kernels.reference.sequence_logprobs(logits, b.ids, b.chosen_mask),
                kernels.reference.sequence_logprobs(logits, b.ids, b.rejected_mask))
    hidden = model.hidden_states(b.ids, pos=b.pos, attn_mask=b.attn_mask)
    # ONE kernel call over [rows with the chosen mask; the same rows with the rejected mask]: the
    # kernel only sends masked rows through the lm_head, and its cost per call includes passes over
    # the whole (V, C) weight, so two calls would pay those twice. The (2B, T, C) copy is small.
    masks = torch.cat([b.chosen_mask, b.rejected_mask])
    lp = kernels.linear_sequence_logprobs(torch.cat([hidden, hidden]), model.lm_head_weight,
                                          torch.cat([b.ids, b.ids]), masks, backend=backend).float()
    return lp[:len(pairs)], lp[len(pairs):]


class DPOTask(Task):
    def __init__(self, policy, train: Sequence[TokenizedPair], val: Sequence[TokenizedPair], cfg: DPOConfig,
                 *, pad_id: int, device: torch.device, kernel: str = "fused", backend: str = "auto",
                 ref_train: torch.Tensor | None = None, ref_val: torch.Tensor | None = None,
                 ref_model: torch.nn.Module | None = None, eval_batch_size: int = 8):
        self.policy, self.train, self.val, self.cfg = policy, list(train), list(val), cfg
        self.pad_id, self.device, self.kernel, self.backend = pad_id, device, kernel, backend
        self.ref_train, self.ref_val, self.ref_model = ref_train, ref_val, ref_model
        # The layout the policy's forward actually takes; a wrapped (DDP/FSDP2) policy takes
        # separate rows, and the reference must then be computed the same way.
        self.shared_prompt = cfg.shared_prompt
        self.n_train, self.n_val = len(self.train), len(self.val)
        length = (lambda p: p.packed_length) if cfg.shared_prompt else (lambda p: p.length)
        self.lengths = [length(p) for p in self.train]
        self._val_batches = eval_batches([length(p) for p in self.val], eval_batch_size)

    def _pairs(self, train: bool):
        return self.train if train else self.val

    def step_norm(self, micro_batches, train=True):
        pairs = self._pairs(train)
        return {"pairs": sum(len(idx) for idx in micro_batches),
                "chosen_tokens": sum(len(pairs[i].chosen) for idx in micro_batches for i in idx)}

    def n_tokens(self, idx, train=True):
        pairs = self._pairs(train)
        return sum(pairs[i].n_tokens for i in idx)

    def val_batches(self):
        return self._val_batches

    def bind_policy(self, policy):
        self.policy = policy
        self.shared_prompt = False   # a wrapped policy's forward takes separate rows

    def logprobs(self, model, pairs):
        return pair_logprobs(model, pairs, pad_id=self.pad_id, device=self.device, kernel=self.kernel,
                             backend=self.backend, shared_prompt=self.shared_prompt)

    def reference_logprobs(self, idx, pairs, train):
        if self.cfg.reference == "none":
            return None, None
        if self.ref_model is not None:
            with torch.no_grad():
                return self.logprobs(self.ref_model, pairs)
        ref = (self.ref_train if train else self.ref_val)[idx].to(self.device)
        return ref[:, 0], ref[:, 1]

    def loss(self, idx, norm, train=True):
        pairs = [self._pairs(train)[i] for i in idx]
        pc, pr = self.logprobs(self.policy, pairs)
        rc, rr = self.reference_logprobs(idx, pairs, train)
        losses, rew_c, rew_r = dpo_losses(pc, pr, rc, rr, self.cfg.beta, self.cfg.loss_type,
                                          self.cfg.label_smoothing)
        loss = losses.sum() / norm["pairs"]
        stats = {"pairs": len(idx), "dpo_loss": losses.detach().sum(), "rewards/chosen": rew_c.sum(),
                 "rewards/rejected": rew_r.sum(), "rewards/accuracies": (rew_c > rew_r).float().sum(),
                 "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum(),
                 "chosen_tokens": sum(len(self._pairs(train)[i].chosen) for i in idx)}
        if self.cfg.rpo_alpha:
            # TRL's rpo_alpha: mean per-token NLL of the chosen answers over the whole step batch.
            loss = loss + self.cfg.rpo_alpha * (-pc.sum() / norm["chosen_tokens"])
        return loss, stats

    def summarize(self, sums):
        n = sums["pairs"]
        out = {"loss/dpo": float(sums["dpo_loss"]) / n}
        nll = -float(sums["logps/chosen"]) / max(1, sums["chosen_tokens"])
        out["loss"] = out["loss/dpo"] + self.cfg.rpo_alpha * nll
        out["loss/nll_chosen"] = nll
        for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
                  "logps/rejected"):
            out[k] = float(sums[k]) / n
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def reference_layout_shared(dpo_cfg: DPOConfig) -> bool:
    """Whether reference log-probs use the packed shared-prompt layout: only when the policy does,
    i.e. in one process (under torchrun the DDP/FSDP2-wrapped policy takes separate rows, and
    policy and reference log-probs must come from the same layout)."""
    return dpo_cfg.shared_prompt and distributed.world_size() == 1


def prepare_dpo(policy: torch.nn.Module, train: Sequence[TokenizedPair], val: Sequence[TokenizedPair],
                train_cfg: TrainingConfig, dpo_cfg: DPOConfig, *, pad_id: int, tokenizer_hash: str = "",
                reference: torch.nn.Module | None = None, tokenizer: Tokenizer | None = None,
                meta: dict | None = None, logger: RunLogger | None = None, on_step=None,
                device: torch.device | None = None) -> Trainer:
    """A ready-to-run DPO ``Trainer`` from in-memory objects (``run_dpo`` and the bench use it).

    ``reference`` is the frozen reference model (default: a copy of ``policy`` as it is now)."""
    device = device or resolve_device(train_cfg.device)
    precision = resolve_precision(train_cfg.mixed_precision, device)
    policy.to(device)
    mode = dpo_cfg.reference
    if mode == "auto":
        # Caching costs one forward per pair once; a per-step reference one per pair visited.
        steps_per_epoch = len(train) // train_cfg.batch_size
        steps = train_cfg.max_steps or max(1, round(train_cfg.epochs * steps_per_epoch))
        visits = steps * train_cfg.batch_size
        mode = "cached" if visits >= len(train) else "model"
        dpo_cfg = dataclasses.replace(dpo_cfg, reference=mode)
    ref_model, ref_train, ref_val = None, None, None
    if mode != "none":
        ref_model = copy.deepcopy(reference if reference is not None else policy).to(device).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    if mode == "cached":
        cache_dir = dpo_cfg.reference_cache_dir or train_cfg.output_dir / "ref_cache"
        # "auto" means other kernels on another device: key on what actually runs
        backend = kernels.logprob.resolve_backend(train_cfg.kernel_backend, device)
        shared = reference_layout_shared(dpo_cfg)
        settings = f"{precision}|{train_cfg.kernel}|{backend}|{device.type}|shared={shared}"

        def ref_logprobs(model, pairs):
            return pair_logprobs(model, pairs, pad_id=pad_id, device=device, kernel=train_cfg.kernel,
                                 backend=train_cfg.kernel_backend, shared_prompt=shared)

        logps, path, hit = cached_reference_logprobs(
            ref_model, [*train, *val], cache_dir=cache_dir, tokenizer_hash=tokenizer_hash, settings=settings,
            batch_size=2 * train_cfg.micro_batch_size, pair_logprobs_fn=ref_logprobs,
            autocast_ctx=lambda: autocast(device, precision), progress=train_cfg.progress)
        ref_train, ref_val = logps[:len(train)], logps[len(train):]
        if train_cfg.progress:
            print(f"reference log-probs: {'cache hit' if hit else 'computed'} ({path})", flush=True)
        ref_model = None  # the cache replaces it: one model in memory
    task = DPOTask(policy, train, val, dpo_cfg, pad_id=pad_id, device=device, kernel=train_cfg.kernel,
                   backend=train_cfg.kernel_backend, ref_train=ref_train, ref_val=ref_val,
                   ref_model=ref_model, eval_batch_size=2 * train_cfg.micro_batch_size)
    return Trainer(policy, task, train_cfg, tokenizer=tokenizer, meta=meta, device=device,
                   precision=precision, logger=logger, on_step=on_step)


def resolve_tokenizer(tokenizer, checkpoint: Path | None, train_cfg: TrainingConfig) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return Tokenizer.load(tokenizer)
    if train_cfg.tokenizer_name:
        return Tokenizer.load(train_cfg.tokenizer_name)
    if checkpoint is None:
        raise ValueError("no tokenizer: pass one (or set train.tokenizer_name)")
    return load_tokenizer(checkpoint)


def prepare_run_dir(train_cfg: TrainingConfig, resume) -> Path | None:
    """The checkpoint to resume from (or None); refuses to silently overwrite an earlier run.
    Under torchrun rank 0 decides (and cleans up) and every rank resumes from its answer."""
    return distributed.run_on_main(_prepare_run_dir, train_cfg, resume)


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
        import shutil
        for p in run_dir.iterdir():
            if p.name.startswith("step-") or p.name == "final":
                shutil.rmtree(p)
    return None


def run_dpo(sft_checkpoint: str | Path, train_config: TrainingConfig, dpo_config: DPOConfig,
            preference_config: PreferenceDatasetConfig, tokenizer: Tokenizer | str | Path | None = None, *,
            resume: bool | str | Path = False, on_step: Callable | None = None) -> Path:
    """Train a DPO policy from ``sft_checkpoint`` (also the reference unless
    ``dpo_config.reference_checkpoint`` says otherwise); returns the final checkpoint directory.

    ``tokenizer`` may be a loaded ``Tokenizer``, a path, or None (the checkpoint's own).
    ``resume=True`` continues from the newest checkpoint in ``output_dir/run_name`` (or a given
    checkpoint directory), restoring weights, optimizer, RNG and data position."""
    sft_checkpoint = Path(sft_checkpoint)
    tok = resolve_tokenizer(tokenizer, sft_checkpoint, train_config)
    train_config = join_ranks(train_config, "pairs")
    resume_path = prepare_run_dir(train_config, resume)
    torch.manual_seed(train_config.seed)
    device = resolve_device(train_config.device)
    policy, _ = load_checkpoint(sft_checkpoint, tokenizer=tok, map_location=device)
    train, val, stats = load_preference_data(preference_config, tok, dpo_config.max_length,
                                             dpo_config.max_prompt_length, policy.config.block_size,
                                             train_config.seed)
    say = print if train_config.progress else (lambda *a, **k: None)
    say(f"data: {len(train)} train / {len(val)} val pairs ({stats.summary()})", flush=True)
    for msg in stats.errors[:5]:
        say(f"  skipped {msg}", flush=True)
    reference = None
    if dpo_config.reference_checkpoint is not None:
        reference, _ = load_checkpoint(dpo_config.reference_checkpoint, tokenizer=tok, map_location=device)
    config = {"train": to_dict(train_config), "dpo": to_dict(dpo_config), "data": to_dict(preference_config),
              "sft_checkpoint": str(sft_checkpoint)}
    return train_to_completion(
        lambda logger: prepare_dpo(policy, train, val, train_config, dpo_config, pad_id=tok.pad_id,
                                   tokenizer_hash=tok.hash, reference=reference, tokenizer=tok,
                                   meta={"kind": "dpo", "run_name": train_config.run_name, "config": config},
                                   logger=logger, on_step=on_step, device=device),
        train_config, config, resume_path, say)


def train_to_completion(build: Callable[[RunLogger | None], Trainer], train_config: TrainingConfig,
                        config: dict, resume_path: Path | None, say) -> Path:
    """The run shared by SFT and DPO: open the run's logger (rank 0 only), build the trainer with
    it, resume if asked, train, write the final checkpoint, and always close the logger."""
    logger = RunLogger(train_config.run_dir, mode=train_config.wandb, project=train_config.wandb_project,
                       name=train_config.run_name, config=config,
                       resume_step=_checkpoint_step(resume_path)) if distributed.is_main() else None
    try:
        trainer = build(logger)
        if resume_path is not None:
            trainer.resume_from(resume_path)
            say(f"resumed from {resume_path} at step {trainer.state.step}", flush=True)
        trainer.train()
        final = trainer.finish()
    finally:
        if logger is not None:
            logger.close()
    say(f"saved {final} after {trainer.state.step} steps", flush=True)
    return final


def join_ranks(train_config: TrainingConfig, unit: str) -> TrainingConfig:
    """Join torchrun's process group when launched by it. Only rank 0 talks (console, progress
    bars, metrics, W&B, checkpoints); the others run quietly."""
    if not distributed.init_from_env():
        return train_config
    if distributed.is_main() and train_config.progress:
        w, b = distributed.world_size(), train_config.batch_size
        print(f"distributed: {w} ranks x {b} {unit} = {w * b} {unit} per optimizer step "
              f"({train_config.parallel})", flush=True)
    return train_config if distributed.is_main() else dataclasses.replace(train_config, progress=False)


def _checkpoint_step(path: Path | None) -> int | None:
    if path is None:
        return None
    from fastdpo.models.checkpoint import read_config
    return int(read_config(path).get("step", 0))


# --------------------------------------------------------------------------- sweeps


def _replace_field(configs: dict, key: str, value) -> dict:
    section, _, name = key.rpartition(".")
    owners = [s for s, c in configs.items() if (not section or s == section)
              and name in {f.name for f in dataclasses.fields(c)}]
    if len(owners) != 1:
        raise ValueError(f"--sweep {key}: matches {owners or 'no'} config section; write section.key")
    out = dict(configs)
    out[owners[0]] = dataclasses.replace(configs[owners[0]], **{name: value})
    return out


def run_sweep(sft_checkpoint, train_config: TrainingConfig, dpo_config: DPOConfig,
              preference_config: PreferenceDatasetConfig, tokenizer=None, *, sweep: dict[str, list],
              resume: bool = False) -> list[dict]:
    """One run per combination of ``sweep`` values (e.g. ``{"beta": [0.05, 0.1, 0.5]}``), all in
    ``output_dir`` so they share the cached reference log-probs; prints a comparison table and
    returns its rows."""
    tok = resolve_tokenizer(tokenizer, Path(sft_checkpoint), train_config)
    rows = []
    keys = list(sweep)
    for values in itertools.product(*(sweep[k] for k in keys)):
        configs = {"train": train_config, "dpo": dpo_config, "data": preference_config}
        for k, v in zip(keys, values):
            configs = _replace_field(configs, k, v)
        suffix = "-".join(f"{k.rpartition('.')[2]}{v}" for k, v in zip(keys, values))
        configs["train"] = dataclasses.replace(configs["train"], run_name=f"{train_config.run_name}-{suffix}")
        final = run_dpo(sft_checkpoint, configs["train"], configs["dpo"], configs["data"], tok, resume=resume)
        history = read_metrics(configs["train"].run_dir / "metrics.jsonl")
        last_train = next((h for h in reversed(history) if h["split"] == "train"), {})
        last_val = next((h for h in reversed(history) if h["split"] == "val"), {})
        rows.append({**dict(zip(keys, values)), "run": configs["train"].run_name, "checkpoint": str(final),
                     **{f"train/{k}": v for k, v in last_train.items() if k not in ("step", "split")},
                     **{f"val/{k}": v for k, v in last_val.items() if k not in ("step", "split")}})
    if distributed.is_main():
        print(format_sweep_table(rows, keys))
    return rows


def read_metrics(path: Path) -> list[dict]:
    import json
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def format_sweep_table(rows: list[dict], keys: Sequence[str]) -> str:
    cols = [*keys, "train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/rewards/chosen",
            "train/rewards/rejected", "val/loss", "val/rewards/accuracies", "val/rewards/margins"]
    cols = [c for c in cols if any(c in r for r in rows)]
    head = [c.replace("rewards/", "") for c in cols]

    def fmt(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    table = [head] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("train", help="DPO-train a policy from an SFT checkpoint on preference pairs",
                              description="DPO training. Settings come from --config (YAML with sections "
                                          "train/dpo/data) and --set overrides.")
    p.add_argument("--config", type=Path, help="YAML config, e.g. configs/dpo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value: beta=0.2, train.max_steps=100, data.path=[a.jsonl]")
    p.add_argument("--sft-checkpoint", type=Path, help="overrides sft_checkpoint from the config")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the checkpoint's own)")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--wandb", choices=["auto", "disabled", "offline", "online"], help="W&B mode")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="train one run per value (e.g. beta=0.05,0.1,0.5) sharing cached reference log-probs")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes (N GPUs, or N CPU processes): re-launches this command "
                        "under torchrun; train.batch_size is per process")
    p.set_defaults(func=_cli)


def _relaunch_argv(args) -> list[str]:
    argv = ["train", *(["--config", str(args.config)] if args.config else [])]
    for flag, value in (("--sft-checkpoint", args.sft_checkpoint), ("--tokenizer", args.tokenizer),
                        ("--wandb", args.wandb)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [x for o in args.overrides for x in ("--set", o)]
    argv += [x for o in args.sweep for x in ("--sweep", o)]
    return argv + (["--resume"] if args.resume else [])


def _cli(args) -> int:
    import yaml
    if args.nproc is not None and args.nproc > 1:
        return distributed.relaunch(args.nproc, "fastdpo.cli", _relaunch_argv(args))
    overrides = list(args.overrides)
    if args.wandb:
        overrides.append(f"train.wandb={args.wandb}")
    cfg = load_config(args.config, overrides, kind="dpo")
    sft = args.sft_checkpoint or cfg["sft_checkpoint"]
    if sft is None:
        raise ValueError("no SFT checkpoint: set sft_checkpoint in the config or pass --sft-checkpoint")
    tokenizer = args.tokenizer or cfg["tokenizer"]
    if args.sweep:
        sweep = {}
        for item in args.sweep:
            key, sep, values = item.partition("=")
            if not sep or not values:
                raise ValueError(f"--sweep expects key=v1,v2,..., got {item!r}")
            sweep[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
        run_sweep(sft, cfg["train"], cfg["dpo"], cfg["data"], tokenizer, sweep=sweep, resume=args.resume)
    else:
        run_dpo(sft, cfg["train"], cfg["dpo"], cfg["data"], tokenizer, resume=args.resume)
    return 0
