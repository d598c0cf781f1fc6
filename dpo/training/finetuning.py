"""Full fine-tuning or LoRA: which of the policy's parameters train, and where a run's policy
comes from.

``finetuning_type: lora`` puts new adapters on ``lora_target`` (base frozen; only the adapters sit
in the optimizer). Started from a checkpoint that holds a LoRA adapter (an SFT run with LoRA), the
run continues training that adapter on its base, unless ``create_new_adapter`` (LLaMA-Factory's
name) asks to merge it into its base and start a new one. Either way the reference of a DPO run
is the starting policy; with a new adapter that is the base with the adapters switched off.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastdpo.models import lora
from fastdpo.models.checkpoint import load_base, load_checkpoint, read_config
from fastdpo.training.config import TrainingConfig


def lora_alpha(cfg: TrainingConfig) -> float:
    """``lora_alpha``, by default twice the rank (LLaMA-Factory's default)."""
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank


def apply_finetuning(model: torch.nn.Module, cfg: TrainingConfig) -> None:
    """LoRA: new adapters unless the model already has some (a continued adapter). Idempotent."""
    if cfg.finetuning_type == "lora" and not lora.has_lora(model):
        lora.apply_lora(model, cfg.lora_target, cfg.lora_rank, lora_alpha(cfg), cfg.lora_dropout)
    elif cfg.finetuning_type == "full" and lora.has_lora(model):
        raise ValueError("finetuning_type is full but the model has LoRA adapters: merge them first "
                         "(fastdpo.models.lora.merge_lora) or set finetuning_type: lora")


def load_trainable(checkpoint: str | Path, cfg: TrainingConfig, tokenizer, device,
                   say=lambda *a, **k: None) -> tuple[torch.nn.Module, str | None]:
    """The policy to train from ``checkpoint`` and, for LoRA, the base checkpoint its adapter
    applies to (recorded in every checkpoint the run writes)."""
    checkpoint = Path(checkpoint)
    if cfg.finetuning_type == "full":
        return load_checkpoint(checkpoint, tokenizer=tokenizer, map_location=device)[0], None
    if lora.is_adapter_dir(checkpoint) and not cfg.create_new_adapter:
        config = read_config(checkpoint)
        model = load_base(checkpoint, config, tokenizer, device)
        lora.load_adapter(checkpoint, model)
        adapter = lora.read_adapter_config(checkpoint)
        say(f"LoRA: continuing the adapter of {checkpoint} (rank {adapter['r']}, alpha "
            f"{adapter['lora_alpha']}, targets {adapter['target_modules']}); create_new_adapter: true "
            f"merges it and starts a new one", flush=True)
        return model, config["base_checkpoint"]
    model = load_checkpoint(checkpoint, tokenizer=tokenizer, map_location=device)[0]   # adapters merged
    apply_finetuning(model, cfg)
    return model, str(checkpoint.resolve())
