"""``fastdpo demo --quick``: every phase runs and leaves a well-formed artifact (no accuracy claims:
the quick model is barely trained)."""
import json
import math

import pytest

from fastdpo.demo.config import load_demo_config

PHASES = ["task", "tokenizer", "sft", "mine", "audit", "sft_chosen", "dpo", "dpo_nll", "eval", "report"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import os
    old = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        # The CI smoke test is the real command line, in-process.
        from fastdpo.cli import main
        assert main(["demo", "--quick", "--out", str(out)]) == 0
    finally:
        if old is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = old
    return out, json.loads((out / "summary.json").read_text())


def test_every_phase_ran_and_is_reported(quick):
    out, summary = quick
    on_disk = json.loads((out / "summary.json").read_text())
    assert [r["phase"] for r in on_disk["phases"]] == PHASES
    for r in on_disk["phases"]:
        assert r["seconds"] > 0 and r["peak_mem_mb"] > 0 and r["count"] > 0, r
    for phase in PHASES:
        assert phase in on_disk["report"]
    assert on_disk["quick"] is True and on_disk["headline"] == "dpo_nll"


def test_data_and_tokenizer_artifacts(quick):
    out, summary = quick
    sft = [json.loads(ln) for ln in (out / "data" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == summary["data"]["sft"] and {"prompt", "response"} <= set(sft[0])
    ev_lines = (out / "data" / "eval_prompts.jsonl").read_text().splitlines()
    ev = [json.loads(ln)["instruction"] for ln in ev_lines]
    assert not set(ev) & {r["prompt"] for r in sft}
    from fastdpo.models.tokenizer import Tokenizer
    assert Tokenizer.load(out / "tokenizer.json").vocab_size == summary["tokenizer"]["vocab_size"]


def test_checkpoints_load_and_pairs_are_well_formed(quick):
    out, summary = quick
    from fastdpo.models.checkpoint import load_checkpoint
    for name in ["sft", "sft_chosen", "dpo", "dpo_nll"]:
        model, _ = load_checkpoint(summary["checkpoints"][name])
        assert model.config.vocab_size == summary["tokenizer"]["vocab_size"]
        assert (out / name / "metrics.jsonl").stat().st_size > 0
    pairs = [json.loads(ln) for ln in open(summary["mining"]["pairs_path"])]
    assert len(pairs) == summary["mining"]["pairs"] >= 1
    for p in pairs:
        assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} <= set(p)
        assert p["score_chosen"] > p["score_rejected"]


def test_dpo_started_at_ln2_and_logged_curves(quick):
    out, summary = quick
    for arm in ("dpo", "dpo_nll"):
        rows = [json.loads(ln) for ln in (out / arm / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["split"] == "train"]
        assert train and all(k in train[0] for k in ("loss", "rewards/margins", "rewards/accuracies"))
        first = train[0]
        assert first["step"] == 1   # quick mode logs every step: this is the policy == reference step
        assert abs(first["loss/dpo"] - math.log(2)) < 1e-3
        alpha = summary["config"]["arms"][arm].get("rpo_alpha", 0.0)
        assert first["loss"] == pytest.approx(first["loss/dpo"] + alpha * first["loss/nll_chosen"], rel=1e-6)
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_eval_results_are_consistent(quick):
    out, summary = quick
    n = summary["data"]["eval"]
    for arm in ("sft_chosen", "dpo", "dpo_nll"):
        r = summary["results"][arm]
        assert r["win"] + r["tie"] + r["loss"] == n
        for k in ("accuracy_t07", "content_t07", "habit_t07"):
            assert 0.0 <= r[k] <= 1.0
        assert r["accuracy_t07"] <= r["content_t07"]
        report = json.loads((out / arm / "eval.json").read_text())
        assert report["compare"]["win"] == r["win"] and len(report["items"]) == n
    assert 0.0 <= summary["results"]["sft"]["greedy"]["accuracy"] <= 1.0


def test_report_shows_the_audit_of_the_mined_pairs_and_the_alarms(quick):
    out, summary = quick
    audit = json.loads((out / "audit.json").read_text())
    assert audit["rows"] == summary["audit"]["rows"] >= summary["mining"]["pairs"]
    assert summary["audit"]["length_unit"] == "tokens"
    assert (out / "audit.png").read_bytes()[:4] == b"\x89PNG"
    assert "== audit of the mined pairs" in summary["report"] and "near-identical pairs" in summary["report"]
    assert "== health alarms during training" in summary["report"]
    for arm in ("sft_chosen", "dpo", "dpo_nll"):
        rows = [json.loads(ln) for ln in (out / arm / "metrics.jsonl").read_text().splitlines()]
        heldout = [r for r in rows if r["split"] == "heldout"]
        assert heldout[0]["step"] == 0 and len(heldout) >= 2 and "score" in heldout[0]
        assert summary["alarms"][arm] == [r for r in rows if r["split"] == "alarm"]
        for a in summary["alarms"][arm]:
            assert f"{arm}: step {a['step']}: {a['message']}" in summary["report"]


def test_wandb_offline_run_written(quick):
    out, summary = quick
    run_dir = summary["artifacts"]["wandb"]
    assert run_dir and "offline-run" in run_dir
    assert any(p.suffix == ".wandb" for p in (out / "wandb").rglob("*"))


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text("seed: 0\ntask: {}\n")
    with pytest.raises(ValueError, match="section 'tokenizer'"):
        load_demo_config(bad)
    cfg = load_demo_config()
    cfg["headline"] = "nope"
    with pytest.raises(ValueError, match="headline 'nope'"):
        load_demo_config(cfg)
    cfg = load_demo_config()
    cfg["task"]["habit_rate"] = 2
    with pytest.raises(ValueError, match="habit_rate"):
        load_demo_config(cfg)
    cfg = load_demo_config()
    cfg["tyop"] = 1
    with pytest.raises(ValueError, match="unknown key 'tyop'"):
        load_demo_config(cfg)


def test_cli_help_lists_demo(capsys):
    from fastdpo.cli import main
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--quick" in capsys.readouterr().out
