"""Per-block gradient checkpointing: the same gradients as the plain run (dropout included), the
blocks really run twice, the fused lm_head path is untouched, and no-grad passes skip it."""
import pytest
import torch

from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.recompute import set_gradient_checkpointing
from fastdpo.training.batches import TokenizedPair
from fastdpo.training.config import DPOConfig, TrainingConfig
from fastdpo.training.dpo import DPOTask, prepare_dpo

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(dropout=0.1):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=61, block_size=40, n_layer=3, n_head=2, n_embd=32, dropout=dropout))


def pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(1, 61, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [TokenizedPair(seq(2, 8), seq(1, 9), seq(1, 9)) for _ in range(n)]


def count_block_calls(model):
    calls = []
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_checkpointed_gradients_equal_the_plain_run(shared_prompt):
    ps = pairs()
    ref = torch.randn(len(ps), 2, generator=torch.Generator().manual_seed(1)) - 30
    grads, losses, calls = [], [], []
    for on in (False, True):
        model = tiny().train()
        set_gradient_checkpointing(model, on)
        seen = count_block_calls(model)
        task = DPOTask(model, ps, [], DPOConfig(beta=0.2, rpo_alpha=0.3, shared_prompt=shared_prompt),
                       pad_id=0, device=torch.device("cpu"), ref_train=ref)
        torch.manual_seed(7)   # the same dropout masks in both runs
        idx = list(range(len(ps)))
        loss, _ = task.loss(idx, task.step_norm([idx]))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
        calls.append(len(seen))
    assert calls == [3, 6]             # each block ran again in backward
    assert torch.equal(losses[0], losses[1])
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-6, atol=1e-8), name


def test_no_grad_and_eval_passes_are_not_checkpointed():
    model = tiny()
    set_gradient_checkpointing(model, True)
    seen = count_block_calls(model)
    ids = torch.randint(1, 61, (2, 9))
    with torch.no_grad():
        model.train()(ids)
    model.eval()(ids).sum().backward()
    assert len(seen) == 6              # 3 blocks x 2 passes, none recomputed


def test_trainer_setting_trains_the_same_weights():
    ps = pairs(16, seed=3)
    states = []
    for on in (False, True):
        tc = TrainingConfig(output_dir="/tmp/unused", batch_size=8, micro_batch_size=4, learning_rate=1e-2,
                            max_steps=3, log_every=0, mixed_precision="fp32", wandb="disabled",
                            progress=False, device="cpu", seed=5, gradient_checkpointing=on)
        model = tiny(dropout=0.0)
        trainer = prepare_dpo(model, ps, [], tc, DPOConfig(reference="model"), pad_id=0)
        assert model.gradient_checkpointing is on
        trainer.train()
        states.append(model.state_dict())
    for name, w in states[0].items():
        assert torch.allclose(w, states[1][name], rtol=1e-5, atol=1e-6), name


def test_a_model_without_the_switch_is_refused():
    with pytest.raises(ValueError, match="does not support"):
        set_gradient_checkpointing(torch.nn.Linear(2, 2), True)
