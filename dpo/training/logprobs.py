"""Summed answer log-probs of a model on token rows: the one place where training, the cached
reference log-probs and evaluation scoring call the kernels, so the ``kernel`` setting decides
what really runs.

``kernel`` is ``auto`` (Triton on CUDA, the chunked torch path elsewhere), ``triton``, ``torch``,
or ``oracle`` (full logits through the naive float32 formula of ``fastdpo.kernels.reference``, for
comparison). Every choice but ``oracle`` goes hidden states -> ``linear_sequence_logprobs``, so the
(B, T, V) logits never exist at once.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdpo import kernels
from fastdpo.training.batches import TokenizedPair, collate_packed_pairs, collate_pairs
from fastdpo.training.config import KERNELS


def kernel_backend(kernel: str) -> str:
    """The kernels' ``backend`` name for a ``kernel`` setting (the oracle is their ``reference``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    return "reference" if kernel == "oracle" else kernel


class PolicyForward(torch.nn.Module):
    """The trained model's answer log-probs as a ``forward``. DDP synchronizes gradients, and
    FSDP2 gathers the root's parameters, only in hooks around ``forward``: calling
    ``model.hidden_states`` + the fused kernel on the bare model would bypass them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
        return sequence_logprobs(self.model, ids, mask, kernel)


def is_wrapped_policy(model) -> bool:
    return isinstance(model, (PolicyForward, torch.nn.parallel.DistributedDataParallel))


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Summed log-probs of the masked tokens per row ``(B,)``, float32 (see the module docstring)."""
    if is_wrapped_policy(model):
        return model(ids, mask, kernel)   # DDP/FSDP2 hooks run around forward() only
    hidden = model.hidden_states(ids)
    return kernels.linear_sequence_logprobs(hidden, model.lm_head_weight, ids, mask,
                                            backend=kernel_backend(kernel))


def pair_logprobs(model, pairs: Sequence[TokenizedPair], *, pad_id: int, device: torch.device,
                  kernel: str = "auto", shared_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs ``(chosen (B,), rejected (B,))`` of a micro-batch, in one forward.

    ``shared_prompt``: one packed row per pair (``collate_packed_pairs``), the prompt computed
    once. Otherwise the seed's layout: chosen rows then rejected rows on the batch dimension (also
    used for a DDP/FSDP-wrapped policy, whose forward takes that layout)."""
    if not shared_prompt or is_wrapped_policy(model):
        ids, mask = collate_pairs(pairs, pad_id)
        lp = sequence_logprobs(model, ids.to(device), mask.to(device), kernel).float()
        return lp[:len(pairs)], lp[len(pairs):]
    b = collate_packed_pairs(pairs, pad_id).to(device)
    hidden = model.hidden_states(b.ids, pos=b.pos, attn_mask=b.attn_mask)
    # ONE kernel call over [rows with the chosen mask; the same rows with the rejected mask]: the
    # kernel only sends masked rows through the lm_head, and its cost per call includes passes over
    # the whole (V, C) weight, so two calls would pay those twice. The (2B, T, C) copy is small.
    masks = torch.cat([b.chosen_mask, b.rejected_mask])
    lp = kernels.linear_sequence_logprobs(torch.cat([hidden, hidden]), model.lm_head_weight,
                                          torch.cat([b.ids, b.ids]), masks,
                                          backend=kernel_backend(kernel)).float()
    return lp[:len(pairs)], lp[len(pairs):]
