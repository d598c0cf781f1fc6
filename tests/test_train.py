import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from fastdpo import runtime
from fastdpo.models.checkpoint import load_checkpoint, save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.batches import TokenizedPair, collate_pairs, tokenize_pairs
from fastdpo.training.config import DPOConfig, PreferenceDatasetConfig, TrainingConfig
from fastdpo.training.data import DataStats, load_examples
from fastdpo.training.dpo import DPOTask, choose_reference, prepare_dpo, reference_layout_shared, run_dpo
from fastdpo.training.logprobs import pair_logprobs, sequence_logprobs
from fastdpo.training.loop import TrainingDiverged
from fastdpo.training.reference_cache import cache_key, cached_reference_logprobs, compute_reference_logprobs
from fastdpo.training.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    words = "what is plus the answer yes no good bad maybe 0123456789 + = ?"
    return Tokenizer.train([words] * 30, vocab_size=320)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tok):
    """A tiny SFT checkpoint and a separable preference set: the chosen answer is always the
    correct sum, the rejected one the sum followed by ' bad'."""
    d = tmp_path_factory.mktemp("dpo")
    for name, dropout in (("sft", 0.0), ("sft_dropout", 0.1)):   # dropout: resume must restore the RNG
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32,
                              dropout=dropout))
        save_checkpoint(d / name, model, tokenizer=tok)
    rows = [{"prompt": f"what is {a}+{b}?", "chosen": f"{a + b}", "rejected": f"{a + b} bad",
             "score_chosen": 9} for a in range(10, 30) for b in range(3)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def cfgs(workdir, run, **train):
    base = dict(run_name=run, output_dir=workdir / "runs", batch_size=8, micro_batch_size=4,
                learning_rate=2e-3, max_steps=6, log_every=1, mixed_precision="fp32", wandb="disabled",
                progress=False, seed=3, device="cpu")
    return TrainingConfig(**{**base, **train})


def data_cfg(workdir, **kw):
    return PreferenceDatasetConfig(path=workdir / "pairs.jsonl", **kw)


def metrics(run_dir: Path, split="train"):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["split"] == split]


def weights(path):
    return load_checkpoint(path)[0].state_dict()


