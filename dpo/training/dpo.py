"""DPO training: the DPO task the shared loop trains on, and ``run_dpo`` (the Python API).

One micro-batch is one forward. By default each pair is one packed row whose prompt is computed
once for both answers (``collate_packed_pairs``; ``shared_prompt: false`` gives the seed's layout,
chosen rows and rejected rows concatenated on the batch dimension). The answers' log-probs come
from ``fastdpo.training.logprobs`` (the fused kernels on the final hidden states, so the (B, T, V)
logits are never materialized; ``kernel: oracle`` uses the naive formula instead). A training
step's reference log-probs are known before the policy's forward (cached, none, or the reference
model run first), and every loss type is a sum of per-pair terms, so the policy's forward is
the fused pair loss: the loss and its gradients in one pass (``kernels.linear_pair_loss``; the
logged statistics come from the log-probs it returns). Evaluation and the reference pass use the
log-prob op. The reference model's log-probs are computed once up front and cached on disk
(``fastdpo.training.reference_cache``) with ``reference: cached``; ``reference: model`` keeps a
frozen copy and runs it every step; ``auto`` (the default) picks the cheaper (``choose_reference``);
``reference: none`` trains reference-free.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastdpo import kernels, runtime
from fastdpo.models import lora
from fastdpo.models.checkpoint import load_checkpoint
from fastdpo.models.tokenizer import ChatTokenizer
from fastdpo.runtime import autocast, resolve_device, resolve_precision, to_device
from fastdpo.training.batches import TokenizedPair, eval_batches, load_preference_data
from fastdpo.training.config import DPOConfig, HealthConfig, PreferenceDatasetConfig, TrainingConfig, to_dict
from fastdpo.training.finetuning import apply_finetuning, load_trainable
from fastdpo.training.health import HealthMonitor
from fastdpo.training.logprobs import kernel_backend, pair_forward, pair_logprobs, pair_rows
from fastdpo.training.loop import Task, Trainer, planned_steps
from fastdpo.training.losses import dpo_losses, pair_loss_closure
from fastdpo.training.metrics import RunLogger
from fastdpo.training.pair_weights import pair_weights
from fastdpo.training.reference_cache import cache_file, cached_reference_logprobs
from fastdpo.training.runs import (
    join_ranks,
    prepare_run_dir,
    resolve_tokenizer,
    say_on_main,
    train_to_completion,
)


class DPOTask(Task):
    """``gradient_in_forward``: train through the fused pair loss (default); False runs the
    log-prob op and autograd through the loss (the same numbers; what a loss coupling the pairs
    of a batch would need)."""

    def __init__(self, policy, train: Sequence[TokenizedPair], val: Sequence[TokenizedPair], cfg: DPOConfig,
                 *, pad_id: int, device: torch.device, kernel: str = "auto",
                 ref_train: torch.Tensor | None = None, ref_val: torch.Tensor | None = None,
                 ref_model: torch.nn.Module | None = None, eval_batch_size: int = 8,
                 ref_view: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 gradient_in_forward: bool = True):
        self.policy, self.train, self.val, self.cfg = policy, list(train), list(val), cfg
        self.pad_id, self.device, self.kernel = pad_id, device, kernel
        # cached reference log-probs live on the device: (N, 2) floats, copied once, not per step
        self.ref_train, self.ref_val = (None if r is None else r.to(device) for r in (ref_train, ref_val))
        self.ref_model, self.gradient_in_forward = ref_model, gradient_in_forward
        self.ref_view = ref_view   # entered around reference forwards (a LoRA policy: its base view)
        # The layout the policy's forward actually takes; a wrapped (DDP/FSDP2) policy takes
        # separate rows, and the reference must then be computed the same way.
        self.shared_prompt = cfg.shared_prompt
        self.n_train, self.n_val = len(self.train), len(self.val)
        length = (lambda p: p.packed_length) if cfg.shared_prompt else (lambda p: p.length)
        self.lengths = [length(p) for p in self.train]
        self._val_batches = eval_batches([length(p) for p in self.val], eval_batch_size)
        # margin weighting: each training pair's loss times its weight (validation stays unweighted)
        self.train_weights = None
        if cfg.margin_weighting:
            w = pair_weights([p.margin_fields for p in self.train], cfg.dimension_weights)
            self.train_weights = torch.tensor(w, dtype=torch.float32).to(device)

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

    def heldout_prompts(self):
        return [p.prompt for p in self.val]

    def bind_policy(self, policy):
        self.policy = policy
        self.shared_prompt = False   # a wrapped policy's forward takes separate rows

    def reference_logprobs(self, idx, rows, train):
        if self.cfg.reference == "none":
            return None, None
        if self.ref_model is not None:
            with torch.no_grad(), self.ref_view():
                return pair_forward(self.ref_model, rows, self.kernel)
        ref = (self.ref_train if train else self.ref_val)
        ref = ref.index_select(0, to_device(torch.tensor(idx), self.device))
        return ref[:, 0], ref[:, 1]

    def loss(self, idx, norm, train=True):
        pairs = [self._pairs(train)[i] for i in idx]
        cfg = self.cfg
        rows = pair_rows(pairs, self.pad_id, self.device, self.shared_prompt)   # the reference's too
        rc, rr = self.reference_logprobs(idx, rows, train)   # first: the fused loss needs them
        nc, nr = answer_tokens(pairs, self.device)
        # TRL's rpo_alpha: mean per-token NLL of the chosen answers over the whole step batch
        # (the step's chosen tokens: the same normaliser for every micro-batch, so accumulation is exact)
        nll_scale = cfg.rpo_alpha / norm["chosen_tokens"] if cfg.rpo_alpha else 0.0
        loss = None
        weights = None
        if train and self.train_weights is not None:
            weights = self.train_weights.index_select(0, to_device(torch.tensor(idx), self.device))
        if self.gradient_in_forward and torch.is_grad_enabled():
            fn = pair_loss_closure(cfg, rc, rr, nc, nr, scale=1 / norm["pairs"], nll_scale=nll_scale,
                                   weights=weights)
            loss, pc, pr = pair_forward(self.policy, rows, self.kernel, fn)
        else:
            pc, pr = pair_forward(self.policy, rows, self.kernel)
        # the recompute path's loss; after the fused one, statistics of its detached log-probs only
        losses, rew_c, rew_r = dpo_losses(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing,
                                          chosen_tokens=nc, rejected_tokens=nr, simpo_gamma=cfg.simpo_gamma)
        if loss is None:
            weighted = losses if weights is None else losses * weights
            loss = weighted.sum() / norm["pairs"] - nll_scale * pc.sum()
        stats = {"pairs": len(idx), "dpo_loss": losses.detach().sum(), "rewards/chosen": rew_c.sum(),
                 "rewards/rejected": rew_r.sum(), "rewards/accuracies": (rew_c > rew_r).float().sum(),
                 "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum(),
                 "chosen_tokens": sum(len(p.chosen) for p in pairs)}
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


def answer_tokens(pairs: Sequence[TokenizedPair], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's chosen and rejected answer token counts ``(B,)`` (the length-normalised losses)."""
    counts = torch.tensor([[len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs]])
    counts = to_device(counts, device)
    return counts[0], counts[1]


