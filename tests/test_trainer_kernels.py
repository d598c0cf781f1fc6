"""The kernels on the trainer's paths, proved without a GPU.

- The whole training loop runs with ``kernel: triton`` (the Triton kernels under the interpreter:
  tests/conftest.py sets TRITON_INTERPRET=1) and ends where ``kernel: torch`` does: DPO with cached
  reference log-probs in both batch layouts with ``rpo_alpha``, and SFT; a launch spy on the kernel
  objects' own ``run`` shows which kernels ran, also for the reference pass and evaluation.
- The gradient-in-forward step (``linear_pair_loss``) equals autograd through the whole step's
  batch, across accumulated micro-batches.
- A training step on the CUDA code path reads nothing on the host (``host_syncs.HostSyncs``; the
  three places that branch on "host reads are free on CPU" are switched to their CUDA behaviour),
  and its NaN/Inf guard skips a non-finite update on the device.
"""
import argparse

import pytest
import torch
from host_syncs import HostSyncs

from fastdpo import kernels
from fastdpo.cli import build_parser
from fastdpo.kernels import linear_logprob, logprob, reference
from fastdpo.models import kv_cache
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.training.batches import TokenizedPair, TokenizedSFT, collate_pairs
from fastdpo.training.config import DPOConfig, TrainingConfig
from fastdpo.training.dpo import DPOTask, prepare_dpo
from fastdpo.training.loop import Task, Trainer, TrainingDiverged
from fastdpo.training.losses import dpo_losses
from fastdpo.training.sft import SFTTask

pytestmark = pytest.mark.usefixtures("one_thread")
needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not installed")
CPU = torch.device("cpu")
V = 67   # odd: the vocabulary is not a multiple of any tile


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=16))


