"""Multi-objective preferences: the rubric judge, pair selection by weighted score under
per-dimension gap rules, mining that records dimensions, per-dimension win rates in evaluation,
and DPO losses weighted by each pair's margin."""
import json

import pytest
import torch

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.generation.evaluate import evaluate, format_report
from fastdpo.generation.judge import ProgrammaticJudge
from fastdpo.generation.mining import mine_pairs
from fastdpo.generation.multi_objective import RubricJudge, select_pair_dimensions
from fastdpo.models.checkpoint import load_policy
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.training.batches import TokenizedPair, tokenize_pairs
from fastdpo.training.config import DPOConfig
from fastdpo.training.data import DataError, DataStats, load_examples
from fastdpo.training.dpo import DPOTask
from fastdpo.training.pair_weights import pair_margin, pair_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _judge(**kw):
    # "length": longer is better; "brevity": shorter is better; "odd": answers of odd length score high
    rubrics = {"length": ProgrammaticJudge(lambda i, r: min(10, 1 + len(r) // 3), "length"),
               "brevity": ProgrammaticJudge(lambda i, r: max(1, 10 - len(r) // 3), "brevity"),
               "odd": ProgrammaticJudge(lambda i, r: 9 if len(r) % 2 else 2, "odd")}
    return RubricJudge(rubrics, **kw)


def test_rubric_judge_weights_and_errors():
    j = _judge(weights={"length": 2, "brevity": 1, "odd": 1})
    dims = j.score_dimensions_many([("q", "abcdefghi")])[0]
    assert dims == {"length": 4, "brevity": 7, "odd": 9}
    assert j.score("q", "abcdefghi") == pytest.approx((2 * 4 + 7 + 9) / 4)
    assert j.stats.requests == 2
    with pytest.raises(ValueError, match="no rubric named 'safety'"):
        _judge(min_gaps={"safety": 0})
    with pytest.raises(ValueError, match="weights must be"):
        _judge(weights={"length": 0, "brevity": 0, "odd": 0})


def test_selection_takes_the_widest_weighted_margin_that_keeps_every_gap_rule():
    j = _judge(min_gaps={"odd": 0})
    dims = [{"length": 8, "brevity": 3, "odd": 2},     # weighted 4.33
            {"length": 9, "brevity": 9, "odd": 9},     # 9.0
            {"length": 1, "brevity": 2, "odd": 9},     # 4.0
            {"length": 2, "brevity": 2, "odd": 2}]     # 2.0
    w = [j.weighted(d) for d in dims]
    assert select_pair_dimensions(w, dims, j, min_gap=2, min_best=6) == (1, 3)
    # a rule the widest couple breaks moves the choice to the widest one that keeps it
    much_longer = _judge(min_gaps={"length": 8})                 # 1 vs 3: 9 - 2 = 7 < 8; 1 vs 2: 8
    assert select_pair_dimensions(w, dims, much_longer, min_gap=2, min_best=6) == (1, 2)
    strict = _judge(min_gaps={"brevity": 8})
    assert select_pair_dimensions(w, dims, strict, min_gap=2, min_best=6) is None
    only_not_1 = [True, False, True, True]
    assert select_pair_dimensions(w, dims, j, min_gap=2, min_best=6, can_choose=only_not_1) is None
    assert select_pair_dimensions([None, None, 9.0, None], dims, j) is None


def test_mining_and_evaluation_with_several_rubrics(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", block_size=96, stop_logit=3.0)
    model, tok = load_policy(ckpt)
    judge = _judge(weights={"length": 1, "brevity": 0.5, "odd": 1}, min_gaps={"odd": 0})
    prompts = [f"Say something about {w}" for w in "fox dog elk gnu hen ink jam kit".split()]
    out = tmp_path / "pairs.jsonl"
    stats = mine_pairs(model, tok, prompts, judge, out, temps=[0.7, 1.0, 1.3, 1.6], max_new_tokens=12,
                       batch_size=4, seed=1, min_gap=1, min_best=3, progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats.pairs_kept == len(rows) > 0
    for r in rows:
        d = r["dimensions"]
        assert set(d) == {"length", "brevity", "odd"} and d["odd"]["chosen"] >= d["odd"]["rejected"]
        assert r["weighted_margin"] == pytest.approx(r["score_chosen"] - r["score_rejected"])
        assert r["weighted_margin"] >= 1
        for name, rub in judge.rubrics.items():
            assert rub.score_fn(r["prompt"], r["chosen"]) == d[name]["chosen"]
    rep = evaluate(model, model, tok, prompts[:4], judge, mode="compare", max_new_tokens=8, progress=False)
    assert set(rep["dimensions"]) == {"length", "brevity", "odd"}
    for v in rep["dimensions"].values():   # the same model on the same seeds: every prompt ties
        assert (v["win"], v["tie"], v["loss"]) == (0, 4, 0)
    assert "per dimension (win/tie/loss" in format_report(rep)


def test_pair_margins_and_weights():
    assert pair_margin({"weighted_margin": 2.5, "score_chosen": 9, "score_rejected": 1}) == 2.5
    dims = {"dimensions": {"helpfulness": {"chosen": 5, "rejected": 3},
                           "safety": {"chosen": 4, "rejected": 4}}}
    assert pair_margin(dims) == 1.0
    assert pair_margin(dims, {"helpfulness": 3, "safety": 1}) == 1.5
    mined = {**dims, "weighted_margin": 1.0}                     # the miner's equal weights
    assert pair_margin(mined) == 1.0 and pair_margin(mined, {"helpfulness": 3, "safety": 1}) == 1.5
    assert pair_margin({"score_chosen": 8, "score_rejected": 5}) == 3
    assert pair_margin(None) is None and pair_margin({"score_chosen": 8}) is None
    assert pair_weights([{"score_chosen": 9, "score_rejected": 5}, {"score_chosen": 9, "score_rejected": 7},
                         None]) == [4 / 3, 2 / 3, 1.0]
    assert pair_weights([None, None]) == [1.0, 1.0]
    with pytest.raises(DataError, match="dimensions.safety must be"):
        pair_margin({"dimensions": {"safety": 3}})


def test_bad_dimensions_name_the_file_and_line(tmp_path):
    from fastdpo.models.tokenizer import Tokenizer
    tok = Tokenizer.train(["a b c d e f"] * 20, vocab_size=300)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b",
                             "dimensions": {"help": {"chosen": 5, "rejected": "x"}}}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: 'dimensions.help.rejected' must be a number"):
        tokenize_pairs(load_examples([f]), tok, 32, 32, 48, DataStats())


def test_margin_weighting_scales_each_pairs_loss_in_both_paths():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16))
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, 40, (n,), generator=g).tolist()

    margins = [1, 3, 2, 6]
    pairs = [TokenizedPair(ids(3), ids(2 + i), ids(4), {"score_chosen": 9, "score_rejected": 9 - m})
             for i, m in enumerate(margins)]
    ref = torch.randn(4, 2, generator=g) - 10
    idx = [0, 1, 2, 3]

    def run(weighting, fused):
        model.zero_grad()
        task = DPOTask(model, pairs, [], DPOConfig(beta=0.5, margin_weighting=weighting), pad_id=0,
                       device=torch.device("cpu"), ref_train=ref, gradient_in_forward=fused)
        loss, stats = task.loss(idx, task.step_norm([idx]))
        loss.backward()
        return loss.item(), stats, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, stats, _ = run(False, False)
    per_pair = []
    for i in idx:   # each pair's own unweighted loss
        task = DPOTask(model, pairs, [], DPOConfig(beta=0.5), pad_id=0, device=torch.device("cpu"),
                       ref_train=ref)
        per_pair.append(task.loss([i], task.step_norm([[i]]))[0].item())
    w = [m / (sum(margins) / 4) for m in margins]
    want = sum(wi * li for wi, li in zip(w, per_pair)) / 4
    weighted, _, g_recompute = run(True, False)
    fused, _, g_fused = run(True, True)
    assert weighted == pytest.approx(want, rel=1e-5) and fused == pytest.approx(want, rel=1e-5)
    assert plain == pytest.approx(sum(per_pair) / 4, rel=1e-5) and abs(plain - want) > 1e-4
    for name, grad in g_recompute.items():
        torch.testing.assert_close(g_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cli_rubrics_mine_and_evaluate(tmp_path, monkeypatch, capsys):
    from fastdpo.cli import main
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", block_size=96, stop_logit=3.0)
    (tmp_path / "rubric_fns.py").write_text(
        "def longer(i, r):\n    return min(10, 1 + len(r) // 3)\n\n"
        "def odd(i, r):\n    return 9 if len(r) % 2 else 2\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}"}) + "\n" for w in "fox dog elk gnu".split()))
    monkeypatch.chdir(tmp_path)
    flags = ["--rubric", "length=rubric_fns:longer", "--rubric", "odd=rubric_fns:odd",
             "--rubric-weight", "odd=2", "--rubric-min-gap", "odd=0"]
    assert main(["pairs", "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", "pairs.jsonl",
                 "--max-new-tokens", "12", "--min-gap", "1", "--min-best", "3", "--no-progress", *flags]) == 0
    rows = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert rows and all(set(r["dimensions"]) == {"length", "odd"} for r in rows)
    assert main(["eval", "--a", str(ckpt), "--b", str(ckpt), "--prompts", str(prompts),
                 "--max-new-tokens", "8",
                 "--no-progress", *flags]) == 0
    assert "per dimension (win/tie/loss" in capsys.readouterr().out
    assert main(["pairs", "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", "x.jsonl",
                 "--rubric", "oops"]) == 2
    assert "--rubric: expected NAME=VALUE" in capsys.readouterr().err
