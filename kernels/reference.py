"""The naive formulas: float32 log-softmax over the whole vocabulary, gather, mask, sum.

Slow and memory hungry on purpose. Every fast path in this package is tested against these
functions, so they stay as close to the textbook definition as possible.
"""
import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask * log_softmax(logits.float())[labels], no shift; shape of ``labels``, float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    # where, not a plain product: a masked position may hold a -inf label logit, and -inf * 0 = nan
    mask = mask.float()
    return torch.where(mask != 0, picked * mask, 0.0)


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over t in 0..T-2 of mask[:, t+1] * log_softmax(logits[:, t].float())[ids[:, t+1]] -> (B,)."""
    return token_logprobs(logits[:, :-1], ids[:, 1:], mask[:, 1:]).sum(-1)


def linear_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """``sequence_logprobs(hidden @ weight.T, ids, mask)`` with the full (B, T, V) logits."""
    return sequence_logprobs(hidden @ weight.t(), ids, mask)
