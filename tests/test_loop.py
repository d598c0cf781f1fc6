"""The online DPO loop: the quality gate and its retries, per-round artifacts and report, refusal to
mix configurations, and a run killed at several points (SIGKILL) ending with the artifacts of an
uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.errors import ConfigError
from fastdpo.generation.judge import JudgeStats, make_judge
from fastdpo.generation.online_loop import LoopConfig, attempt_configs, gate, run_loop
from fastdpo.training.config import DPOConfig, TrainingConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_JUDGE = '''
def score(instruction, response):
    """Deterministic stand-in for a real judge: spreads scores over 1-10."""
    return 1 + (len(response) * 7 + len(instruction)) % 10
'''
WORDS = "fox dog elk gnu hen ink jam kit owl pig ant bee".split()
FAULTS = Path(__file__).parent / "faults"
# a gate every candidate passes (the toy judge's verdicts are arbitrary): the kill test needs
# both rounds promoted, whatever the candidates answer
OPEN_GATE = dict(min_win_rate=0.0, max_score_drop=10.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop")
    ckpt = make_tiny_checkpoint(d / "tiny", block_size=96, stop_logit=3.0)
    (d / "toyjudge.py").write_text(TOY_JUDGE)
    prompts, evals = d / "prompts.jsonl", d / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Reverse the words: {w} cat {i}"}) + "\n"
                               for i, w in enumerate(WORDS)))
    evals.write_text("".join(json.dumps({"prompt": f"Sort the words: {w} sun"}) + "\n" for w in WORDS[:6]))
    sys.path.insert(0, str(d))
    yield dict(dir=d, ckpt=ckpt, prompts=prompts, evals=evals)
    sys.path.remove(str(d))


def _configs(out: Path):
    tc = TrainingConfig(batch_size=2, max_steps=3, learning_rate=1e-3, wandb="disabled", report_to=["none"],
                        progress=False, device="cpu", mixed_precision="fp32", output_dir=out)
    return tc, DPOConfig(beta=0.1, max_length=96, max_prompt_length=80)


def _loop(setup, **kw) -> LoopConfig:
    base = dict(rounds=2, prompts=setup["prompts"], prompts_per_round=6, eval_prompts=setup["evals"],
                max_new_tokens=12, mine_batch_size=3, eval_batch_size=8, temps=[0.7, 1.3, 1.6], seed=3)
    return LoopConfig(**{**base, **kw})


def test_gate_rules():
    loop = LoopConfig(prompts=Path("p"), eval_prompts=Path("e"), min_win_rate=0.6, max_score_drop=0.1)

    def report(win, loss, a, b):
        return {"compare": {"win_rate_decided": win / (win + loss) if win + loss else None},
                "score": {"mean_a": a, "mean_b": b}}

    assert gate(report(6, 4, 7.0, 7.0), loop)["passed"]
    g = gate(report(5, 5, 7.0, 7.0), loop)
    assert not g["passed"] and "win rate among decided 0.500 < 0.6" in g["reasons"][0]
    g = gate(report(9, 1, 6.8, 7.0), loop)
    assert not g["passed"] and "held-out score fell by 0.200" in g["reasons"][0]
    assert not gate(report(0, 0, 7.0, 7.0), loop)["passed"]     # all ties: no evidence
    open_gate = LoopConfig(prompts=Path("p"), eval_prompts=Path("e"), min_win_rate=0.0)
    assert gate(report(0, 0, 7.0, 7.0), open_gate)["passed"]


def test_judge_stats_since_an_evaluation_began():
    stats = JudgeStats(requests=4, errors={"timeout": 1}, samples=["x"])
    before = stats.as_dict()
    stats.requests, stats.errors, stats.samples = 10, {"timeout": 3, "HTTP 500": 1}, ["x", "y"]
    since = stats.since(before)
    assert (since["requests"], since["errors"], since["samples"]) == (6, {"timeout": 2, "HTTP 500": 1}, ["y"])


def test_retry_adjustment_and_settings_errors(tmp_path):
    loop = LoopConfig(prompts=Path("p"), eval_prompts=Path("e"), beta_factor=2.0, steps_factor=0.5)
    tc, dc = _configs(tmp_path)
    tc1, dc1 = attempt_configs(tc, dc, loop, 1)
    tc2, dc2 = attempt_configs(tc, dc, loop, 2)
    assert (tc1.max_steps, dc1.beta, tc2.max_steps, dc2.beta) == (2, 0.2, 1, 0.4)
    tc_ep = TrainingConfig(batch_size=2, epochs=4.0)
    assert attempt_configs(tc_ep, dc, loop, 1)[0].epochs == 2.0
    with pytest.raises(ConfigError, match="reference must be one of"):
        LoopConfig(prompts=Path("p"), eval_prompts=Path("e"), reference="other")
    with pytest.raises(ConfigError, match="eval_prompts"):
        LoopConfig(prompts=Path("p"))
    with pytest.raises(ConfigError, match="prompt pool"):
        LoopConfig(eval_prompts=Path("e"))


def test_failed_gate_retries_with_the_adjustment_then_stops(setup, tmp_path):
    out = tmp_path / "loop"
    tc, dc = _configs(out)
    loop = _loop(setup, min_win_rate=1.0, max_retries=1)   # nothing wins every decided prompt here
    report = run_loop(setup["ckpt"], out, make_judge("toyjudge:score"), loop, tc, dc, progress=False,
                      say=lambda *a, **k: None)
    r1 = report["rounds"][0]
    assert report["stopped_at"] == 1 and len(report["rounds"]) == 1 and not r1["promoted"]
    assert [a["beta"] for a in r1["attempts"]] == [0.1, 0.2]
    assert [a["max_steps"] for a in r1["attempts"]] == [3, 2]
    assert report["policy"] == str(setup["ckpt"])          # the policy did not change
    assert (out / "round-1" / "attempt-1" / "final").is_dir() and not (out / "round-1" / "final").exists()
    steps = [json.loads((out / "round-1" / f"attempt-{j}" / "final" / "config.json").read_text())["step"]
             for j in (0, 1)]
    assert steps == [3, 2]                                  # the retry really trained fewer steps


def test_on_fail_continue_keeps_the_policy_and_mines_the_next_slice(setup, tmp_path):
    out = tmp_path / "loop"
    tc, dc = _configs(out)
    loop = _loop(setup, min_win_rate=1.0, max_retries=0, on_fail="continue", prompts_per_round=8)
    report = run_loop(setup["ckpt"], out, make_judge("toyjudge:score"), loop, tc, dc, progress=False,
                      say=lambda *a, **k: None)
    assert [r["promoted"] for r in report["rounds"]] == [False, False] and report["stopped_at"] is None
    assert report["policy"] == str(setup["ckpt"])
    pool = [json.loads(x)["prompt"] for x in setup["prompts"].read_text().splitlines()]
    mined = [{json.loads(x)["prompt"] for x in (out / f"round-{k}" / "pairs.jsonl").read_text().splitlines()}
             for k in (1, 2)]
    assert mined[0] and mined[1]
    assert mined[0] <= set(pool[:8]) and mined[1] <= set(pool[8:] + pool[:4])   # the pool wraps around


def test_rounds_write_their_artifacts_and_report(setup, tmp_path):
    out = tmp_path / "loop"
    tc, dc = _configs(out)
    given = tmp_path / "given.jsonl"
    seen = []
    loop = _loop(setup, **OPEN_GATE, reference="sft")
    report = run_loop(setup["ckpt"], out, make_judge("toyjudge:score"), loop, tc, dc, progress=False,
                      say=lambda *a, **k: None, on_round=lambda k, r: seen.append(k))
    assert seen == [1, 2] and report["stopped_at"] is None
    for k in (1, 2):
        rd = out / f"round-{k}"
        assert (rd / "pairs.jsonl").stat().st_size > 0 and (rd / "final" / "model.safetensors").is_file()
        ev = json.loads((rd / "eval.json").read_text())
        assert ev["promoted"] and ev["attempts"][0]["checkpoint"] == "attempt-0/final"
        assert set(ev["attempts"][0]["vs_previous"]) >= {"win", "tie", "loss", "accuracy_a", "avg_tokens_a"}
    # round 2 trained from round 1's policy against the SFT reference
    cfg2 = json.loads((out / "round-2" / "final" / "config.json").read_text())
    assert cfg2["config"]["dpo"]["reference_checkpoint"] == str(setup["ckpt"])
    assert cfg2["config"]["sft_checkpoint"] == str(out / "round-1" / "final")
    assert (out / "round-2" / "attempt-0" / "eval_vs_sft.json").is_file()
    assert report["policy"] == str(out / "round-2" / "final")
    assert [r["round"] for r in report["table"]] == [0, 1, 2]
    assert (out / "report.png").stat().st_size > 0 and "| 2 | promoted |" in (out / "report.md").read_text()
    # the same directory with other settings is refused; a given data set replaces mining
    with pytest.raises(ConfigError, match="other settings"):
        run_loop(setup["ckpt"], out, make_judge("toyjudge:score"), _loop(setup, seed=9), tc, dc,
                 progress=False, say=lambda *a, **k: None)
    given.write_bytes((out / "round-1" / "pairs.jsonl").read_bytes())
    out2 = tmp_path / "given"
    run_loop(setup["ckpt"], out2, make_judge("toyjudge:score"), _loop(setup, **OPEN_GATE, rounds=1,
             datasets=[given]), *_configs(out2), progress=False, say=lambda *a, **k: None)
    assert (out2 / "round-1" / "pairs.jsonl").read_bytes() == given.read_bytes()
    assert not (out2 / "round-1" / "mined.json").exists()


def _run_cli(setup, out: Path, fault: str | None = None):
    cmd = [sys.executable, "-m", "fastdpo.cli", "loop", "--sft-checkpoint", str(setup["ckpt"]),
           "--out", str(out), "--prompts", str(setup["prompts"]), "--eval-prompts", str(setup["evals"]),
           "--rounds", "2", "--prompts-per-round", "6", "--judge", "toyjudge:score", "--max-new-tokens", "12",
           "--batch-size", "3", "--temps", "0.7,1.3,1.6", "--seed", "3", "--min-win-rate", "0",
           "--max-score-drop", "10", "--device", "cpu", "--no-progress",
           "--set", "train.max_steps=3", "--set", "train.batch_size=2", "--set", "train.learning_rate=1e-3",
           "--set", "train.wandb=disabled", "--set", "train.report_to=[none]",
           "--set", "train.mixed_precision=fp32", "--set", "dpo.max_length=96",
           "--set", "dpo.max_prompt_length=80"]
    path = os.pathsep.join([str(setup["dir"]), str(FAULTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("FASTDPO_FAULT", None)
    if fault:
        env["FASTDPO_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=setup["dir"])


ARTIFACTS = ("round-{k}/pairs.jsonl", "round-{k}/final/model.safetensors", "round-{k}/eval.json",
             "round-{k}/attempt-0/eval_vs_prev.json")


def test_kills_at_every_step_then_rerun_end_with_the_uninterrupted_artifacts(setup, tmp_path):
    """One run killed five times in a row, at a different step each time (mid-mining of round 2,
    before round 2's checkpoint is saved, between its two evaluations, between its decision and
    its promotion), then run to the end: its artifacts equal an uninterrupted run's, byte for byte."""
    ref = tmp_path / "ref"
    done = _run_cli(setup, ref)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed"
    kills = ["kill-call:fastdpo.generation.mining_progress:ProgressLog.commit:3:before",  # round 2 mining
             "kill-call:fastdpo.training.loop:Trainer.finish:1:before",      # round 2 trained, not saved
             "kill-call:fastdpo.generation.online_loop:_eval:1:after",       # vs previous written, not vs SFT
             "kill-call:fastdpo.generation.online_loop:_promote:2:before"]   # decided, not promoted
    for fault in kills:
        run = _run_cli(setup, out, fault)
        assert run.returncode == -signal.SIGKILL, (fault, run.stdout[-2000:], run.stderr[-2000:])
    assert (out / "round-2" / "eval.json").is_file() and not (out / "round-2" / "final").exists()
    final = _run_cli(setup, out)
    assert final.returncode == 0, final.stderr
    for k in (1, 2):
        for name in ARTIFACTS:
            a, b = ref / name.format(k=k), out / name.format(k=k)
            assert a.read_bytes() == b.read_bytes(), name.format(k=k)
    assert "| 2 | promoted |" in final.stdout


