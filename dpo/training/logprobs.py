"""Summed answer log-probs of a model on token rows, and the per-pair DPO loss with its gradients
computed in forward: the one place where training, the cached reference log-probs and evaluation
scoring call the kernels, so the ``kernel`` setting decides what really runs.

``kernel`` is ``auto`` (Triton on CUDA tensors, the chunked torch path elsewhere), ``triton`` (on
CPU tensors the Triton interpreter: slow, for tests), ``torch``, or ``oracle`` (full logits through
the naive float32 formula of ``fastdpo.kernels.reference``, for comparison). Every choice but
``oracle`` goes hidden states -> one fused kernel call, so the (B, T, V) logits never exist.

Two ops, both on the final hidden states and the lm_head weight:
- ``kernels.linear_sequence_logprobs`` (the lm_head recomputed in backward): SFT's NLL, the cached
  reference pass, evaluation (no gradient) and any loss that needs the whole batch first;
- ``kernels.linear_pair_loss`` (``pair_forward`` given a loss): a loss that is a sum of per-pair
  terms, each known as soon as its pair's log-probs are (DPO once the reference log-probs are
  known: cached, reference-free, or the frozen reference model run first), differentiated chunk
  by chunk inside the forward: 3 lm_head matmuls per answer token instead of 4.

A micro-batch of pairs becomes model rows in ``pair_rows``, the one place that knows the batch
layouts, and reaches the kernels through ``pair_forward``. With ``packing`` the model runs on the
rows packed end to end without padding (``fastdpo.training.packing``) and the kernels get the
hidden states back in the padded layout's shape. Under DDP/FSDP2 the kernel call runs
inside the wrapped module's ``forward`` (``PolicyForward``), where their gradient hooks are.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdpo import kernels
from fastdpo.runtime import to_device
from fastdpo.training.batches import TokenizedPair, collate_packed_pairs, collate_pairs
from fastdpo.training.config import KERNELS
from fastdpo.training.losses import PairLossFn
from fastdpo.training.packing import FlatRows, flat_pairs


def kernel_backend(kernel: str) -> str:
    """The kernels' ``backend`` name for a ``kernel`` setting (the oracle is their ``reference``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    return "reference" if kernel == "oracle" else kernel


@dataclass
class PairRows:
    """A micro-batch of P pairs as model rows, in a layout ``linear_pair_loss`` reads from shapes:
    packed, ``ids`` (P, T) holding each pair's prompt and both answers (``pos`` and ``attn_mask``
    say how its tokens see each other), or separate, ``ids`` (2P, T): the chosen rows, then the
    rejected rows. ``chosen_mask`` / ``rejected_mask`` (P, T) mark each pair's answer tokens.
    ``flat``: the same rows packed without padding, what the model runs on (``pos`` and
    ``attn_mask`` are then unused)."""
    ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    pos: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
    flat: FlatRows | None = None


def pair_rows(pairs: Sequence[TokenizedPair], pad_id: int, device, shared_prompt: bool,
              packing: bool = False) -> PairRows:
    """The rows of a micro-batch on ``device`` (copied without waiting for it). ``shared_prompt``:
    one packed row per pair (``collate_packed_pairs``), its prompt computed once; otherwise the
    seed's layout (``collate_pairs``). ``packing``: either layout's rows end to end, no padding."""
    if packing:
        ids, chosen, rejected, flat = flat_pairs(pairs, pad_id, shared_prompt)
        return PairRows(*(to_device(t, device) for t in (ids, chosen, rejected)), flat=flat.to(device))
    if shared_prompt:
        b = collate_packed_pairs(pairs, pad_id)
        return PairRows(*(to_device(t, device) for t in (b.ids, b.chosen_mask, b.rejected_mask, b.pos,
                                                          b.attn_mask)))
    ids, mask = (to_device(t, device) for t in collate_pairs(pairs, pad_id))
    return PairRows(ids, mask[:len(pairs)], mask[len(pairs):])