def make_pairs(n: int, seed: int = 1) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(1, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [TokenizedPair(ids(2, 6), ids(1, 6), ids(1, 6)) for _ in range(n)]


def train_cfg(tmp_path, kernel: str, **kw) -> TrainingConfig:
    base = dict(run_name="run", output_dir=tmp_path, batch_size=4, micro_batch_size=2, learning_rate=1e-3,
                max_steps=3, log_every=1, mixed_precision="fp32", wandb="disabled", report_to="none",
                progress=False, device="cpu", kernel=kernel)
    return TrainingConfig(**{**base, **kw})


def make_task(kind: str, model, kernel: str, shared: bool = True, **dpo):
    pairs = make_pairs(8)
    if kind == "sft":
        return SFTTask(model, [TokenizedSFT(p.prompt, p.chosen) for p in pairs], [], pad_id=0, device=CPU,
                       kernel=kernel)
    ref = torch.randn(len(pairs), 2, generator=torch.Generator().manual_seed(2)) - 15   # not the policy's
    cfg = DPOConfig(**{"beta": 0.3, "rpo_alpha": 0.5, "shared_prompt": shared, **dpo})
    return DPOTask(model, pairs, [], cfg, pad_id=0, device=CPU, kernel=kernel, ref_train=ref)


def train(tmp_path, kind: str, kernel: str, shared: bool = True):
    """(logged train metrics, each step's gradients, final weights) of a 3-step run."""
    model = tiny_model()
    trainer = Trainer(model, make_task(kind, model, kernel, shared), train_cfg(tmp_path / kernel, kernel),
                      device=CPU, precision="fp32")
    grads, step = [], trainer.optimizer.step

    def record_then_step(*a, **k):
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        return step(*a, **k)

    trainer.optimizer.step = record_then_step
    history = trainer.train().history
    return history, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def launches(monkeypatch):
    """Every Triton kernel launch: the spy replaces ``run`` of the kernel objects' class (what
    ``kernel[grid](...)`` calls: ``JITFunction``, or the interpreter's ``InterpretedFunction``)."""
    seen = []
    launcher = type(linear_logprob._logits_kernel)
    real = launcher.run

    def run(kernel, *args, **kw):
        seen.append((kernel.fn.__name__, kw.get("STATS"), kw.get("OUT")))
        return real(kernel, *args, **kw)

    monkeypatch.setattr(launcher, "run", run)
    return seen


FUSED = [("_logits_kernel", True, 1), ("_dlogits_kernel", None, None), ("_grad_hidden_kernel", None, None),
         ("_grad_weight_kernel", None, None)]        # linear_pair_loss: logits kept, dlogits, 2 GEMMs
RECOMPUTE = [("_logits_kernel", True, 0), ("_logits_kernel", False, 2), ("_grad_hidden_kernel", None, None),
             ("_grad_weight_kernel", None, None)]    # linear_sequence_logprobs: stats, then dlogits
LOGPROBS = [("_logits_kernel", True, 0)]             # no gradient: the statistics pass only


@needs_triton
@pytest.mark.parametrize("kind,shared", [("dpo", True), ("dpo", False), ("sft", True)],
                         ids=["dpo-packed", "dpo-separate", "sft"])
def test_the_training_loop_runs_triton_and_ends_where_torch_does(tmp_path, launches, kind, shared):
    h_torch, g_torch, w_torch = train(tmp_path, kind, "torch", shared)
    assert launches == []                             # the torch path launches nothing
    h_triton, g_triton, w_triton = train(tmp_path, kind, "triton", shared)
    assert set(launches) == set(FUSED if kind == "dpo" else RECOMPUTE)
    assert len(h_triton) == len(h_torch) == 3
    for a, b in zip(h_torch, h_triton):
        for key in a:
            if isinstance(a[key], float) and key != "tokens/s":
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for step_torch, step_triton in zip(g_torch, g_triton):
        for name, g in step_torch.items():
            torch.testing.assert_close(step_triton[name], g, rtol=1e-5, atol=1e-7, msg=name)
    for name, w in w_torch.items():    # 3 AdamW steps of lr 1e-3 moved them ~3e-3
        torch.testing.assert_close(w_triton[name], w, rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(w, tiny_model().state_dict()[n]) for n, w in w_triton.items())


@needs_triton
def test_reference_pass_and_evaluation_run_triton(tmp_path, launches):
    """prepare_dpo's cached reference pass and the trainer's evaluation score with the log-prob
    kernel (statistics only: no gradient), the training step with the fused pair kernels."""
    pairs = make_pairs(10)
    cfg = train_cfg(tmp_path, "triton", max_steps=1)
    trainer = prepare_dpo(tiny_model(), pairs[:8], pairs[8:], cfg, DPOConfig(reference="cached"), pad_id=0,
                          say=lambda *a, **k: None)
    assert trainer.task.ref_model is None and set(launches) == set(LOGPROBS)   # the reference pass
    launches.clear()
    trainer.evaluate()
    assert set(launches) == set(LOGPROBS)
    launches.clear()
    trainer.train()
    assert set(launches) == set(FUSED)


@pytest.mark.parametrize("shared", [True, False], ids=["packed", "separate"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_gradient_in_forward_equals_autograd_over_the_whole_step(tmp_path, shared, loss_type):
    """One optimizer step of 2 accumulated micro-batches through the fused pair loss (and through
    the recompute op) has the gradient of the whole step's loss, RPO term normalised by all the
    step's chosen tokens, computed by autograd through the oracle's full logits."""
    grads = {}
    for fused in (True, False):
        model = tiny_model()
        task = make_task("dpo", model, "torch", shared, loss_type=loss_type)
        task.gradient_in_forward = fused
        cfg = train_cfg(tmp_path, "torch", max_steps=1, max_grad_norm=0)   # no clipping
        trainer = Trainer(model, task, cfg, device=CPU, precision="fp32")
        micro = trainer.micro_batches(0)
        trainer.optimizer.step = lambda *a, **k: None   # keep the gradient
        trainer.optimizer.zero_grad = lambda *a, **k: None
        trainer.train_step({})
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model = tiny_model()
    pairs = [task.train[i] for idx in micro for i in idx]
    ids, mask = collate_pairs(pairs, 0)
    lp = reference.sequence_logprobs(model(ids), ids, mask)
    n = len(pairs)
    ref = task.ref_train[[i for idx in micro for i in idx]]
    nc = torch.tensor([len(p.chosen) for p in pairs])
    nr = torch.tensor([len(p.rejected) for p in pairs])
    losses, _, _ = dpo_losses(lp[:n], lp[n:], ref[:, 0], ref[:, 1], 0.3, loss_type, chosen_tokens=nc,
                              rejected_tokens=nr)
    (losses.mean() - 0.5 * lp[:n].sum() / nc.sum()).backward()
    for name, p in model.named_parameters():
        for fused in (True, False):
            torch.testing.assert_close(grads[fused][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- no host syncs


@pytest.fixture
def cuda_path(monkeypatch):
    """The CUDA behaviour of the code that reads device values on the host only where that is
    free: the kernels' id-range check and the models' position check assert on the device, and
    the trainer's NaN/Inf guard is the device-side one (set on each Trainer)."""
    monkeypatch.setattr(logprob, "range_check_on_host", lambda device: False)
    monkeypatch.setattr(kv_cache, "position_check_on_host", lambda device: False)


@needs_triton
@pytest.mark.parametrize("case", ["dpo-packed-cached", "dpo-separate-reference-model", "sft"])
def test_a_cuda_training_step_reads_nothing_on_the_host(tmp_path, cuda_path, monkeypatch, case):
    kind, model = case.split("-")[0], tiny_model()
    task = make_task(kind, model, "triton", shared="packed" in case)
    if "reference-model" in case:
        task.ref_model, task.ref_train = tiny_model().eval(), None
    trainer = Trainer(model, task, train_cfg(tmp_path, "triton", log_every=3), device=CPU, precision="fp32")
    trainer.device_side_guard = True
    trainer.train_step({})       # step 1: also warms up (the epoch's batches are built on the host once)
    w0 = [p.detach().clone() for p in model.parameters()]
    with HostSyncs(monkeypatch) as spy:
        trainer.train_step({})   # step 2: not a log step
    assert spy.calls == []
    assert any(not torch.equal(a, p) for a, p in zip(w0, model.parameters()))   # it did train


def test_the_spy_sees_host_reads_but_not_kernel_launches(monkeypatch, cuda_path):
    t = torch.arange(4.0)
    with HostSyncs(monkeypatch) as spy:
        t.sum().item(), bool(t[0]), float(t[1]), t.tolist(), t.nonzero(), t[t > 1], torch.unique(t)
        t.repeat_interleave(torch.tensor([1, 2, 1, 1]))
        t[torch.tensor([0, 2])], t.cumsum(0), torch.where(t > 1, t, 0)   # none of these
    assert len(spy.calls) == 8, spy.calls
    if kernels.HAS_TRITON:
        with HostSyncs(monkeypatch) as spy:
            kernels.linear_sequence_logprobs(torch.randn(1, 4, 8), torch.randn(V, 8), torch.ones(1, 4).long(),
                                             torch.ones(1, 4), backend="triton")
        assert spy.calls == []   # the interpreter reads the kernels' arguments: not counted


class _Quadratic(Task):
    """A tiny task whose step ``poison_step`` has an infinite loss and NaN gradients."""
    n_train, lengths = 4, [1, 1, 1, 1]

    def __init__(self, model, poison_step):
        self.model, self.poison_step, self.calls = model, poison_step, 0

    def step_norm(self, micro_batches, train=True):
        return {"n": sum(len(i) for i in micro_batches)}

    def loss(self, idx, norm, train=True):
        self.calls += 1
        x = torch.arange(len(idx) * 3, dtype=torch.float32).view(len(idx), 3)
        loss = self.model(x).pow(2).sum() / norm["n"]
        if self.calls == self.poison_step:
            loss = loss * float("inf")
        return loss, {"loss": loss.detach()}

    def summarize(self, sums):
        return {"loss": float(sums["loss"])}

    def n_tokens(self, idx, train=True):
        return len(idx)


def test_device_side_guard_skips_a_non_finite_update_without_a_host_read(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cfg = train_cfg(tmp_path, "torch", batch_size=2, micro_batch_size=2, max_steps=4, log_every=3)
    trainer = Trainer(model, _Quadratic(model, poison_step=2), cfg, device=CPU, precision="fp32")
    assert not trainer.device_side_guard          # CPU: the host check, at every step
    trainer.device_side_guard = True              # the CUDA code path, forced
    trainer.train_step({})
    weights = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(trainer.optimizer.state.values())}
    with HostSyncs(monkeypatch) as spy:
        grad_norm = trainer.train_step({})        # step 2: inf loss, NaN gradients, not a log step
    assert spy.calls == [] and not torch.isfinite(grad_norm)
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    for i, s in enumerate(trainer.optimizer.state.values()):
        assert all(torch.equal(v, state[i][k]) for k, v in s.items())   # moments and step count too
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 2 .*skipped .*stopped at step 3"):
        trainer.train_step({})                    # step 3: the log step reads the flag
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_host_guard_stops_a_cpu_run_before_the_update(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cfg = train_cfg(tmp_path, "torch", batch_size=2, micro_batch_size=2, max_steps=4, log_every=3)
    trainer = Trainer(model, _Quadratic(model, poison_step=1), cfg, device=CPU, precision="fp32")
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 1 .*stopped before updating"):
        trainer.train_step({})
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))


def test_id_and_position_checks_assert_on_the_device_off_cpu(cuda_path, monkeypatch):
    hidden, weight = torch.randn(2, 5, 8), torch.randn(V, 8)
    ids, mask = torch.randint(0, V, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    config = tiny_model().config
    with HostSyncs(monkeypatch) as spy:
        linear_logprob.check_linear_inputs(hidden, weight, ids, [mask])
        kv_cache.checked_positions(ids, torch.arange(5).expand(2, 5), None, config)
    assert spy.calls == []
    ids[1, 3] = V
    bad_id = r"ids contains a token id outside the vocabulary \[0, 67\)"
    with pytest.raises(RuntimeError, match=bad_id):
        kernels.linear_sequence_logprobs(hidden, weight, ids, mask, backend="torch")
    with pytest.raises(RuntimeError, match=bad_id):
        kernels.sequence_logprobs(hidden @ weight.T, ids, mask, backend="torch")
    with pytest.raises(RuntimeError, match="a position exceeds block_size 32"):
        kv_cache.checked_positions(ids, torch.tensor([[0, 1, 2, 3, 32]] * 2), None, config)


def test_every_subcommand_that_takes_a_device_defaults_to_auto():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    with_device = {name for name, p in sub.choices.items()
                   if any(a.dest == "device" for a in p._actions)}
    assert {"pairs", "eval", "serve", "label"} <= with_device
    for name in with_device:
        default = next(a.default for a in sub.choices[name]._actions if a.dest == "device")
        assert default == "auto", name
    assert TrainingConfig().device == "auto"    # sft and train: train.device in their configs
