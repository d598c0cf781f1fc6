import math

import pytest
import torch

from fastdpo.training.config import LOSS_TYPES, DPOConfig, PreferenceDatasetConfig, TrainingConfig
from fastdpo.training.losses import dpo_losses, log1mexp, pair_loss_closure

# policy chosen / rejected, reference chosen / rejected (sequence log-probs)
PC, PR, RC, RR = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0]), torch.tensor([-11.0, -4.0]), \
    torch.tensor([-11.5, -2.5])
BETA = 0.5
# margins z = (pc - rc) - (pr - rr): pair 0: 1 - (-0.5) = 1.5 ; pair 1: 1 - 0.5 = 0.5
Z = [1.5, 0.5]
# answer token counts; log-ratios rho_c = [1, 1], rho_r = [-0.5, 0.5], so the length-normalised
# margins rho_c/nc - rho_r/nr are [1/2 + 1/2, 1/4 - 1/4] = [1.0, 0.0]
NC, NR = torch.tensor([2, 4]), torch.tensor([1, 2])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


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
    ipo, _, _ = dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="ipo_sum")
    assert ipo.tolist() == pytest.approx([(z - 1 / (2 * BETA)) ** 2 for z in Z])   # 0.25, 0.25
    # length-normalised: ((1.0, 0.0) - 1/(2 * 0.5))^2
    ipo, rc, _ = dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="ipo", chosen_tokens=NC, rejected_tokens=NR)
    assert ipo.tolist() == pytest.approx([0.0, 1.0])
    assert rc.tolist() == pytest.approx([0.5, 0.5])      # rewards stay beta * summed log-ratio (as TRL)
    hinge, _, _ = dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - BETA * z) for z in Z])   # 0.25, 0.75
    big, _, _ = dpo_losses(PC, PR - 10, RC, RR, beta=BETA, loss_type="hinge")
    assert big.tolist() == [0.0, 0.0]


def test_sigmoid_norm_robust_apo_zero_by_hand():
    norm, _, _ = dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="sigmoid_norm", chosen_tokens=NC,
                            rejected_tokens=NR)
    assert norm.tolist() == pytest.approx([softplus(-0.5), math.log(2)], rel=1e-6)   # 0.474077, 0.693147
    eps = 0.1
    robust, _, _ = dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="robust", label_smoothing=eps)
    want = [(0.9 * softplus(-0.75) - 0.1 * softplus(0.75)) / 0.8,       # z = 1.5
            (0.9 * softplus(-0.25) - 0.1 * softplus(0.25)) / 0.8]       # z = 0.5
    assert robust.tolist() == pytest.approx(want, rel=1e-6)
    assert want[0] == pytest.approx(0.293121, abs=1e-6)
    # 1 - s(0.5 * 1) + s(0.5 * -0.5) and 1 - s(0.5 * 1) + s(0.5 * 0.5)
    apo, _, _ = dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="apo_zero")
    assert apo.tolist() == pytest.approx([0.815364, 0.939718], abs=1e-6)


def test_simpo_and_orpo_by_hand():
    # mean log-probs: chosen -10/2 = -5 and -3/4 = -0.75; rejected -12/1 = -12 and -2/2 = -1
    simpo, rc, rr = dpo_losses(PC, PR, None, None, beta=BETA, loss_type="simpo", chosen_tokens=NC,
                               rejected_tokens=NR, simpo_gamma=0.5)
    # logits beta * (mc - mr) - gamma: 0.5 * 7 - 0.5 = 3.0 and 0.5 * 0.25 - 0.5 = -0.375
    assert simpo.tolist() == pytest.approx([softplus(-3.0), softplus(0.375)], rel=1e-6)
    assert simpo.tolist() == pytest.approx([0.048587, 0.898123], abs=1e-6)
    assert rc.tolist() == [-2.5, -0.375] and rr.tolist() == [-6.0, -0.5]   # beta * mean log-prob
    # the reference is ignored altogether
    again, _, _ = dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="simpo", chosen_tokens=NC,
                             rejected_tokens=NR)
    assert torch.equal(simpo, again)
    orpo, _, _ = dpo_losses(PC, PR, None, None, beta=BETA, loss_type="orpo", chosen_tokens=NC,
                            rejected_tokens=NR)

    def log_odds(m):
        return m - math.log(1 - math.exp(m))

    want = [-m - BETA * math.log(sigmoid(log_odds(m) - log_odds(r))) for m, r in ((-5, -12), (-0.75, -1))]
    assert orpo.tolist() == pytest.approx(want, rel=1e-6)
    # log odds -5 + 0.006761 vs -12 + 0.000006: margin 7.006755, -log s(7.006755) = 0.000905
    assert want[0] == pytest.approx(5.0 + 0.5 * 0.000905, abs=1e-6)   # chosen far likelier: ~ the NLL alone