@pytest.mark.parametrize("reference", ["cached", "model"])
def test_step0_loss_is_ln2_and_separable_set_is_learned(workdir, tok, reference):
    tc = cfgs(workdir, f"learn-{reference}", max_steps=16, warmup_steps=2)
    final = run_dpo(workdir / "sft", tc, DPOConfig(beta=0.5, reference=reference), data_cfg(workdir), tok)
    m = metrics(tc.run_dir)
    assert m[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)   # policy == reference at step 1
    assert m[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert m[-1]["rewards/accuracies"] >= 0.9
    assert m[-1]["rewards/margins"] > 10 * max(abs(m[0]["rewards/margins"]), 1e-3)
    assert m[-1]["loss"] < 0.6
    assert final == tc.run_dir / "final" and (final / "trainer_state.pt").is_file()
    assert (tc.run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"   # loss, margin, accuracy
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["step"] == 16 and cfg["kind"] == "dpo" and cfg["config"]["dpo"]["beta"] == 0.5


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_fused_kernel_and_oracle_give_same_loss_and_grads(workdir, tok, shared_prompt):
    pairs = tokenize_pairs(load_examples([workdir / "pairs.jsonl"]), tok, 32, 32, 48, DataStats())[:8]
    results = []
    ref = torch.randn(len(pairs), 2, generator=torch.Generator().manual_seed(0)) - 20   # differs from policy
    for kernel in ("auto", "oracle"):
        model = load_checkpoint(workdir / "sft")[0]
        task = DPOTask(model, pairs, [], DPOConfig(beta=0.3, rpo_alpha=0.5, shared_prompt=shared_prompt),
                       pad_id=tok.pad_id, device=torch.device("cpu"), kernel=kernel, ref_train=ref)
        idx = list(range(8))
        loss, _ = task.loss(idx, task.step_norm([idx]))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=1e-4, atol=1e-6), name


def test_shared_prompt_rows_equal_separate_rows(workdir, tok):
    """The packed layout (prompt once, both answers behind it) gives the seed layout's log-probs
    and gradients: same contexts, same positions, only fewer tokens."""
    pairs = tokenize_pairs(load_examples([workdir / "pairs.jsonl"]), tok, 32, 32, 48, DataStats())
    pairs = [pairs[0], pairs[5], pairs[-1]]
    pairs.append(type(pairs[0])(pairs[0].prompt[:1], pairs[0].chosen, pairs[0].rejected))   # 1-token prompt
    out = []
    for shared in (True, False):
        model = load_checkpoint(workdir / "sft")[0]
        c, r = pair_logprobs(model, pairs, pad_id=tok.pad_id, device="cpu", shared_prompt=shared)
        (c.sum() - 2 * r.sum()).backward()
        out.append((c.detach(), r.detach(), [p.grad for p in model.parameters()]))
    (c1, r1, g1), (c2, r2, g2) = out
    assert torch.allclose(c1, c2, atol=1e-4) and torch.allclose(r1, r2, atol=1e-4)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    packed = sum(p.packed_length for p in pairs)
    assert packed < sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def test_multi_process_reference_uses_the_policys_separate_rows(workdir, tok, monkeypatch):
    """Under torchrun the wrapped policy takes separate rows: the reference (per step, or cached and
    keyed on its layout) must use the same layout, not the packed one."""
    import fastdpo.training.dpo as train_module

    pairs = tokenize_pairs(load_examples([workdir / "pairs.jsonl"]), tok, 32, 32, 48, DataStats())
    model = load_checkpoint(workdir / "sft")[0]
    task = DPOTask(model, pairs, [], DPOConfig(reference="model"), pad_id=tok.pad_id,
                   device=torch.device("cpu"), ref_model=load_checkpoint(workdir / "sft")[0])
    task.bind_policy(model)        # what the Trainer does with its DDP/FSDP2 wrapper
    layouts = []
    real = train_module.pair_rows
    monkeypatch.setattr(train_module, "pair_rows",
                        lambda pairs, pad_id, device, shared, *rest: layouts.append(shared) or real(
                            pairs, pad_id, device, shared, *rest))
    task.loss([0, 1], task.step_norm([[0, 1]]))
    assert layouts == [False]   # one set of rows: the reference's and the policy's
    assert reference_layout_shared(DPOConfig())
    monkeypatch.setattr(runtime, "world_size", lambda: 2)
    assert not reference_layout_shared(DPOConfig())   # the cache is computed and keyed that way


def test_rpo_alpha_adds_mean_token_nll_of_chosen(workdir, tok):
    pairs = tokenize_pairs(load_examples([workdir / "pairs.jsonl"]), tok, 32, 32, 48, DataStats())[:6]
    model = load_checkpoint(workdir / "sft")[0].eval()
    ref = torch.zeros(len(pairs), 2)
    idx = list(range(6))
    losses = {}
    for alpha in (0.0, 0.7):
        task = DPOTask(model, pairs, [], DPOConfig(beta=0.1, rpo_alpha=alpha), pad_id=tok.pad_id,
                       device=torch.device("cpu"), ref_train=ref)
        losses[alpha] = task.loss(idx, task.step_norm([idx]))[0].item()
    ids, mask = collate_pairs(pairs, tok.pad_id)
    logits = model(ids)[:6, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:6, 1:], reduction="none")
    want = (nll * mask[:6, 1:]).sum() / mask[:6, 1:].sum()
    assert losses[0.7] - losses[0.0] == pytest.approx(0.7 * want.item(), rel=1e-4)


