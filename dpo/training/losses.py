"""DPO loss variants on sequence log-probabilities, and the implicit rewards they imply.

With log-ratios ``rho_c = log pi(y_c|x) - log ref(y_c|x)`` (and ``rho_r`` for the rejected
answer) and the margin ``z = rho_c - rho_r``, per pair:

- ``sigmoid``: ``-(1 - eps) log sigma(beta z) - eps log sigma(-beta z)``; ``eps`` =
  ``label_smoothing`` is the conservative-DPO assumption that a fraction eps of labels is flipped.
  At z = 0 (policy == reference) the loss is ln 2 whatever eps is.
- ``ipo``:     ``(z - 1 / (2 beta))^2`` (IPO, Azar et al. 2023), on summed sequence log-probs.
- ``hinge``:   ``max(0, 1 - beta z)`` (SLiC).

Reference-free mode uses ``ref = 0``. The implicit rewards ``beta * rho`` are what the logs show.
All of this is float32: the margin is a difference of differences and bf16 would drown it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
               ref_rejected: torch.Tensor | None, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``(B,)`` and the detached rewards ``(chosen, rejected)``, each ``(B,)``."""
    pc, pr = policy_chosen.float(), policy_rejected.float()
    rc = pc if ref_chosen is None else pc - ref_chosen.float()
    rr = pr if ref_rejected is None else pr - ref_rejected.float()
    z = rc - rr
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, ipo or hinge")
    return losses, (beta * rc).detach(), (beta * rr).detach()
