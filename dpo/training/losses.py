"""Preference losses on sequence log-probabilities, per pair, and the implicit rewards they log.

Inputs per pair: the policy's summed answer log-probs ``pc``, ``pr`` (chosen, rejected), the
reference's ``rc``, ``rr`` (None: reference-free, i.e. 0), and the answers' token counts ``nc``,
``nr`` (needed by the length-normalised losses). With the log-ratios ``rho_c = pc - rc``,
``rho_r = pr - rr``, the margin ``z = rho_c - rho_r``, its length-normalised form
``zn = rho_c / nc - rho_r / nr``, and ``eps`` = ``label_smoothing``:

=============  ====================================================================  =============
loss_type      per-pair loss                                                         at pc=rc, pr=rr
=============  ====================================================================  =============
sigmoid        -(1-eps) log s(beta z) - eps log s(-beta z)   (DPO; eps: conservative)  ln 2
sigmoid_norm   the same on zn (TRL's ``sigmoid_norm``)                                 ln 2
robust         [-(1-eps) log s(beta z) + eps log s(-beta z)] / (1 - 2 eps)             ln 2
               (robust DPO, Chowdhury et al. 2024: unbiased under a label-flip rate eps)
hinge          max(0, 1 - beta z)   (SLiC)                                             1
ipo            (zn - 1 / (2 beta))^2   (IPO, length-normalised as TRL's ``ipo``)        1 / (4 beta^2)
ipo_sum        (z - 1 / (2 beta))^2    (IPO on summed log-probs: fastdpo's former ipo)  1 / (4 beta^2)
apo_zero       1 - s(beta rho_c) + s(beta rho_r)   (APO-zero, D'Oosterlinck et al.)    1
simpo          -(1-eps) log s(beta m - g) - eps log s(-(beta m - g)),                  reference-free
               m = pc/nc - pr/nr, g = ``simpo_gamma``   (SimPO, Meng et al. 2024)
orpo           -pc/nc - beta log s(log odds(pc/nc) - log odds(pr/nr)),                 reference-free
               odds(p) = p / (1 - p) on the mean per-token probability  (ORPO)
=============  ====================================================================  =============

(s = sigmoid.) The logged rewards are ``beta * rho`` (summed log-ratios, as TRL's DPO trainer
logs them) for the reference-based losses, and ``beta * pc / nc`` (mean per-token log-prob, as
TRL's CPO/ORPO trainers log them) for the reference-free ``simpo`` and ``orpo``.

ORPO's NLL term is the chosen answer's mean per-token NLL, per pair (the ORPO paper and
LLaMA-Factory); TRL's ORPO trainer instead averages the NLL over every chosen token of the batch,
prompt tokens included. Everything here is per pair on purpose: a pair's loss depends on that
pair's numbers only, so a fused kernel can differentiate it chunk by chunk (``pair_loss_closure``).
All of it is float32: the margin is a difference of differences and bf16 would drown it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastdpo.training.config import LENGTH_NORMALISED_LOSSES as LENGTH_NORMALISED
from fastdpo.training.config import REFERENCE_FREE_LOSSES as REFERENCE_FREE


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
               ref_rejected: torch.Tensor | None, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, *, chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None,
               simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``(B,)`` and the detached rewards ``(chosen, rejected)``, each ``(B,)``.
    See the module docstring for the formulas; ``chosen_tokens``/``rejected_tokens`` (answer token
    counts, ``(B,)``) are required by the length-normalised losses."""
    pc, pr = policy_chosen.float(), policy_rejected.float()
    if loss_type in LENGTH_NORMALISED:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"loss_type {loss_type!r} is length-normalised: pass chosen_tokens and "
                             f"rejected_tokens (answer token counts per pair)")
        nc = chosen_tokens.to(pc.device, torch.float32).clamp(min=1)
        nr = rejected_tokens.to(pc.device, torch.float32).clamp(min=1)
    if loss_type in REFERENCE_FREE:
        return _reference_free(pc / nc, pr / nr, beta, loss_type, label_smoothing, simpo_gamma)
    rc = pc if ref_chosen is None else pc - ref_chosen.float()
    rr = pr if ref_rejected is None else pr - ref_rejected.float()
    z = rc - rr
    if loss_type in ("sigmoid_norm", "ipo"):
        z = rc / nc - rr / nr
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = _smoothed_sigmoid(beta * z, label_smoothing)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * z)
                  + label_smoothing * F.logsigmoid(-beta * z)) / (1 - 2 * label_smoothing)
    elif loss_type in ("ipo", "ipo_sum"):
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * rc) + torch.sigmoid(beta * rr)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, (beta * rc).detach(), (beta * rr).detach()


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def _reference_free(mean_c: torch.Tensor, mean_r: torch.Tensor, beta: float, loss_type: str, eps: float,
                    gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO and ORPO, on mean per-token log-probs."""
    if loss_type == "simpo":
        losses = _smoothed_sigmoid(beta * (mean_c - mean_r) - gamma, eps)
    else:
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
        losses = -mean_c - beta * F.logsigmoid(log_odds)
    return losses, (beta * mean_c).detach(), (beta * mean_r).detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler's two branches); a mean
    log-prob of exactly 0 (probability 1) is nudged below 0 so the odds stay finite."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


PairLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pair_loss_closure(cfg, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                      chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                      scale: float = 1.0, nll_scale: float = 0.0,
                      weights: torch.Tensor | None = None) -> PairLossFn:
    """``fn(chosen (n,), rejected (n,), pairs (n,) int64) -> scale * losses - nll_scale * chosen``
    (n,) for a ``DPOConfig``: the per-pair loss of a micro-batch's pairs ``pairs`` (indices into
    the micro-batch, which the per-pair reference log-probs and token counts are sliced with), in
    the form a fused kernel that differentiates the loss chunk by chunk calls it. ``nll_scale``
    adds the chosen answers' NLL (``rpo_alpha`` / the step's chosen answer tokens: RPO's term,
    per pair because its normaliser is fixed for the whole step). ``weights`` (n,) multiply each
    pair's preference loss (``dpo.margin_weighting``; the NLL term is not weighted)."""
    def fn(chosen: torch.Tensor, rejected: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        def pick(t):
            return None if t is None else t[pairs]

        losses, _, _ = dpo_losses(chosen, rejected, pick(ref_chosen), pick(ref_rejected), cfg.beta,
                                  cfg.loss_type, cfg.label_smoothing, chosen_tokens=pick(chosen_tokens),
                                  rejected_tokens=pick(rejected_tokens), simpo_gamma=cfg.simpo_gamma)
        if weights is not None:
            losses = losses * weights[pairs]
        return losses * scale - nll_scale * chosen if nll_scale else losses * scale

    return fn