def test_resume_is_bit_identical(workdir, tok):
    dc = DPOConfig(beta=0.2, rpo_alpha=0.3)
    sft = workdir / "sft_dropout"
    straight = run_dpo(sft, cfgs(workdir, "straight"), dc, data_cfg(workdir), tok)

    def stop_after_3(trainer, step):
        if step == 3:
            raise KeyboardInterrupt   # a crash right after the step-3 checkpoint was written

    tc = cfgs(workdir, "resumed", save_every=3)
    with pytest.raises(KeyboardInterrupt):
        run_dpo(sft, tc, dc, data_cfg(workdir), tok, on_step=stop_after_3)
    assert not (tc.run_dir / "final").exists() and (tc.run_dir / "step-000003").is_dir()
    torch.manual_seed(12345)   # the resumed run must not depend on the RNG it starts with
    resumed = run_dpo(sft, tc, dc, data_cfg(workdir), tok, resume=True)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = weights(run_dpo(sft, cfgs(workdir, "straight", overwrite=True), dc, data_cfg(workdir), tok))
    assert all(torch.equal(a[k], again[k]) for k in a)   # one seed, one result
    assert [m["step"] for m in metrics(tc.run_dir)] == list(range(1, 7))
    assert metrics(tc.run_dir)[-1]["loss"] == metrics(workdir / "runs" / "straight")[-1]["loss"]