@pytest.mark.parametrize("loss_type,at_zero", [("sigmoid", math.log(2)), ("sigmoid_norm", math.log(2)),
                                               ("robust", math.log(2)), ("hinge", 1.0), ("apo_zero", 1.0),
                                               ("ipo", 1.0), ("ipo_sum", 1.0)])
def test_value_when_policy_equals_reference(loss_type, at_zero):
    lp = torch.tensor([-7.0, -3.25, -100.0])
    eps = 0.2 if loss_type in ("sigmoid", "sigmoid_norm", "robust") else 0.0
    losses, _, _ = dpo_losses(lp, lp - 1, lp, lp - 1, beta=0.5, loss_type=loss_type, label_smoothing=eps,
                              chosen_tokens=torch.tensor([1, 2, 3]), rejected_tokens=torch.tensor([4, 5, 6]))
    assert losses.tolist() == pytest.approx([at_zero] * 3, rel=1e-6)   # ipo: 1 / (4 beta^2) = 1


def test_length_normalised_losses_need_token_counts():
    for loss_type in ("sigmoid_norm", "ipo", "simpo", "orpo"):
        with pytest.raises(ValueError, match="chosen_tokens"):
            dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type=loss_type)
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_losses(PC, PR, RC, RR, beta=BETA, loss_type="kto")


def test_log1mexp_is_accurate_at_both_ends_and_has_finite_gradients():
    x = torch.tensor([-1e-6, -0.5, -0.7, -30.0, 0.0], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    want = [math.log(-math.expm1(v)) for v in (-1e-6, -0.5, -0.7, -30.0)]
    assert y[:4].tolist() == pytest.approx(want, rel=1e-12)
    assert torch.isfinite(y).all()        # probability 1 is nudged below 1: odds stay finite
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_pair_loss_closure_is_the_per_pair_loss_of_the_picked_pairs(loss_type):
    cfg = DPOConfig(beta=BETA, loss_type=loss_type)
    full, _, _ = dpo_losses(PC, PR, RC, RR, cfg.beta, loss_type, chosen_tokens=NC, rejected_tokens=NR)
    fn = pair_loss_closure(cfg, RC, RR, NC, NR, scale=0.5)
    for pairs in ([0], [1], [1, 0]):
        idx = torch.tensor(pairs)
        assert torch.allclose(fn(PC[idx], PR[idx], idx), 0.5 * full[idx])


def test_loss_config_validation():
    assert DPOConfig(loss_type="simpo").reference == "none"
    assert DPOConfig(loss_type="orpo").reference_free
    with pytest.raises(ValueError, match="reference-free"):
        DPOConfig(loss_type="simpo", reference="cached")
    with pytest.raises(ValueError, match="label_smoothing applies"):
        DPOConfig(loss_type="hinge", label_smoothing=0.1)
    assert DPOConfig(loss_type="robust", label_smoothing=0.2).label_smoothing == 0.2
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOConfig(loss_type="kto")


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


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "simpo", "orpo"])
def test_dpo_task_passes_each_pairs_answer_token_counts(loss_type):
    from fastdpo.models.gpt import GPT, GPTConfig
    from fastdpo.training.batches import TokenizedPair
    from fastdpo.training.dpo import DPOTask
    from fastdpo.training.logprobs import pair_logprobs

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16))
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8, 9, 10]),
             TokenizedPair([1, 2], [11, 12, 13, 14], [15])]
    ref = torch.tensor([[-9.0, -20.0], [-15.0, -4.0]])
    cfg = DPOConfig(beta=0.4, loss_type=loss_type)
    task = DPOTask(model, pairs, [], cfg, pad_id=0, device=torch.device("cpu"), ref_train=ref)
    loss, stats = task.loss([0, 1], task.step_norm([[0, 1]]))
    pc, pr = pair_logprobs(model, pairs, pad_id=0, device=torch.device("cpu"))
    rc, rr = (None, None) if cfg.reference == "none" else (ref[:, 0], ref[:, 1])
    want, _, _ = dpo_losses(pc, pr, rc, rr, 0.4, loss_type, chosen_tokens=torch.tensor([2, 4]),
                            rejected_tokens=torch.tensor([5, 1]))
    assert loss.item() == pytest.approx(want.mean().item(), rel=1e-5)
    assert stats["dpo_loss"].item() == pytest.approx(want.sum().item(), rel=1e-5)
