"""The memory a model needs, estimated before anything is allocated, and the check that refuses
what cannot fit with a ``ConfigError`` naming the values (instead of an allocator traceback, or a
machine swapping itself to a halt).

Parameters are counted exactly by building the model on PyTorch's ``meta`` device (shapes, no
storage). Training adds float32 gradients and AdamW's two moments for the trainable parameters,
and activations: about ``16 x n_embd`` float32 values per token and layer saved for backward plus
the attention scores (``n_head x T`` per token and layer) — a deliberately low estimate, so that a
refusal means the run cannot fit, not that it might not. The budget is the memory available now
on the CPU (``MemAvailable``) or the CUDA device's total memory.
"""
from __future__ import annotations

import os

import torch

from fastdpo.errors import ConfigError

FLOAT32 = 4


def count_parameters(model_cls: type, config) -> int:
    """Parameters (and buffers) of ``model_cls(config)``, without allocating them."""
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def available_bytes(device: torch.device | str) -> int | None:
    """Memory a new allocation can use on ``device`` (None: unknown, no check)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def shape_of(config) -> str:
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "intermediate_size")
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys if hasattr(config, k))


def check_weights_fit(model_cls: type, config, device: torch.device | str = "cpu") -> int:
    """Refuse a model whose float32 weights alone exceed ``device``'s memory; returns the count."""
    n = count_parameters(model_cls, config)
    budget = available_bytes(device)
    if budget is not None and n * FLOAT32 > budget:
        raise ConfigError(f"model config ({shape_of(config)}) has {n / 1e9:.3g}B parameters: "
                          f"{gb(n * FLOAT32)} of float32 weights, more than the {gb(budget)} of memory "
                          f"available on {torch.device(device)}")
    return n


def training_bytes(model: torch.nn.Module, tokens_per_micro_batch: int, gradient_checkpointing: bool) -> dict:
    """The estimate's parts, in bytes, for training ``model`` on micro-batches of that many tokens."""
    cfg = getattr(model, "config", None)   # a model of no known family: its parameters only
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_token = 0
    if cfg is not None and all(hasattr(cfg, k) for k in ("n_layer", "n_embd")):
        # a block's saved activations only (fused attention stores no score matrix): a low estimate,
        # so that a refusal means the run cannot fit
        layers = 1 if gradient_checkpointing else cfg.n_layer   # checkpointing keeps one block's at a time
        per_token = layers * 16 * cfg.n_embd
    return {"weights": weights, "gradients": trainable * FLOAT32, "optimizer state": 2 * trainable * FLOAT32,
            "activations": tokens_per_micro_batch * per_token * FLOAT32}


def check_training_fits(model: torch.nn.Module, device: torch.device | str, micro_batch_size: int,
                        longest: int, gradient_checkpointing: bool) -> None:
    """Refuse a training run whose estimate exceeds ``device``'s memory, naming the parts
    (``FASTDPO_NO_MEMORY_CHECK=1`` skips the check)."""
    budget = available_bytes(device)
    if budget is None or os.environ.get("FASTDPO_NO_MEMORY_CHECK") == "1":
        return
    parts = training_bytes(model, micro_batch_size * longest, gradient_checkpointing)
    total = sum(parts.values())
    # on the CPU the weights are loaded already: what is available now must hold the rest
    needed = total - parts["weights"] if torch.device(device).type == "cpu" else total
    if needed > budget:
        shown = ", ".join(f"{k} {gb(v)}" for k, v in parts.items())
        raise ConfigError(
            f"training needs about {gb(total)} ({shown}; model {shape_of(getattr(model, 'config', None))}, "
            f"micro_batch_size={micro_batch_size} x {longest} tokens), more than the {gb(budget)} "
            f"available on {torch.device(device)}; lower micro_batch_size or the lengths, or turn on "
            f"gradient_checkpointing / finetuning_type lora (FASTDPO_NO_MEMORY_CHECK=1 skips this check)")
