"""Health alarms: each check fires on its condition (once, until it clears), and a deliberately
over-trained DPO run raises the repetition / length alarms on held-out answers while a sane run
raises none."""
import json
import random

import pytest
import torch

from fastdpo.cli import main
from fastdpo.generation.heldout import HeldoutProbe
from fastdpo.models.gpt import GPTConfig
from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.config import (
    DPOConfig,
    HealthConfig,
    PreferenceDatasetConfig,
    SFTConfig,
    SFTDatasetConfig,
    TrainingConfig,
    load_config,
)
from fastdpo.training.dpo import run_dpo
from fastdpo.training.health import HealthMonitor, repetition_stats
from fastdpo.training.sft import run_sft

pytestmark = pytest.mark.usefixtures("one_thread")


def test_repetition_stats_by_hand():
    s = repetition_stats([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6]])
    # 4-grams of the first: 1234 2341 3412 4123 1234 -> 1 repeat of 5; the second has none
    assert s["repeat_4"] == pytest.approx(1 / 5)
    # bigrams: 12 23 34 41 12 23 34 | 56 -> 5 distinct of 8
    assert s["distinct_2"] == pytest.approx(5 / 8)
    assert s["length"] == 5.0
    assert repetition_stats([[7], [8]]) == {"length": 1.0, "repeat_4": 0.0, "distinct_2": None}


def names(alarms):
    return [a.name for a in alarms]


def test_metric_alarms_fire_once_per_run():
    m = HealthMonitor(HealthConfig())
    row = dict(loss=0.6, grad_norm=1.0)
    assert names(m.check_metrics({**row, "loss/nll_chosen": 1.0, "rewards/margins": 0.0}, "train")) == []
    assert names(m.check_metrics({**row, "loss/nll_chosen": 1.4, "rewards/margins": 0.5}, "train")) == []
    assert names(m.check_metrics({**row, "loss/nll_chosen": 1.6, "rewards/margins": 0.5}, "train")) == \
        ["likelihood_displacement"]
    assert names(m.check_metrics({**row, "loss/nll_chosen": 1.7, "rewards/margins": 0.6}, "train")) == []
    assert names(m.check_metrics({**row, "loss/nll_chosen": 1.1, "rewards/margins": 0.7}, "train")) == []
    assert names(m.check_metrics({**row, "loss/nll_chosen": 1.7, "rewards/margins": 0.8}, "train")) == []
    # the chosen NLL rising while the margin shrinks is not displacement
    m = HealthMonitor(HealthConfig())
    m.check_metrics({"loss/nll_chosen": 1.0, "rewards/margins": 0.2}, "train")
    assert names(m.check_metrics({"loss/nll_chosen": 2.0, "rewards/margins": 0.1}, "train")) == []
    assert names(m.check_metrics({"rewards/margins": 10.5}, "train")) == ["margin_blowup"]
    m = HealthMonitor(HealthConfig(grad_norm_spike=10))
    for g in (1.0, 1.2, 0.8):
        assert names(m.check_metrics({"grad_norm": g}, "train")) == []
    assert names(m.check_metrics({"grad_norm": 11.0}, "train")) == ["grad_norm_spike"]
    assert names(m.check_metrics({"grad_norm": 9.0}, "train")) == []
    off = HealthMonitor(HealthConfig(enabled=False))
    assert names(off.check_metrics({"rewards/margins": 99.0}, "train")) == []


def test_heldout_alarms_against_the_reference():
    m = HealthMonitor(HealthConfig())
    m._reference = {"length": 10.0, "repeat_4": 0.05, "distinct_2": 0.5}
    ok = {"length": 14.0, "repeat_4": 0.1, "distinct_2": 0.4}
    assert names(m.check_evaluation(ok)) == []
    assert names(m.check_evaluation({**ok, "length": 16.0})) == ["length_drift"]
    assert names(m.check_evaluation({**ok, "length": 3.0})) == []                 # fired already: quiet
    m = HealthMonitor(HealthConfig())
    m._reference = {"length": 10.0, "repeat_4": 0.05, "distinct_2": 0.5}
    assert names(m.check_evaluation({**ok, "length": 4.0})) == ["length_drift"]   # shorter counts too
    assert names(m.check_evaluation({**ok, "repeat_4": 0.25})) == ["repetition"]
    m = HealthMonitor(HealthConfig())
    m._reference = {"length": 10.0, "repeat_4": 0.05, "distinct_2": 0.5}
    assert names(m.check_evaluation({**ok, "distinct_2": 0.2})) == ["repetition"]