class PolicyForward(torch.nn.Module):
    """The trained model's answer log-probs (or fused pair loss) as a ``forward``. DDP synchronizes
    gradients, and FSDP2 gathers the root's parameters, only in hooks around ``forward``: calling
    ``model.hidden_states`` + the fused kernel on the bare model would bypass them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, kernel: str = "auto",
                rejected_mask: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, pair_loss_fn: PairLossFn | None = None,
                flat: FlatRows | None = None):
        """Rows' ``sequence_logprobs``; with ``rejected_mask``, ``pair_forward`` of the
        ``PairRows(ids, mask, rejected_mask, pos, attn_mask, flat)``."""
        if rejected_mask is None:
            return sequence_logprobs(self.model, ids, mask, kernel, flat)
        return pair_forward(self.model, PairRows(ids, mask, rejected_mask, pos, attn_mask, flat), kernel,
                            pair_loss_fn)


def is_wrapped_policy(model) -> bool:
    return isinstance(model, (PolicyForward, torch.nn.parallel.DistributedDataParallel))


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, kernel: str = "auto",
                      flat: FlatRows | None = None) -> torch.Tensor:
    """Summed log-probs of the masked tokens per row ``(B,)``, float32 (see the module docstring);
    with ``flat``, the model runs on those rows packed (``fastdpo.training.packing``)."""
    if is_wrapped_policy(model):
        return model(ids, mask, kernel, flat=flat)   # DDP/FSDP2 hooks run around forward() only
    hidden = model.hidden_states(ids) if flat is None else flat.hidden_states(model)
    return kernels.linear_sequence_logprobs(hidden, model.lm_head_weight, ids, mask,
                                            backend=kernel_backend(kernel))


def pair_forward(model, rows: PairRows, kernel: str = "auto", pair_loss_fn: PairLossFn | None = None):
    """One forward over a micro-batch of pairs: ``(chosen (P,), rejected (P,))`` summed answer
    log-probs, float32; with ``pair_loss_fn``, ``(loss, chosen, rejected)`` from
    ``kernels.linear_pair_loss`` (the loss carries the gradients, the log-probs are detached)."""
    if is_wrapped_policy(model):   # DDP/FSDP2 hooks run around forward() only
        return model(rows.ids, rows.chosen_mask, kernel, rows.rejected_mask, rows.pos, rows.attn_mask,
                     pair_loss_fn, rows.flat)
    if rows.flat is not None:
        hidden = rows.flat.hidden_states(model)
    elif rows.pos is None:
        hidden = model.hidden_states(rows.ids)
    else:
        hidden = model.hidden_states(rows.ids, pos=rows.pos, attn_mask=rows.attn_mask)
    backend, weight = kernel_backend(kernel), model.lm_head_weight
    if pair_loss_fn is not None:
        return kernels.linear_pair_loss(hidden, weight, rows.ids, rows.chosen_mask, rows.rejected_mask,
                                        pair_loss_fn, backend=backend)
    P, ids = rows.chosen_mask.shape[0], rows.ids
    if ids.shape[0] == P:
        # Packed rows: ONE kernel call over [rows with the chosen mask; the same rows with the
        # rejected mask]. The kernel only sends masked rows through the lm_head, and its cost per
        # call includes passes over the whole (V, C) weight, so two calls would pay those twice.
        hidden, ids = torch.cat([hidden, hidden]), torch.cat([ids, ids])
    masks = torch.cat([rows.chosen_mask, rows.rejected_mask])
    lp = kernels.linear_sequence_logprobs(hidden, weight, ids, masks, backend=backend).float()
    return lp[:P], lp[P:]


def pair_logprobs(model, pairs: Sequence[TokenizedPair], *, pad_id: int, device: torch.device,
                  kernel: str = "auto", shared_prompt: bool = True,
                  packing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs ``(chosen (B,), rejected (B,))`` of a micro-batch, in one forward
    (``pair_rows`` says what ``shared_prompt`` and ``packing`` mean; a DDP/FSDP-wrapped policy is
    given separate rows by its task)."""
    return pair_forward(model, pair_rows(pairs, pad_id, device, shared_prompt, packing), kernel)