def test_ctrl_c_saves_and_resume_continues(workdir, tok):
    tc = cfgs(workdir, "sigint", max_steps=4)

    def interrupt(trainer, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_dpo(workdir / "sft", tc, DPOConfig(), data_cfg(workdir), tok, on_step=interrupt)
    assert json.loads((tc.run_dir / "step-000002" / "config.json").read_text())["step"] == 2
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run_dpo(workdir / "sft", tc, DPOConfig(), data_cfg(workdir), tok)
    final = run_dpo(workdir / "sft", tc, DPOConfig(), data_cfg(workdir), tok, resume=True)
    assert json.loads((final / "config.json").read_text())["step"] == 4


def test_kernel_is_validated_with_the_field_name(workdir):
    with pytest.raises(ValueError, match=r"TrainingConfig\.kernel must be one of .*'cuda'"):
        cfgs(workdir, "badbackend", kernel="cuda")


def test_keep_checkpoints_0_keeps_the_newest_until_final_and_ctrl_c_reports_it(workdir, tok, capsys):
    tc = cfgs(workdir, "keep0", save_every=2, keep_checkpoints=0, progress=True)
    seen = {}

    def record(trainer, step):
        seen[step] = sorted(p.name for p in tc.run_dir.glob("step-*"))
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_dpo(workdir / "sft", tc, DPOConfig(), data_cfg(workdir), tok, on_step=record)
    assert seen[2] == ["step-000002"] and seen[4] == ["step-000004"]
    assert f"saved {tc.run_dir / 'step-000004'}" in capsys.readouterr().out
    assert (tc.run_dir / "step-000004" / "trainer_state.pt").is_file()
    final = run_dpo(workdir / "sft", tc, DPOConfig(), data_cfg(workdir), tok, resume=True)
    assert final.is_dir() and not list(tc.run_dir.glob("step-*"))   # besides the final one: none


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(workdir, tok):
    tc = cfgs(workdir, "nan", save_every=2)

    def poison(trainer, step):
        if step == 3:
            with torch.no_grad():
                trainer.model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 4 .*last good .*step-0+2"):
        run_dpo(workdir / "sft", tc, DPOConfig(), data_cfg(workdir), tok, on_step=poison)
    assert not (tc.run_dir / "final").exists()
    assert all(torch.isfinite(v).all() for v in weights(tc.run_dir / "step-000002").values())


def test_cached_reference_logprobs_equal_recomputed(workdir, tok, tmp_path):
    pairs = tokenize_pairs(load_examples([workdir / "pairs.jsonl"]), tok, 32, 32, 48, DataStats())
    model = load_checkpoint(workdir / "sft")[0]
    def fn(m, batch):
        return pair_logprobs(m, batch, pad_id=tok.pad_id, device=torch.device("cpu"))

    kw = dict(batch_size=8, pair_logprobs_fn=fn, autocast_ctx=torch.no_grad)
    first, path, hit = cached_reference_logprobs(model, pairs, cache_dir=tmp_path, tokenizer_hash=tok.hash,
                                                 settings="fp32", **kw)
    again, path2, hit2 = cached_reference_logprobs(model, pairs, cache_dir=tmp_path, tokenizer_hash=tok.hash,
                                                   settings="fp32", **kw)
    assert not hit and hit2 and path == path2 and torch.equal(first, again)
    # one pair at a time through the naive oracle: batching and padding change nothing
    model.eval()
    for i in (0, 17, len(pairs) - 1):
        ids, mask = collate_pairs([pairs[i]], tok.pad_id)
        with torch.no_grad():
            want = sequence_logprobs(model, ids, mask, kernel="oracle")
        assert torch.allclose(first[i], want, rtol=1e-5, atol=1e-4)
    # other data or another reference is another cache entry
    _, path3, hit3 = cached_reference_logprobs(model, pairs[:-1], cache_dir=tmp_path, tokenizer_hash=tok.hash,
                                               settings="fp32", **kw)
    assert not hit3 and path3 != path
    assert torch.equal(compute_reference_logprobs(model, pairs, **kw), first)


def test_reference_cache_key_includes_the_model_config(workdir, tok):
    pairs = tokenize_pairs(load_examples([workdir / "pairs.jsonl"]), tok, 32, 32, 48, DataStats())
    model = load_checkpoint(workdir / "sft")[0]
    other = GPT(GPTConfig(**{**model.config.to_dict(), "n_head": 4}))   # same parameter shapes
    other.load_state_dict(model.state_dict())
    assert cache_key(model, pairs, tok.hash, "fp32") != cache_key(other, pairs, tok.hash, "fp32")


def test_reference_cache_settings_hold_the_resolved_backend(workdir, tok):
    """``auto`` and ``torch`` are the same kernels on CPU: one cache entry, not two (and ``auto``
    on CUDA would be another entry, since the device type and resolved backend are in the key)."""
    pairs = tokenize_pairs(load_examples([workdir / "pairs.jsonl"]), tok, 32, 32, 48, DataStats())
    cache = workdir / "ref_cache_backend"
    for backend in ("auto", "torch"):
        tc = cfgs(workdir, f"refkey-{backend}", kernel=backend)
        prepare_dpo(load_checkpoint(workdir / "sft")[0], pairs, [], tc,
                    DPOConfig(reference="cached", reference_cache_dir=cache), pad_id=tok.pad_id)
    assert len(list(cache.glob("ref-logps-*.safetensors"))) == 1


def test_beta_sweep_shares_reference_cache_and_prints_table(workdir, tok, capsys):
    tc = cfgs(workdir, "sweep", max_steps=2, progress=True)
    rows = run_sweep(workdir / "sft", tc, DPOConfig(reference="cached"), data_cfg(workdir, val_size=8), tok,
                     sweep={"beta": [0.05, 0.5]})
    out = capsys.readouterr().out
    assert out.count("reference log-probs: computed") == 1 and out.count("cache hit") == 1
    assert [r["beta"] for r in rows] == [0.05, 0.5] and rows[1]["run"] == "sweep-beta0.5"
    assert "val/accuracies" in out and "0.0500" in out
    assert "step=2 loss=" in out and "accuracy=" in out and "lr=" in out


def test_reference_free_run_needs_no_reference(workdir, tok):
    tc = cfgs(workdir, "reffree", max_steps=3)
    run_dpo(workdir / "sft", tc, DPOConfig(reference_free=True, beta=0.1), data_cfg(workdir), tok)
    m = metrics(tc.run_dir)
    # without a reference the implicit rewards are beta * log pi itself
    assert m[0]["rewards/chosen"] == pytest.approx(0.1 * m[0]["logps/chosen"], rel=1e-5)
    assert m[0]["loss/dpo"] != pytest.approx(math.log(2), abs=1e-3)


def test_prepare_dpo_runs_steps_on_in_memory_pairs(workdir, tok):
    pairs = tokenize_pairs(load_examples([workdir / "pairs.jsonl"]), tok, 32, 32, 48, DataStats())
    model = load_checkpoint(workdir / "sft")[0]
    tc = cfgs(workdir, "inmem", max_steps=100, log_every=0)
    trainer = prepare_dpo(model, pairs, [], tc, DPOConfig(reference="model"), pad_id=tok.pad_id)
    state = trainer.train(steps=3)
    assert state.step == 3 and not (tc.run_dir / "final").exists()


def _synthetic_pairs(n: int) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 300, (3 + i % 4,), generator=g).tolist() for i in range(3 * n)]
    return [TokenizedPair(ids[3 * i], ids[3 * i + 1], ids[3 * i + 2]) for i in range(n)]


