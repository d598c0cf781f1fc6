"""Benchmark-format evaluation: MT-Bench (multi-turn) and AlpacaEval files evaluate end to end with a
module:fn judge; the length-controlled win rate equals a hand computation; eval reports length and
repetition for both sides."""
import json
import math

import pytest
import torch

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.cli import main
from fastdpo.generation import benchmarks
from fastdpo.generation.evaluate import evaluate
from fastdpo.generation.judge import JudgeError, ProgrammaticJudge
from fastdpo.generation.win_rates import length_controlled_win_rate
from fastdpo.models.checkpoint import load_policy, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def logit(p):
    return math.log(p / (1 - p))


def test_length_controlled_win_rate_by_hand():
    # Two length differences, +40 and -40 characters: the model is saturated, so the fitted
    # preferences equal each group's mean and theta0 = (logit p+ + logit p-) / 2 (x = +-tanh(1)).
    outcomes = ["win"] * 4 + ["loss"] + ["win"] * 2 + ["loss"] * 3
    len_a = [140] * 5 + [100] * 5
    len_b = [100] * 5 + [140] * 5
    lc = length_controlled_win_rate(outcomes, len_a, len_b)
    assert lc == pytest.approx(sigmoid((logit(0.8) + logit(0.4)) / 2), abs=1e-6)
    assert lc == pytest.approx(math.sqrt(8 / 3) / (1 + math.sqrt(8 / 3)), abs=1e-6)   # 0.6202, raw 0.6
    # ties count half; unequal group sizes (the covariate is still +-t)
    outcomes = ["win"] * 4 + ["tie"] * 2 + ["loss", "tie"]
    lc = length_controlled_win_rate(outcomes, [30] * 6 + [10] * 2, [10] * 6 + [30] * 2)
    assert lc == pytest.approx(sigmoid((logit(5 / 6) + logit(1 / 4)) / 2), abs=1e-6)
    # no length difference: the raw rate; one side always wins: the rate tends to 1
    assert length_controlled_win_rate(["win", "tie", "loss", "win"], [5] * 4, [5] * 4) == pytest.approx(0.625)
    assert length_controlled_win_rate(["win"] * 6, [1, 2, 3, 4, 5, 6], [3] * 6) > 0.999
    assert length_controlled_win_rate([], [], []) is None