def reference_layout_shared(dpo_cfg: DPOConfig) -> bool:
    """Whether reference log-probs use the packed shared-prompt layout: only when the policy does,
    i.e. in one process (under torchrun the DDP/FSDP2-wrapped policy takes separate rows, and
    policy and reference log-probs must come from the same layout)."""
    return dpo_cfg.shared_prompt and runtime.world_size() == 1


@contextlib.contextmanager
def base_view(model: torch.nn.Module):
    """A LoRA policy as its own reference: the base (adapters off) in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        with lora.adapters_disabled(model):
            yield model
    finally:
        model.train(was_training)


def choose_reference(n_train: int, n_val: int, cfg: TrainingConfig, *, cache_hit: bool = False,
                     world: int = 1) -> tuple[str, str]:
    """What ``reference: auto`` picks, ``"cached"`` or ``"model"``, and why.

    Decided on cost, counted in reference forwards (one per pair): the per-step reference model
    runs one per pair visited and one per val pair at every evaluation; the cached pass runs one
    per pair, once, and none when the cache already holds them (a rerun, the runs of a sweep).
    An epoch visits every pair but the remainder that does not fill a batch (a different few each
    epoch), so it is counted as one whole pass: a run of an epoch or more is cached, a run of a
    few steps keeps the reference model. At equal cost the cache wins: it frees the reference
    model's memory."""
    per_epoch, steps = planned_steps(n_train, cfg, world)
    step_pairs = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world
    evals = (((steps - 1) // cfg.eval_every if cfg.eval_every else 0) + 1) if n_val else 0
    per_step = steps * step_pairs + evals * n_val
    one_pass = 0 if cache_hit else n_train + n_val
    left_out = n_train - per_epoch * step_pairs
    mode = "cached" if one_pass <= per_step + left_out else "model"
    why = ("the cache already holds them" if cache_hit else
           f"one pass over {n_train + n_val} pairs vs {per_step} per-step reference forwards "
           f"({steps} steps x {step_pairs} pairs" + (f" + {evals} evals x {n_val}" if evals else "") + ")")
    return mode, why


def prepare_dpo(policy: torch.nn.Module, train: Sequence[TokenizedPair], val: Sequence[TokenizedPair],
                train_cfg: TrainingConfig, dpo_cfg: DPOConfig, *, pad_id: int, tokenizer_hash: str = "",
                reference: torch.nn.Module | None = None, tokenizer: ChatTokenizer | None = None,
                meta: dict | None = None, logger: RunLogger | None = None, on_step=None,
                device: torch.device | None = None, say=None) -> Trainer:
    """A ready-to-run DPO ``Trainer`` from in-memory objects (``run_dpo`` and the bench use it).

    ``reference`` is the frozen reference model (default: ``policy`` as it is now: a copy, or for a
    new LoRA adapter the policy itself with its adapters off). ``say`` prints the run's messages
    (default: ``print`` on the main rank)."""
    device = device or resolve_device(train_cfg.device)
    precision = resolve_precision(train_cfg.mixed_precision, device)
    say = say or say_on_main()
    policy.to(device)
    mode = dpo_cfg.reference
    apply_finetuning(policy, train_cfg)
    ref_model, ref_train, ref_val, ref_view = None, None, None, contextlib.nullcontext
    if mode != "none" and reference is None and lora.has_lora(policy) and lora.adapters_are_noop(policy):
        # A new LoRA adapter: the reference is the base, i.e. the policy with its adapters off (no copy).
        ref_model, ref_view = policy, lambda: base_view(policy)
    elif mode != "none":
        ref_model = copy.deepcopy(reference if reference is not None else policy).to(device).eval()
        lora.merge_lora(ref_model)   # a continued adapter: the reference is base + adapter as they start
        for p in ref_model.parameters():
            p.requires_grad_(False)
    if mode in ("auto", "cached"):
        cache_dir = dpo_cfg.reference_cache_dir or train_cfg.output_dir / "ref_cache"
        # "auto" means other kernels on another device: key on what actually runs
        backend = kernels.logprob.resolve_backend(kernel_backend(train_cfg.kernel), device)
        shared = reference_layout_shared(dpo_cfg)
        settings = f"{precision}|{backend}|{device.type}|shared={shared}"
        with ref_view():   # the cache key hashes the weights that compute the reference
            cache_path = cache_file(ref_model, [*train, *val], cache_dir, tokenizer_hash, settings)
    if mode == "auto":
        mode, why = choose_reference(len(train), len(val), train_cfg, cache_hit=cache_path.is_file(),
                                     world=runtime.world_size())
        say(f"reference: auto -> {mode} ({why})", flush=True)
        dpo_cfg = dataclasses.replace(dpo_cfg, reference=mode)
    if mode == "cached":
        def ref_logprobs(model, pairs):
            return pair_logprobs(model, pairs, pad_id=pad_id, device=device, kernel=train_cfg.kernel,
                                 shared_prompt=shared)

        with ref_view():
            logps, path, hit = cached_reference_logprobs(
                ref_model, [*train, *val], cache_dir=cache_dir, tokenizer_hash=tokenizer_hash,
                settings=settings, path=cache_path, batch_size=2 * train_cfg.micro_batch_size,
                pair_logprobs_fn=ref_logprobs, autocast_ctx=lambda: autocast(device, precision),
                progress=train_cfg.progress)
        ref_train, ref_val = logps[:len(train)], logps[len(train):]
        say(f"reference log-probs: {'cache hit' if hit else 'computed'} ({path})", flush=True)
        ref_model, ref_view = None, contextlib.nullcontext  # the cache replaces it: one model in memory
    task = DPOTask(policy, train, val, dpo_cfg, pad_id=pad_id, device=device, kernel=train_cfg.kernel,
                   ref_train=ref_train, ref_val=ref_val, ref_model=ref_model, ref_view=ref_view,
                   eval_batch_size=2 * train_cfg.micro_batch_size)
    return Trainer(policy, task, train_cfg, tokenizer=tokenizer, meta=meta, device=device,
                   precision=precision, logger=logger, on_step=on_step)


def run_dpo(sft_checkpoint: str | Path, train_config: TrainingConfig, dpo_config: DPOConfig,
            preference_config: PreferenceDatasetConfig,
            tokenizer: ChatTokenizer | str | Path | None = None, *, resume: bool | str | Path = False,
            on_step: Callable | None = None, health: HealthConfig | None = None, heldout_probe=None) -> Path:
    """Train a DPO policy from ``sft_checkpoint`` (a fastdpo checkpoint or a local Hugging Face model
    directory; also the reference unless ``dpo_config.reference_checkpoint`` says otherwise);
    returns the final checkpoint directory.

    ``tokenizer`` may be a loaded tokenizer, a path, or None (the checkpoint's own).
    ``resume=True`` continues from the newest checkpoint in ``output_dir/run_name`` (or a given
    checkpoint directory), restoring weights, optimizer, RNG and data position. ``health`` sets the
    alarm thresholds (default ``HealthConfig()``); ``heldout_probe``
    (``fastdpo.generation.heldout.HeldoutProbe``) adds the checks on held-out answers."""
    sft_checkpoint = Path(sft_checkpoint)
    tok = resolve_tokenizer(tokenizer, sft_checkpoint, train_config)
    train_config = join_ranks(train_config, "pairs")
    resume_path = prepare_run_dir(train_config, resume)
    torch.manual_seed(train_config.seed)
    device = resolve_device(train_config.device)
    say = say_on_main()   # progress: false hides the bars only
    policy, base = load_trainable(sft_checkpoint, train_config, tok, device, say=say)
    train, val, stats = load_preference_data(preference_config, tok, dpo_config.max_length,
                                             dpo_config.max_prompt_length, policy.config.block_size,
                                             train_config.seed, dpo_config.max_completion_length)
    say(f"data: {len(train)} train / {len(val)} val pairs ({stats.summary()})", flush=True)
    for msg in stats.errors[:5]:
        say(f"  skipped {msg}", flush=True)
    reference = None
    # a reference_checkpoint that is the starting checkpoint is the default reference (LLaMA-Factory
    # configs often name it twice): no second model to load, and a LoRA run keeps its base view
    if dpo_config.reference_checkpoint is not None and (
            Path(dpo_config.reference_checkpoint).resolve() != sft_checkpoint.resolve()):
        reference, _ = load_checkpoint(dpo_config.reference_checkpoint, tokenizer=tok, map_location=device)
    config = {"train": to_dict(train_config), "dpo": to_dict(dpo_config), "data": to_dict(preference_config),
              "sft_checkpoint": str(sft_checkpoint)}
    return train_to_completion(
        lambda logger: prepare_dpo(policy, train, val, train_config, dpo_config, pad_id=tok.pad_id,
                                   tokenizer_hash=tok.hash, reference=reference, tokenizer=tok,
                                   meta={"kind": "dpo", "run_name": train_config.run_name, "config": config,
                                         **({"base_checkpoint": base} if base else {})},
                                   logger=logger, on_step=on_step, device=device, say=say),
        train_config, config, resume_path, say, HealthMonitor(health, heldout_probe, reference))