def test_demo_rounds_runs_the_loop_and_the_same_budget_ablation(tmp_path):
    """``fastdpo demo --quick --rounds 2`` (a batch of one pair, so that the barely trained model's
    few pairs train): both arms ran, the ablation within the loop's pairs budget (the SFT model's
    answers may give fewer usable pairs than the loop's later policies; the report then says so),
    and the figures are written."""
    import yaml

    from fastdpo.demo.config import DEFAULT_CONFIG
    from fastdpo.demo.pipeline import run_demo
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["quick"]["arms"][cfg["headline"]]["batch_size"] = 1
    summary = run_demo(cfg, quick=True, out=tmp_path / "demo", rounds=2, progress=False)
    r = summary["rounds"]
    assert r["pairs_budget"] == sum(x["pairs"] for x in r["rounds"]) > 0
    assert 0 < r["one_round"]["pairs"] <= r["pairs_budget"]
    same = r["one_round"]["pairs"] == r["pairs_budget"]
    assert ("for one round with the same" in summary["rounds"]["text"]) == same
    assert ("gave fewer than the loop's" in summary["rounds"]["text"]) == (not same)
    assert r["accuracy_t07_sft"] is not None and r["one_round"]["accuracy_t07"] is not None
    assert {"content_t07", "chatty_t07"} <= set(r["rounds"][0]) & set(r["one_round"]) & set(r["sft_rates"])
    root = tmp_path / "demo" / "rounds"
    assert (root / "rounds.png").stat().st_size > 0 and (root / "loop" / "report.md").is_file()
    assert (root / "one_round" / "round-1" / "final").is_dir()
    assert "for one round with" in summary["report"] and {p["phase"] for p in summary["phases"]} >= {
        "sft", "loop", "one_round"}


def test_rounds_report_says_when_the_ablation_found_fewer_pairs_than_the_budget():
    """The loop's pairs budget is a ceiling for the one-round ablation: when the SFT model's answers
    gave fewer pairs, the report names both counts instead of claiming the same budget."""
    from fastdpo.demo.rounds import format_rounds

    def summary(one_pairs):
        row = {"round": 1, "promoted": True, "pairs": 5, "pairs_per_min": 10.0, "accuracy_t07": 0.5,
               "win_rate_vs_previous": 0.6, "seconds": {"mine": 1.0, "train": 2.0, "eval": 3.0}}
        return {"rounds": [row], "accuracy_t07_sft": 0.4, "accuracy_t07_loop": 0.5, "pairs_budget": 5,
                "one_round": {"accuracy_t07": 0.45, "pairs": one_pairs,
                              "seconds": {"mine": 1.0, "train": 2.0, "eval": 3.0}},
                "loop_gain_over_one_round_points": 5.0}
    assert "for one round with the same 5 pairs: +5.0 points" in format_rounds(summary(5))
    fewer = format_rounds(summary(4))
    assert ("for one round with 4 pairs (the SFT model's answers over the pool gave fewer than the "
            "loop's 5)") in fewer
    assert "with the same" not in fewer