MTBENCH = [
    {"question_id": 81, "category": "writing",
     "turns": ["Write a haiku about dogs.", "Now make it about cats."]},
    {"question_id": 82, "category": "writing", "turns": ["Sort: fox elk gnu.", "Reverse that order."]},
    {"question_id": 101, "category": "reasoning", "turns": ["Count the words: a b c.", "And now: a b."]},
    {"question_id": 102, "category": "reasoning", "turns": ["Is 7 prime?"]},
]
ALPACA = [
    {"instruction": "Sort the words", "input": "owl ant bee", "dataset": "helpful_base",
     "output": "ant bee owl"},
    {"instruction": "Name a color.", "input": "", "dataset": "koala"},
    {"instruction": "Add 2 and 3.", "dataset": "koala"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    a = make_tiny_checkpoint(d / "a", block_size=128, seed=0)
    model, tok = load_policy(a)
    with torch.no_grad():   # same tokenizer, other weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    b = save_checkpoint(d / "b", model, tokenizer=tok)
    (d / "mt_bench.jsonl").write_text("".join(json.dumps(q) + "\n" for q in MTBENCH))
    (d / "alpaca_eval.json").write_text(json.dumps(ALPACA, indent=2))
    (d / "benchjudge.py").write_text("def score(instruction, response):\n"
                                     "    return min(10, 1 + len(response) // 4)\n")
    return d, a, b


def longer(instruction, response):
    return min(10, 1 + len(response) // 4)


def test_mtbench_answers_turn_by_turn_and_judges_every_turn(setup, monkeypatch):
    d, a, b = setup
    model_a, tok = load_policy(a)
    model_b, _ = load_policy(b)
    seen = []
    real = benchmarks.generate

    def spy(model, tokenizer, prompts, **kw):
        out = real(model, tokenizer, prompts, **kw)
        seen.append((model, [list(p) for p in prompts], out))
        return out

    monkeypatch.setattr(benchmarks, "generate", spy)
    judge = ProgrammaticJudge(longer, name="longer")
    r = evaluate(model_a, model_b, tok, d / "mt_bench.jsonl", judge, mode="both", max_new_tokens=12,
                 batch_size=4, progress=False, report_path=d / "mt.json")
    assert r["format"] == "mtbench" and r["n_questions"] == 4 and r["n_prompts"] == 7
    turn2 = [it for it in r["items"] if it["turn"] == 2]
    assert [it["question_id"] for it in turn2] == ["81", "82", "101"]
    # turn 2 continues each side's own conversation: question 1, its own answer, question 2
    for side, model in (("a", model_a), ("b", model_b)):
        (_, prompts, _), = [s for s in seen[2:] if s[0] is model]
        for it, prompt in zip(turn2, prompts):
            first = next(x for x in r["items"] if x["question_id"] == it["question_id"] and x["turn"] == 1)
            q1 = next(q for q in MTBENCH if str(q["question_id"]) == it["question_id"])["turns"]
            assert prompt == tok.render_conversation([("user", q1[0]), ("assistant", first[side]),
                                                      ("user", q1[1])])
    assert "Write a haiku about dogs." in turn2[0]["instruction"]
    assert turn2[0]["instruction"].endswith("Now make it about cats.")
    # every turn judged, position-swapped, by the module:fn-style scoring judge
    for it in r["items"]:
        sa, sb = longer(it["instruction"], it["a"]), longer(it["instruction"], it["b"])
        assert it["outcome"] == ("win" if sa > sb else "loss" if sb > sa else "tie")
        assert (it["score_a"], it["score_b"]) == (sa, sb)
    cats = r["categories"]
    assert list(cats) == ["writing", "reasoning"]
    assert cats["writing"]["n"] == 4 and cats["reasoning"]["n"] == 3
    for c in cats.values():
        assert c["win_rate_ties_half"] == pytest.approx((c["win"] + c["tie"] / 2) / c["n"])
    assert r["turns"]["1"]["n"] == 4 and r["turns"]["2"]["n"] == 3
    outcomes = [it["outcome"] for it in r["items"]]
    assert r["compare"]["length_controlled_win_rate"] == pytest.approx(length_controlled_win_rate(
        outcomes, [len(it["a"]) for it in r["items"]], [len(it["b"]) for it in r["items"]]))
    assert set(r["score"]["by_category"]) == {"writing", "reasoning"}
    assert set(r["repetition"]) == {"a", "b"} and "repeat_4" in r["repetition"]["a"]
    assert json.loads((d / "mt.json").read_text())["categories"] == cats


def test_alpacaeval_file_end_to_end_through_the_cli(setup, capsys, monkeypatch):
    d, a, b = setup
    monkeypatch.syspath_prepend(str(d))
    report = d / "alpaca.json"
    assert main(["eval", "--a", str(a), "--b", str(b), "--prompts", str(d / "alpaca_eval.json"), "--judge",
                 "benchjudge:score", "--max-new-tokens", "10", "--report", str(report), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 alpacaeval questions (3 judged turns)" in out and "length-controlled" in out
    assert "by category" in out and "koala" in out
    r = json.loads(report.read_text())
    assert r["items"][0]["prompt"] == "Sort the words\n\nowl ant bee"   # the input joins the instruction
    assert r["items"][1]["prompt"] == "Name a color."
    assert r["categories"]["koala"]["n"] == 2 and r["categories"]["helpful_base"]["n"] == 1
    assert 0.0 <= r["compare"]["length_controlled_win_rate"] <= 1.0


def test_plain_prompts_report_repetition_and_the_lc_win_rate(setup):
    d, a, b = setup
    model_a, tok = load_policy(a)
    model_b, _ = load_policy(b)
    r = evaluate(model_a, model_b, tok, ["Sort: fox elk gnu.", "Is 7 prime?", "Name a color."],
                 ProgrammaticJudge(longer, name="longer"), max_new_tokens=12, batch_size=4, progress=False)
    assert "format" not in r and r["compare"]["length_controlled_win_rate"] is not None
    assert r["repetition"]["a"]["length"] == pytest.approx(r["length"]["avg_tokens_a"])


def test_bad_benchmark_records_name_file_and_line(setup):
    d, _, _ = setup
    bad = d / "bad.jsonl"
    bad.write_text(json.dumps(MTBENCH[0]) + "\n" + json.dumps({"question_id": 9, "turns": []}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'turns' must be a non-empty list"):
        benchmarks.load_benchmark(bad)
    other = d / "other.jsonl"
    other.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"other.jsonl:1: not a prompts record"):
        benchmarks.load_benchmark(other)
    assert benchmarks.load_benchmark(d / "mt_bench.jsonl", limit=2)[1][1].turns == MTBENCH[1]["turns"]


def test_mtbench_eval_stopped_by_its_judge_resumes_to_the_same_report(setup, tmp_path, monkeypatch):
    """The judge fails for good partway: the answers and verdicts so far are kept next to the report,
    and resume=True ends with the uninterrupted report, generating nothing and judging nothing twice."""
    d, a, b = setup
    model_a, tok = load_policy(a)
    model_b, _ = load_policy(b)
    kw = dict(mode="both", max_new_tokens=12, batch_size=2, progress=False)

    class Flaky(ProgrammaticJudge):
        def __init__(self, fail_after=None):
            super().__init__(longer, name="longer")
            self.calls, self.fail_after = 0, fail_after

        def _score(self, instruction, response):
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise JudgeError("judge longer at http://judge.invalid/v1: HTTP 503: down (still failing)")
            return super()._score(instruction, response)

    mt = d / "mt_bench.jsonl"
    whole = Flaky()
    ref = evaluate(model_a, model_b, tok, mt, whole, report_path=tmp_path / "ref.json", **kw)
    report = tmp_path / "mt.json"
    expected = (r"HTTP 503: down .*; 7 verdicts kept in .*mt.json.progress.jsonl: "
                r"run the same command with --resume")
    with pytest.raises(JudgeError, match=expected):   # 7 turns compared A|B; B|A fails
        evaluate(model_a, model_b, tok, mt, Flaky(fail_after=20), report_path=report, **kw)
    assert not report.exists()
    generated = []
    monkeypatch.setattr(benchmarks, "generate", lambda *a, **k: generated.append(1))
    judge = Flaky()
    out = evaluate(model_a, model_b, tok, mt, judge, report_path=report, resume=True, **kw)
    assert not generated and out["resumed"]["verdicts"] == 7
    assert judge.calls == whole.calls - 7 * 2   # a compare verdict is two scores here
    strip = ("judge_stats", "resumed")
    assert {k: v for k, v in out.items() if k not in strip} == {k: v for k, v in ref.items()
                                                                 if k not in strip}
    assert json.loads(report.read_text())["items"] == ref["items"]
