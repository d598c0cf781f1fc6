import math

import pytest
import torch

from fastdpo.training.config import DPOConfig, PreferenceDatasetConfig, TrainingConfig
from fastdpo.training.losses import dpo_losses

# policy chosen / rejected, reference chosen / rejected (sequence log-probs)
PC, PR, RC, RR = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0]), torch.tensor([-11.0, -4.0]), \
    torch.tensor([-11.5, -2.5])
BETA = 0.5
# margins z = (pc - rc) - (pr - rr): pair 0: 1 - (-0.5) = 1.5 ; pair 1: 1 - 0.5 = 0.5
Z = [1.5, 0.5]


def softplus(x):
    return math.log1p(math.exp(x))


def test_sigmoid_is_ln2_when_policy_equals_reference():
    lp = torch.tensor([-7.0, -3.25, -100.0])
    losses, rc, rr = dpo_losses(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert (rc == 0).all() and (rr == 0).all()
    smoothed, _, _ = dpo_losses(lp, lp - 1, lp, lp - 1, beta=0.1, label_smoothing=0.2)
    assert torch.allclose(smoothed, torch.full((3,), math.log(2)))


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_sigmoid_matches_formula(ls):
    losses, rc, rr = dpo_losses(PC, PR, RC, RR, beta=BETA, label_smoothing=ls)
    want = [(1 - ls) * softplus(-BETA * z) + ls * softplus(BETA * z) for z in Z]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    assert rc.tolist() == pytest.approx([0.5, 0.5]) and rr.tolist() == pytest.approx([-0.25, 0.25])


def test_ipo_and_hinge_match_formulas():
    ipo, _, _ = dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(z - 1 / (2 * BETA)) ** 2 for z in Z])   # 0.25, 0.25
    hinge, _, _ = dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - BETA * z) for z in Z])   # 0.25, 0.75
    big, _, _ = dpo_losses(PC, PR - 10, RC, RR, beta=BETA, loss_type="hinge")
    assert big.tolist() == [0.0, 0.0]


def test_reference_free_uses_zero_reference():
    a, rc, _ = dpo_losses(PC, PR, None, None, beta=BETA)
    b, _, _ = dpo_losses(PC, PR, torch.zeros(2), torch.zeros(2), beta=BETA)
    assert torch.equal(a, b) and rc.tolist() == pytest.approx((BETA * PC).tolist())
    assert DPOConfig(reference_free=True).reference == "none"
    assert DPOConfig(reference="none").reference_free


def test_gradient_weight_is_sigma_of_minus_beta_z():
    pc = PC.clone().requires_grad_()
    losses, _, _ = dpo_losses(pc, PR, RC, RR, beta=BETA)
    losses.sum().backward()
    want = [-BETA / (1 + math.exp(BETA * z)) for z in Z]
    assert pc.grad.tolist() == pytest.approx(want, rel=1e-6)


def test_seed_api_names_work(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    tc = TrainingConfig(run_name="dpo-hh", dataset_name="Anthropic/hh-rlhf", tokenizer_name="gpt2",
                        output_dir=tmp_path / "experiments", batch_size=16, micro_batch_size=1,
                        gradient_accumulation_steps=16, learning_rate=5e-6, max_steps=2000, warmup_steps=50,
                        weight_decay=0.01, save_every=500, log_every=25, mixed_precision="bf16",
                        eval_every=200)
    assert tc.run_dir == tmp_path / "experiments" / "dpo-hh"
    dc = DPOConfig(beta=0.1, max_length=512, label_smoothing=0.0)
    assert dc.loss_type == "sigmoid" and dc.rpo_alpha == 0.0
    pc = PreferenceDatasetConfig(dataset_name=str(tmp_path), split="train")
    assert pc.paths == [data]
    with pytest.raises(ValueError, match="not a local file"):
        PreferenceDatasetConfig(dataset_name="Anthropic/hh-rlhf", split="train")
    with pytest.raises(ValueError, match="batch_size 8 != micro_batch_size 2 x gradient_accumulation"):
        TrainingConfig(batch_size=8, micro_batch_size=2, gradient_accumulation_steps=2)
