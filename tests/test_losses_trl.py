"""fastdpo's preference losses against TRL's own code on identical log-probs (runs where ``trl`` is
installed; it is in the ``dev`` extra).

TRL computes its DPO losses inside ``DPOTrainer._compute_loss`` from a model's per-token log-probs,
so the test drives that method with a stand-in trainer and a stand-in model whose per-token
log-probs sum to the chosen numbers. SimPO is ``CPOTrainer.cpo_loss`` (``loss_type="simpo"``) and
ORPO's odds-ratio term is ``ORPOTrainer.odds_ratio_loss``, both on mean per-token log-probs."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fastdpo.training.losses import dpo_losses

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

g = torch.Generator().manual_seed(0)
B = 5
PC, PR = -20 * torch.rand(B, generator=g, dtype=torch.float64) - 1, -20 * torch.rand(B, generator=g,
                                                                                     dtype=torch.float64) - 1
RC, RR = PC + torch.randn(B, generator=g, dtype=torch.float64), PR + torch.randn(B, generator=g,
                                                                                 dtype=torch.float64)
NC, NR = torch.tensor([3, 7, 1, 12, 5]), torch.tensor([9, 2, 4, 6, 1])


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t,
                           unwrap_model=lambda m: m)


def trl_dpo(loss_type, beta, eps):
    """TRL's per-pair losses (one pair per call) and its logged rewards, from our numbers."""
    losses, rewards = [], []
    for i in range(B):
        T = 2 + int(max(NC[i], NR[i]))            # prompt of 2 tokens, then the answer
        completion = torch.zeros(2, T, dtype=torch.long)
        completion[0, 2:2 + NC[i]] = 1
        completion[1, 2:2 + NR[i]] = 1
        per_token = torch.zeros(2, T - 1, dtype=torch.float64)
        per_token[0, 1], per_token[1, 1] = PC[i], PR[i]   # all of each answer's log-prob on one token
        zeros = torch.zeros(2, T - 1)
        out = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
        trainer = SimpleNamespace(
            model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
            ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
            loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
            _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
        inputs = {"input_ids": torch.ones(2, T, dtype=torch.long), "attention_mask": torch.ones(2, T),
                  "completion_mask": completion, "ref_chosen_logps": RC[i:i + 1],
                  "ref_rejected_logps": RR[i:i + 1]}
        losses.append(float(DPOTrainer._compute_loss(trainer, lambda out=out, **kw: out, inputs, False)))
        m = trainer._metrics["train"]
        rewards.append((m["rewards/chosen"][0], m["rewards/rejected"][0]))
    return losses, rewards


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid_norm", 0.0), ("robust", 0.2),
                                           ("hinge", 0.0), ("ipo", 0.0), ("apo_zero", 0.0)])
def test_dpo_losses_agree_with_trl(loss_type, eps):
    beta = 0.3
    ours, rc, rr = dpo_losses(PC, PR, RC, RR, beta, loss_type, eps, chosen_tokens=NC, rejected_tokens=NR)
    theirs, rewards = trl_dpo(loss_type, beta, eps)
    assert ours.tolist() == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    assert [x for pair in zip(rc.tolist(), rr.tolist()) for x in pair] == pytest.approx(
        [x for pair in rewards for x in pair], rel=1e-5)


def test_ipo_sum_is_trl_ipo_before_length_normalisation():
    """``ipo_sum`` is TRL's IPO with every answer one token long (no normalisation)."""
    ones = torch.ones(B, dtype=torch.long)
    ours, _, _ = dpo_losses(PC, PR, RC, RR, 0.3, "ipo_sum")
    same, _, _ = dpo_losses(PC, PR, RC, RR, 0.3, "ipo", chosen_tokens=ones, rejected_tokens=ones)
    assert torch.equal(ours, same)


def test_simpo_agrees_with_trl_cpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    beta, gamma, eps = 2.0, 0.8, 0.1
    ours, rc, rr = dpo_losses(PC, PR, None, None, beta, "simpo", eps, chosen_tokens=NC, rejected_tokens=NR,
                              simpo_gamma=gamma)
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps,
                              accelerator=_accelerator())
    theirs, trc, trr = CPOTrainer.cpo_loss(trainer, PC / NC, PR / NR)
    assert ours.tolist() == pytest.approx(theirs.tolist(), rel=1e-5)
    assert rc.tolist() == pytest.approx(trc.tolist(), rel=1e-5) and rr.tolist() == pytest.approx(trr.tolist())


def test_orpo_agrees_with_trl_odds_ratio_term():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    beta = 0.25
    ours, rc, _ = dpo_losses(PC, PR, None, None, beta, "orpo", chosen_tokens=NC, rejected_tokens=NR)
    trainer = SimpleNamespace(beta=beta, accelerator=_accelerator())
    ratio_losses, trc, _, _, _ = ORPOTrainer.odds_ratio_loss(trainer, PC / NC, PR / NR)
    # TRL: loss = NLL - mean(beta * log s(log odds)); ours per pair: chosen answer's mean NLL - that term
    assert ours.tolist() == pytest.approx((-PC / NC - ratio_losses).tolist(), rel=1e-5)
    assert rc.tolist() == pytest.approx(trc.tolist(), rel=1e-5)
