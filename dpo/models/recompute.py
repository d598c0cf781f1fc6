"""Gradient (activation) checkpointing per transformer block, for every model family.

A family opts in with a ``gradient_checkpointing`` attribute (False by default) and calls its
blocks through ``run_block``: while training with gradients on, a block then keeps only its input
for backward and runs its forward again there, so activation memory holds one block's
intermediates instead of every block's, for about one extra forward of compute. Inference,
no-grad passes (the cached reference log-probs, evaluation) and KV-cached decoding run the plain
path. The final norm and the lm_head are not checkpointed: the fused log-prob kernel already
keeps no logits.

The recompute draws the same dropout masks (torch saves and restores the RNG state), and the
non-reentrant implementation lets the block's inputs not require grad (a LoRA run's frozen
embeddings), so the gradients equal the plain run's.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def run_block(model: torch.nn.Module, block: torch.nn.Module, *args, **kwargs):
    """``block(*args, **kwargs)``, checkpointed when ``model.gradient_checkpointing`` is on and
    the call builds a graph (training mode, gradients enabled) and writes no KV cache (a cache
    write must not run twice)."""
    if (model.gradient_checkpointing and model.training and torch.is_grad_enabled()
            and kwargs.get("kv_cache") is None):
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn per-block checkpointing on or off; a ValueError for a model that does not support it."""
    if not hasattr(model, "gradient_checkpointing"):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it "
                         f"(no per-block checkpointing in its forward)")
    model.gradient_checkpointing = bool(enabled)