def test_reward_hacking_needs_the_held_out_signal_down_and_the_train_reward_up():
    m = HealthMonitor(HealthConfig(hacking_drop=0.1))
    for acc, margin, expect in ((0.90, 0.5, []), (0.85, 0.8, []), (0.70, 1.2, ["reward_hacking"]),
                                (0.60, 1.5, [])):                    # fired already: no second warning
        m.check_metrics({"rewards/margins": margin}, "train")
        m.check_metrics({"rewards/accuracies": acc}, "val")
        assert names(m.check_evaluation(None)) == expect
    m = HealthMonitor(HealthConfig(hacking_drop=0.1))
    for acc, margin in ((0.9, 1.0), (0.7, 0.5)):     # held-out down, but the train reward fell too
        m.check_metrics({"rewards/margins": margin}, "train")
        m.check_metrics({"rewards/accuracies": acc}, "val")
        assert names(m.check_evaluation(None)) == []
    # with a judge: the reference's score (margin 0) is the first best
    m = HealthMonitor(HealthConfig())
    m._reference = {"length": 5.0, "repeat_4": 0.0, "distinct_2": 0.5, "score": 8.0}
    m.check_metrics({"rewards/margins": 0.4}, "train")
    assert names(m.check_evaluation({"length": 5.0, "repeat_4": 0.0, "distinct_2": 0.5, "score": 6.5})) == \
        ["reward_hacking"]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny model SFT-trained to answer 'add a b' with the sum: short, clean greedy answers."""
    d = tmp_path_factory.mktemp("health")
    rng = random.Random(0)
    qa = [(f"add {a} {b}", str(a + b)) for a in range(10, 60) for b in range(10, 20)]
    rng.shuffle(qa)
    tok = Tokenizer.train([f"{q} = {a}" for q, a in qa], vocab_size=300)
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n"
                                         for q, a in qa[:400]))
    torch.manual_seed(0)
    ckpt = run_sft(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64),
                   TrainingConfig(run_name="sft", output_dir=d, batch_size=32, learning_rate=3e-3,
                                  max_steps=150, warmup_steps=10, log_every=50, mixed_precision="fp32",
                                  progress=False, device="cpu", report_to=["none"]),
                   SFTConfig(max_length=64, max_prompt_length=64), SFTDatasetConfig(path=d / "sft.jsonl"),
                   tok)
    pairs = [{"prompt": q, "chosen": a, "rejected": str(int(a) + 1)} for q, a in qa[400:408]]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return d, tok, ckpt, [q for q, _ in qa[420:452]]


def dpo_run(sft, name, lr, steps, **kw):
    d, tok, ckpt, heldout = sft
    run_dpo(ckpt, TrainingConfig(run_name=name, output_dir=d, batch_size=8, learning_rate=lr, max_steps=steps,
                                 log_every=2, eval_every=max(1, steps // 4), mixed_precision="fp32",
                                 progress=False, device="cpu", report_to=["none"], **kw),
            DPOConfig(max_length=16, max_prompt_length=32), PreferenceDatasetConfig(path=d / "pairs.jsonl"),
            tok, heldout_probe=HeldoutProbe(heldout, max_new_tokens=24))
    return [json.loads(ln) for ln in (d / name / "metrics.jsonl").read_text().splitlines()]


def test_over_trained_run_raises_repetition_or_length_alarms_and_a_sane_run_none(sft):
    over = dpo_run(sft, "over", lr=1e-2, steps=40)        # 40 epochs of 8 pairs at a high learning rate
    alarms = {r["alarm"] for r in over if r["split"] == "alarm"}
    assert alarms & {"repetition", "length_drift"}, alarms
    heldout = [r for r in over if r["split"] == "heldout"]
    assert heldout[0]["step"] == 0 and heldout[-1]["step"] == 40     # the reference, then each evaluation
    assert max(r["repeat_4"] for r in heldout[1:]) > heldout[0]["repeat_4"] + 0.15 \
        or max(r["length"] for r in heldout[1:]) > 1.5 * heldout[0]["length"]
    sane = dpo_run(sft, "sane", lr=1e-5, steps=4)
    assert [r for r in sane if r["split"] == "alarm"] == []
    assert len([r for r in sane if r["split"] == "heldout"]) == 5


def test_resumed_run_reads_the_reference_back(sft):
    d = sft[0]
    first = dpo_run(sft, "resumed", lr=1e-2, steps=4, save_every=2)
    ref = next(r for r in first if r["split"] == "heldout")
    (d / "resumed" / "final").rename(d / "resumed" / "old-final")
    m = HealthMonitor(HealthConfig(), probe=lambda *a: {"answers": [[1, 2]]})

    class Trainer:   # what on_start reads from a trainer resumed at step 2
        state, run_dir, parallel = type("S", (), {"step": 2}), d / "resumed", None

    assert m.on_start(Trainer) == []
    assert m._reference == {k: v for k, v in ref.items() if k not in ("step", "split")}


def test_cli_train_answers_the_val_prompts_by_default(sft, tmp_path):
    d, _, ckpt, _ = sft
    assert main(["train", "--sft-checkpoint", str(ckpt), "--set", f"data.path=[{d / 'pairs.jsonl'}]",
                 "--set", "data.val_size=4", "--set", f"train.output_dir={tmp_path}",
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.device=cpu",
                 "--set", "train.progress=false",
                 "--set", "health.max_new_tokens=8", "--report-to", "none"]) == 0
    rows = [json.loads(ln) for ln in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "heldout"] == [0, 2]
    cfg = load_config(None, ["health.n_prompts=0", "health.length_drift=0.3"])["health"]
    assert cfg.length_drift == 0.3 and HeldoutProbe.from_config(cfg) is None
    with pytest.raises(ValueError, match="HealthConfig.max_margin must be >= 0"):
        load_config(None, ["health.max_margin=-1"])