def test_reference_auto_decides_on_cost_not_divisibility(workdir, tok, capsys):
    """The cached pass costs one reference forward per pair, once; the per-step reference one per
    pair visited. One epoch of 100 pairs at batch 8 visits 96 (the 4 left over sit out): cached.
    A run of a few steps keeps the reference model, unless the cache already holds the pairs."""
    one_epoch = cfgs(workdir, "auto-epoch", batch_size=8, max_steps=None, epochs=1)
    assert choose_reference(100, 0, one_epoch)[0] == "cached"
    assert choose_reference(96, 0, one_epoch)[0] == "cached"
    assert choose_reference(100, 0, cfgs(workdir, "x", batch_size=8, max_steps=12))[0] == "cached"
    assert choose_reference(100, 0, cfgs(workdir, "x", batch_size=8, max_steps=11))[0] == "model"
    assert choose_reference(100, 0, cfgs(workdir, "x", batch_size=8, max_steps=2))[0] == "model"
    two_steps = cfgs(workdir, "x", batch_size=8, max_steps=2)
    assert choose_reference(100, 0, two_steps, cache_hit=True)[0] == "cached"
    # every evaluation through the reference model costs a forward per val pair
    ten_steps = cfgs(workdir, "x", batch_size=8, max_steps=10)
    assert choose_reference(100, 40, dataclasses.replace(ten_steps, eval_every=2))[0] == "cached"
    assert choose_reference(100, 40, ten_steps)[0] == "model"

    pairs, cache = _synthetic_pairs(100), workdir / "auto-cache"
    short = cfgs(workdir, "auto-short", batch_size=8, max_steps=2)
    dc = DPOConfig(reference="auto", reference_cache_dir=cache)
    trainer = prepare_dpo(load_checkpoint(workdir / "sft")[0], pairs, [], short, dc, pad_id=tok.pad_id)
    assert trainer.task.ref_model is not None and trainer.task.ref_train is None
    assert not list(cache.glob("*.safetensors"))
    trainer = prepare_dpo(load_checkpoint(workdir / "sft")[0], pairs, [], one_epoch, dc, pad_id=tok.pad_id)
    assert trainer.task.ref_model is None and trainer.task.ref_train.shape == (100, 2)
    assert len(list(cache.glob("*.safetensors"))) == 1
    # the same short run again: the cache now holds these log-probs, so it costs nothing
    trainer = prepare_dpo(load_checkpoint(workdir / "sft")[0], pairs, [], short, dc, pad_id=tok.pad_id)
    assert trainer.task.ref_model is None
    out = capsys.readouterr().out
    assert out.count("reference: auto -> model") == 1 and out.count("reference: auto -> cached") == 2
    assert "one pass over 100 pairs vs 96 per-step reference forwards" in out
    assert "the cache already holds them" in out
