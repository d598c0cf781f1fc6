"""Win-rate evaluation: position swapping (a judge biased to one position yields only ties),
agreement-only wins, score mode, length report, JSON report, and the ``fastdpo eval`` CLI."""
import json

import pytest
import torch

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.cli import main
from fastdpo.generation.evaluate import evaluate, format_report, position_swapped_outcome
from fastdpo.generation.judge import Judge, ProgrammaticJudge
from fastdpo.models.checkpoint import load_policy

PROMPTS = [f"Sort the words: {w} cat dog {i}"
           for i, w in enumerate("fox elk gnu hen ink jam kit owl".split())]
KW = dict(max_new_tokens=10, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model, shared box: avoid OpenMP barrier stalls
    d = tmp_path_factory.mktemp("eval")
    a = make_tiny_checkpoint(d / "a", block_size=64, seed=0)
    b = make_tiny_checkpoint(d / "b", block_size=64, seed=0)
    model_a, tok = load_policy(a)
    model_b, _ = load_policy(b)
    with torch.no_grad():  # same tokenizer, different weights
        for p in model_b.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    yield dict(dir=d, a=a, b=b, model_a=model_a, model_b=model_b, tok=tok)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("first,second,outcome", [
    ("A", "B", "win"), ("B", "A", "loss"), ("A", "A", "tie"), ("B", "B", "tie"),
    ("TIE", "B", "tie"), ("A", "TIE", "tie"), ("TIE", "TIE", "tie"),
])
def test_position_swapped_outcome(first, second, outcome):
    assert position_swapped_outcome(first, second) == outcome


class Always(Judge):
    def __init__(self, verdict):
        super().__init__()
        self.verdict, self.name = verdict, f"always-{verdict}"

    def _compare(self, instruction, a, b):
        return self.verdict


@pytest.mark.parametrize("verdict", ["A", "B"])
def test_position_biased_judge_gives_only_ties(models, verdict):
    r = evaluate(models["model_a"], models["model_b"], models["tok"], PROMPTS, Always(verdict), **KW)
    c = r["compare"]
    assert (c["win"], c["tie"], c["loss"]) == (0, len(PROMPTS), 0)
    assert c["tie_rate"] == 1.0 and c["win_rate_decided"] is None
    assert c["first_position_rate"] == (1.0 if verdict == "A" else 0.0) and c["order_agreement"] == 0.0


def test_consistent_judge_wins_are_counted_and_match_items(models, tmp_path):
    # prefers the longer answer: position-independent, so both orders agree unless lengths tie
    judge = ProgrammaticJudge(lambda i, r: min(10, 1 + len(r) // 3), name="longer")
    report_path = tmp_path / "sub" / "report.json"
    r = evaluate(models["model_a"], models["model_b"], models["tok"], PROMPTS, judge, mode="both",
                 report_path=report_path, **KW)
    c, items = r["compare"], r["items"]
    assert c["win"] + c["tie"] + c["loss"] == r["n_prompts"] == len(PROMPTS)
    for it in items:
        sa, sb = judge.score_fn(it["prompt"], it["a"]), judge.score_fn(it["prompt"], it["b"])
        assert it["outcome"] == ("win" if sa > sb else "loss" if sb > sa else "tie")
        assert (it["score_a"], it["score_b"]) == (sa, sb)
    assert c["order_agreement"] == 1.0
    assert c["win"] + c["loss"] > 0, "the two models should differ somewhere"
    assert c["win_rate_decided"] == c["win"] / (c["win"] + c["loss"])
    s = r["score"]
    assert s["mean_a"] == pytest.approx(sum(it["score_a"] for it in items) / len(items))
    assert sum(s["hist_b"].values()) == len(items)
    assert r["length"]["avg_chars_a"] == pytest.approx(sum(len(it["a"]) for it in items) / len(items))
    assert json.loads(report_path.read_text())["compare"] == c
    text = format_report(r)
    assert "win rate among decided" in text and "avg answer length" in text and "mean score" in text


def test_same_model_both_sides_ties_everything(models):
    judge = ProgrammaticJudge(lambda i, r: min(10, 1 + len(r) // 3), name="longer")
    r = evaluate(models["model_a"], models["model_a"], models["tok"], PROMPTS, judge, **KW)
    assert r["compare"]["tie"] == len(PROMPTS)  # same seeds per prompt -> identical answers
    assert r["length"]["avg_chars_a"] == r["length"]["avg_chars_b"]


def test_invalid_mode_and_overlong_prompts(models):
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate(models["model_a"], models["model_b"], models["tok"], PROMPTS, Always("A"), mode="x", **KW)
    r = evaluate(models["model_a"], models["model_b"], models["tok"], PROMPTS[:2] + ["word " * 100],
                 Always("A"), **KW)
    assert r["n_prompts"] == 2 and r["n_dropped"] == 1


def test_eval_cli(models, tmp_path, capsys, monkeypatch):
    (tmp_path / "evaljudge.py").write_text("def score(instruction, response):\n"
                                           "    return min(10, 1 + len(response) // 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4]))
    report = tmp_path / "r.json"
    assert main(["eval", "--a", str(models["a"]), "--b", str(models["a"]), "--prompts", str(prompts),
                 "--judge", "evaljudge:score", "--max-new-tokens", "8", "--report", str(report),
                 "--no-progress", "--mode", "both"]) == 0
    out = capsys.readouterr().out
    a = str(models["a"])
    assert f"{a} (A) vs {a} (B) on 4 prompts" in out and "tie 4 (100.0%)" in out
    assert json.loads(report.read_text())["n_prompts"] == 4
    # bad input is one clear error line, not a traceback
    assert main(["eval", "--a", str(models["a"]), "--b", str(models["a"]),
                 "--prompts", str(tmp_path / "no.jsonl"), "--judge", "evaljudge:score"]) == 2
    assert "prompts file not found" in capsys.readouterr().err


def test_eval_names_the_checkpoints_by_path_or_by_name(models, tmp_path, capsys, monkeypatch):
    """Two checkpoint directories are usually both called ``final``: the report says which is which."""
    import shutil
    (tmp_path / "scorejudge.py").write_text("def score(instruction, response):\n"
                                            "    return min(10, 1 + len(response) // 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for run in ("dpo", "sft"):
        shutil.copytree(models["a" if run == "dpo" else "b"], tmp_path / "runs" / run / "final")
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    common = ["--prompts", str(prompts), "--judge", "scorejudge:score", "--max-new-tokens", "6",
              "--no-progress", "--mode", "both"]
    assert main(["eval", "--a", "runs/dpo/final", "--b", "runs/sft/final/", *common,
                 "--report", "r.json"]) == 0
    out = capsys.readouterr().out
    assert "runs/dpo/final vs runs/sft/final on 2 prompts" in out
    assert "mean score: runs/dpo/final " in out and "| runs/sft/final " in out
    assert json.loads((tmp_path / "r.json").read_text())["names"] == {"a": "runs/dpo/final",
                                                                     "b": "runs/sft/final"}
    assert main(["eval", "--a", "runs/dpo/final", "--b", "runs/sft/final", "--name-a", "dpo",
                 "--name-b", "sft", *common]) == 0
    out = capsys.readouterr().out
    assert "dpo vs sft on 2 prompts" in out and "avg answer length: dpo " in out and "| sft " in out
