"""``train.report_to: [tensorboard]``: event files under the run directory hold exactly the scalars
of metrics.jsonl (read back with the tensorboard library), for DPO and SFT runs."""
import json
import shutil
import sys

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator  # the dev extra installs it

from fastdpo.models.checkpoint import save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
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
from fastdpo.training.metrics import RunLogger
from fastdpo.training.sft import run_sft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tb")
    tok = Tokenizer.train(["what is plus the answer yes no bad 0123456789 + = ?"] * 30, vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(d / "sft", GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2,
                                             n_embd=32)), tokenizer=tok)
    rows = [{"prompt": f"what is {a}+{b}?", "chosen": f"{a + b}", "rejected": f"{a + b} bad"}
            for a in range(10, 30) for b in range(2)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n"
                                         for r in rows))
    return d, tok


def train_cfg(d, run, **kw):
    return TrainingConfig(**{**dict(run_name=run, output_dir=d / "runs", batch_size=8, micro_batch_size=4,
                                    learning_rate=1e-3, max_steps=6, log_every=2, eval_every=3,
                                    mixed_precision="fp32", progress=False, device="cpu",
                                    report_to=["tensorboard"]), **kw})


def assert_events_equal_metrics(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    expected = {}
    for row in rows:
        if row["split"] == "alarm":   # health alarms are text, checked below
            continue
        prefix = "" if row["split"] == "train" else f"{row['split']}/"
        for k, v in row.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                expected.setdefault(prefix + k, []).append((row["step"], v))
    assert set(acc.Tags()["scalars"]) == set(expected)
    alarms = {f"alarm/{r['alarm']}": (r["step"], r["message"]) for r in rows if r["split"] == "alarm"}
    assert {t.removesuffix("/text_summary") for t in acc.Tags()["tensors"]} == set(alarms)
    for tag, (step, message) in alarms.items():
        (event,) = acc.Tensors(tag + "/text_summary")
        assert event.step == step and event.tensor_proto.string_val[0].decode() == message
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag   # float32 on disk
    return expected


def test_dpo_event_files_hold_the_metrics_jsonl_scalars(setup):
    d, tok = setup
    run_dpo(d / "sft", train_cfg(d, "dpo"), DPOConfig(max_length=24, max_prompt_length=24),
            PreferenceDatasetConfig(path=d / "pairs.jsonl", val_size=8), tok,
            health=HealthConfig(max_margin=0.0))     # an alarm as soon as the margin is positive
    tags = assert_events_equal_metrics(d / "runs" / "dpo")
    rows = [json.loads(ln) for ln in (d / "runs" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["alarm"] for r in rows if r["split"] == "alarm"] == ["margin_blowup"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "loss", "lr", "grad_norm", "tokens/s", "val/loss",
                 "val/rewards/margins"):
        assert name in tags, name
    assert not (d / "runs" / "dpo" / "wandb").exists()    # report_to without wandb: no W&B run


def test_sft_event_files_and_resume_hides_the_discarded_steps(setup):
    d, tok = setup
    cfg = train_cfg(d, "sft", save_every=2, max_steps=4, eval_every=0)
    run_sft(d / "sft", cfg, SFTConfig(max_length=24, max_prompt_length=24),
            SFTDatasetConfig(path=d / "sft.jsonl", val_size=4), tok)
    assert_events_equal_metrics(d / "runs" / "sft")
    # resume from step 2 of a longer run: metrics.jsonl drops rows past 2, TensorBoard purges them too
    shutil.rmtree(d / "runs" / "sft" / "final")
    run_sft(d / "sft", train_cfg(d, "sft", save_every=2, max_steps=6, eval_every=0),
            SFTConfig(max_length=24, max_prompt_length=24),
            SFTDatasetConfig(path=d / "sft.jsonl", val_size=4), tok,
            resume=d / "runs" / "sft" / "step-000002")
    acc = event_accumulator.EventAccumulator(str(d / "runs" / "sft" / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == sorted(set(steps)) == [2, 4, 6]


def test_report_to_is_validated_and_the_wandb_key_still_works(tmp_path, monkeypatch):
    assert TrainingConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert TrainingConfig().report_to == ["wandb"]
    cfg = load_config(None, ["train.report_to=[wandb,tensorboard]"])["train"]
    assert cfg.report_to == ["wandb", "tensorboard"]
    with pytest.raises(ValueError, match=r"report_to\[0\] must be one of"):
        TrainingConfig(report_to=["mlflow"])
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        TrainingConfig(report_to=["none", "wandb"])
    # wandb: disabled keeps W&B off even when report_to names it; report_to: none keeps it off too
    for kw in (dict(mode="disabled", report_to=["wandb"]), dict(mode="offline", report_to=["none"])):
        logger = RunLogger(tmp_path / "r", **kw)
        assert logger._wandb is None and logger._tensorboard is None
        logger.close()


def test_missing_tensorboard_is_one_line_naming_the_extra(setup, monkeypatch, capsys):
    d, _ = setup
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails as if not installed
    with pytest.raises(ValueError, match=r"pip install 'fastdpo\[tensorboard\]'"):
        RunLogger(d / "r", report_to=["tensorboard"])
    from fastdpo.cli import main
    assert main(["sft", "--init", str(d / "sft"), "--set", f"data.path=[{d / 'sft.jsonl'}]",
                 "--set", f"train.output_dir={d / 'cli'}", "--set", "train.max_steps=1",
                 "--set", "train.device=cpu", "--report-to", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastdpo sft: error: train.report_to includes 'tensorboard'")
    assert "fastdpo[tensorboard]" in err and len(err.splitlines()) == 1
