"""Preference mining: the filtering rules, prompt loading, overlap of sampling with judging, and
byte-identical resume after the process is SIGKILLed mid-run."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastdpo.generation.sampler
from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.generation.judge import Judge, ProgrammaticJudge, make_judge
from fastdpo.generation.mining import MiningStats, format_stats, load_prompts, mine_pairs, select_pair
from fastdpo.models.checkpoint import load_policy
from fastdpo.training.batches import load_preference_data, tokenize_pairs
from fastdpo.training.config import PreferenceDatasetConfig
from fastdpo.training.data import DataStats, load_examples

TOY_JUDGE = '''
def score(instruction, response):
    """Deterministic stand-in for a real judge: spreads scores over 1-10."""
    return 1 + (len(response) * 7 + len(instruction)) % 10
'''
PROMPTS = [f"Reverse the words: {w} cat {i}" for i, w in
           enumerate("fox dog elk gnu hen ink jam kit owl pig".split())]
SETTINGS = dict(batch_size=3, max_new_tokens=12, seed=5)


@pytest.mark.parametrize("scores,pick", [
    ([5, 8, 4, 3], (1, 3)),              # best 8, worst 3
    ([6, 5, 5, 4], (0, 3)),              # gap exactly 2, best exactly 6
    ([6, 5, 5, 5], None),                # gap 1 < 2
    ([5, 3, 2, 1], None),                # best 5 < 6
    ([7, 7, 7, 7], None),                # all tied
    ([9, 3, 9, 3], (0, 3)),              # ties: first best, last worst
    ([None, 8, None, 2], (1, 3)),        # invalid scores are skipped
    ([None, 8, None, None], None),       # fewer than two valid scores
    ([10, 1], (0, 1)),
])
def test_select_pair_rules(scores, pick):
    assert select_pair(scores, min_gap=2, min_best=6) == pick


@pytest.mark.parametrize("scores,can_choose,pick", [
    ([9, 5, 3, 1], [False, True, True, True], (1, 3)),    # the best is truncated: the next best is chosen
    ([9, 5, 3, 1], [True, True, True, False], (0, 3)),    # a truncated worst may be rejected
    ([9, 2, None, None], [False, True, True, True], None),  # only the truncated one scores high enough
    ([4, 8], [True, False], None),                        # the only choosable one is the worst
])
def test_select_pair_never_chooses_what_cannot_be_chosen(scores, can_choose, pick):
    assert select_pair(scores, min_gap=2, min_best=2, can_choose=can_choose) == pick


def test_select_pair_thresholds_are_parameters():
    assert select_pair([9, 6], min_gap=3, min_best=6) == (0, 1)
    assert select_pair([9, 7], min_gap=3, min_best=6) is None
    assert select_pair([5, 1], min_gap=2, min_best=5) == (0, 1)


def test_load_prompts_errors_name_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"instruction": "b"}\n')
    assert load_prompts(f) == ["a", "b"] and load_prompts(f, limit=1) == ["a"]
    f.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'prompt'"):
        load_prompts(f)
    f.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: invalid JSON"):
        load_prompts(f)
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        load_prompts(tmp_path / "none.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _run_cli
    d = tmp_path_factory.mktemp("pairs")
    ckpt = make_tiny_checkpoint(d / "tiny", block_size=96, stop_logit=3.0)   # ends most of its turns
    (d / "toyjudge.py").write_text(TOY_JUDGE)
    prompts = d / "prompts.jsonl"
    # one prompt too long for block_size 96 - max_new_tokens 12: dropped and counted
    rows = PROMPTS[:5] + ["word " * 200] + PROMPTS[5:]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    sys.path.insert(0, str(d))
    model, tok = load_policy(ckpt)
    judge = make_judge("toyjudge:score")
    ref = d / "reference.jsonl"
    stats = mine_pairs(model, tok, prompts, judge, ref, progress=False, **SETTINGS)
    yield dict(dir=d, ckpt=ckpt, prompts=prompts, model=model, tok=tok, ref=ref, stats=stats)
    sys.path.remove(str(d))
    torch.set_num_threads(threads)


def test_mining_writes_filtered_pairs_and_counts(setup):
    stats, judge_fn = setup["stats"], make_judge("toyjudge:score").score_fn
    assert stats.prompts_total == 11 and stats.prompts_dropped == 1 and stats.prompts_done == 10
    assert stats.samples_truncated > 0   # the test below needs some
    assert stats.samples_judged + stats.samples_truncated + stats.samples_malformed == 40
    assert sum(stats.score_hist.values()) == stats.samples_judged
    lines = setup["ref"].read_text().splitlines()
    assert len(lines) == stats.pairs_kept > 0
    for line in lines:
        rec = json.loads(line)
        assert rec["prompt"] in PROMPTS
        judged = [v for v in rec["scores"] if v is not None]
        assert judge_fn(rec["prompt"], rec["chosen"]) == rec["score_chosen"] == max(judged)
        assert judge_fn(rec["prompt"], rec["rejected"]) == rec["score_rejected"] == min(judged)
        assert rec["score_chosen"] >= 6 and rec["score_chosen"] - rec["score_rejected"] >= 2
    text = format_stats(stats, "out.jsonl")
    assert f"pairs kept: {stats.pairs_kept}" in text and "1 dropped as too long" in text
    assert "pairs/min" in text


def test_rerun_of_finished_run_judges_nothing(setup, tmp_path):
    out = tmp_path / "p.jsonl"
    calls = []

    class Counting(Judge):
        name = "toyjudge:score"  # same judge identity as the reference run

        def _score(self, i, r):
            calls.append(1)
            return make_judge("toyjudge:score").score_fn(i, r)

    model, tok, prompts = setup["model"], setup["tok"], setup["prompts"]
    first = mine_pairs(model, tok, prompts, Counting(), out, progress=False, **SETTINGS)
    judged = setup["stats"].samples_judged
    assert out.read_bytes() == setup["ref"].read_bytes() and len(calls) == judged
    again = mine_pairs(model, tok, prompts, Counting(), out, progress=False, **SETTINGS)
    assert len(calls) == judged and out.read_bytes() == setup["ref"].read_bytes()
    assert again.pairs_kept == first.pairs_kept and again.resumed_at == 10


def test_resume_refuses_other_settings_and_foreign_files(setup, tmp_path):
    out = tmp_path / "p.jsonl"
    judge = make_judge("toyjudge:score")
    mine_pairs(setup["model"], setup["tok"], setup["prompts"], judge, out, progress=False, **SETTINGS)
    with pytest.raises(ValueError, match="different run"):
        mine_pairs(setup["model"], setup["tok"], setup["prompts"], judge, out, progress=False,
                   **{**SETTINGS, "seed": 6})
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="without its progress file"):
        mine_pairs(setup["model"], setup["tok"], setup["prompts"], judge, foreign, progress=False,
                   **SETTINGS)
    assert foreign.read_text() == '{"prompt": "x"}\n'  # untouched


def test_sampling_overlaps_judging(setup, tmp_path, monkeypatch):
    """While batch 0 is being judged, the sampler thread is already sampling batch 1."""
    started = threading.Semaphore(0)
    real = fastdpo.generation.sampler.sample

    def counting_sample(*a, **kw):
        started.release()
        return real(*a, **kw)

    monkeypatch.setattr(fastdpo.generation.sampler, "sample", counting_sample)
    seen = []

    class Waiting(Judge):
        name = "waiting"

        def score_many(self, pairs):
            if not seen:  # judging batch 0: its own sampling has started, and batch 1's must start too
                seen.append(started.acquire(timeout=20) and started.acquire(timeout=20))
            return [5] * len(pairs)

    mine_pairs(setup["model"], setup["tok"], PROMPTS[:6], Waiting(), tmp_path / "p.jsonl", progress=False,
               **SETTINGS)
    assert seen[0] is True


FAULTS = Path(__file__).parent / "faults"   # sitecustomize: kills a child at a chosen point


def _run_cli(setup, out, env_extra=None):
    cmd = [sys.executable, "-m", "fastdpo.cli", "pairs", "--ckpt", str(setup["ckpt"]),
           "--prompts", str(setup["prompts"]), "--out", str(out), "--judge", "toyjudge:score",
           "--no-progress", "--batch-size", str(SETTINGS["batch_size"]),
           "--max-new-tokens", str(SETTINGS["max_new_tokens"]), "--seed", str(SETTINGS["seed"])]
    path = os.pathsep.join([str(setup["dir"]), str(FAULTS), os.environ.get("PYTHONPATH", "")])
    # One intra-op thread: OpenMP barriers in a tiny model's many small ops can cost 100x when
    # another process keeps the other cores busy.
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("stage", ["partial", "pairs", "commit"])
def test_resume_after_sigkill_is_byte_identical(setup, tmp_path, stage):
    """Killed at batch 1 (mid-line / pairs written but not recorded / recorded), then restarted
    with the same command: the pairs file equals the uninterrupted run's, byte for byte."""
    out = tmp_path / "pairs.jsonl"
    killed = _run_cli(setup, out, {"FASTDPO_FAULT": f"kill-mining:1:{stage}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = out.read_bytes()
    assert partial != setup["ref"].read_bytes()
    if stage == "partial":
        assert not partial.endswith(b"\n")  # a torn line really was left behind
    if stage != "commit":  # the last progress record predates what the pairs file holds
        records = (out.parent / (out.name + ".progress.jsonl")).read_text().splitlines()
        assert json.loads(records[-1])["out_bytes"] < len(partial)
    resumed = _run_cli(setup, out)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == setup["ref"].read_bytes()
    assert f"({6 if stage == 'commit' else 3} before this run)" in resumed.stdout
    assert f"pairs kept: {setup['stats'].pairs_kept}" in resumed.stdout


def test_stats_rates():
    s = MiningStats(prompts_done=30, pairs_kept=12, resumed_at=10, resumed_pairs=2, elapsed_s=10.0)
    assert s.prompts_per_s == 2.0 and s.pairs_per_min == 60.0 and s.kept_pct == 40.0


# --------------------------------------------------------------------------- what a pair holds


@pytest.fixture
def sampled(monkeypatch):
    """Records every sampler call's rows: (prompt ids, new ids, finish reason)."""
    rows = []
    real = fastdpo.generation.sampler.sample

    def spy(model, prompts, *a, **kw):
        new, finish = real(model, prompts, *a, **kw)
        rows.extend(zip((tuple(p) for p in prompts), new, finish))
        return new, finish

    monkeypatch.setattr(fastdpo.generation.sampler, "sample", spy)
    return rows


def _rows(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def test_truncated_samples_are_never_chosen(setup, tmp_path, sampled):
    """A judge that likes long answers rates the samples that ran out of max_new_tokens highest;
    they are counted and left out instead of becoming chosen answers."""
    model, tok = setup["model"], setup["tok"]
    likes_long = ProgrammaticJudge(lambda i, r: min(10, 1 + len(r) // 3), name="long")
    stats = mine_pairs(model, tok, PROMPTS, likes_long, tmp_path / "p.jsonl", progress=False, **SETTINGS)
    rows = _rows(tmp_path / "p.jsonl")
    truncated = {tok.decode(ids, skip_special=True) for _, ids, f in sampled if f == "length"}
    finished = {tok.decode(ids, skip_special=True) for _, ids, f in sampled if f == "stop"}
    assert stats.samples_truncated == sum(f == "length" for *_, f in sampled) > 0 and rows
    # the old rule (best score wins) would have chosen a truncated sample for some prompt
    best = {}
    for prompt, ids, _ in sampled:
        text = tok.decode(ids, skip_special=True)
        best[prompt] = max(best.get(prompt, (0, "")), (likes_long.score_fn("", text), text))
    assert any(text in truncated and text not in finished for _, text in best.values())
    for r in rows:
        assert r["chosen"] not in truncated - finished and r["rejected"] not in truncated - finished
        assert r["chosen_finish"] == r["rejected_finish"] == "stop"
        assert r["chosen_ids"][-1] == r["rejected_ids"][-1] == tok.eos_id
    assert f"{stats.samples_truncated} truncated" in format_stats(stats)


def test_truncated_as_rejected_keeps_them_open_and_never_chosen(setup, tmp_path):
    model, tok = setup["model"], setup["tok"]
    likes_short = ProgrammaticJudge(lambda i, r: max(1, 10 - len(r) // 3), name="short")
    out = tmp_path / "p.jsonl"
    stats = mine_pairs(model, tok, PROMPTS, likes_short, out, progress=False, truncated_as_rejected=True,
                       **SETTINGS)
    rows = _rows(out)
    cut = [r for r in rows if r["rejected_finish"] == "length"]
    assert cut and stats.rejected_truncated == len(cut)
    assert all(r["chosen_finish"] == "stop" and r["chosen_ids"][-1] == tok.eos_id for r in rows)
    for r in cut:   # the answer as sampled: no end-of-turn token, SETTINGS' max_new_tokens long
        assert len(r["rejected_ids"]) == SETTINGS["max_new_tokens"] and tok.eos_id not in r["rejected_ids"]
    pairs = tokenize_pairs(load_examples([out]), tok, 96, 96, 96, DataStats())
    assert [p.rejected for p, r in zip(pairs, rows) if r in cut] == [r["rejected_ids"] for r in cut]


def test_trained_pairs_are_the_sampled_tokens(setup, tmp_path, sampled):
    """The loader trains on the ids the sampler produced (answer + end-of-turn), not on the text
    encoded again, which for some answers gives other tokens."""
    model, tok = setup["model"], setup["tok"]
    out = tmp_path / "p.jsonl"
    mine_pairs(model, tok, PROMPTS, make_judge("toyjudge:score"), out, progress=False, **SETTINGS)
    rows = _rows(out)
    train, val, stats = load_preference_data(PreferenceDatasetConfig(path=[out]), tok, 96, 96, 96, seed=0)
    assert not val and len(train) == len(rows) == stats.sampled_ids and stats.retokenized == 0
    by_prompt = {}
    for prompt, ids, finish in sampled:
        by_prompt.setdefault(prompt, []).append(ids + [tok.eos_id] if finish == "stop" else ids)
    for pair, r in zip(train, rows):
        assert pair.prompt == r["prompt_ids"] == tok.render_prompt(r["prompt"])
        assert pair.chosen in by_prompt[tuple(pair.prompt)] and pair.rejected in by_prompt[tuple(pair.prompt)]
        assert (pair.chosen, pair.rejected) == (r["chosen_ids"], r["rejected_ids"])
    encoded_again = [tok.render_answer(r[k]) for r in rows for k in ("chosen", "rejected")]
    assert encoded_again != [r[k + "_ids"] for r in rows for k in ("chosen", "rejected")]


def test_a_special_token_inside_an_answer_makes_it_malformed(setup, tmp_path, monkeypatch):
    """``<|user|>`` inside a sample (the model opening the next turn itself): never judged or paired,
    counted; and no special token is ever decoded into a pair's text."""
    model, tok = setup["model"], setup["tok"]
    user = tok.render_prompt("x")[0]            # the template's first token: the user-turn marker
    real = fastdpo.generation.sampler.sample

    def with_user_token(*a, **kw):
        new, finish = real(*a, **kw)
        return [ids[:2] + [user] + ids[2:] if i % 4 == 0 else ids for i, ids in enumerate(new)], finish

    monkeypatch.setattr(fastdpo.generation.sampler, "sample", with_user_token)
    judge = make_judge("toyjudge:score")
    stats = mine_pairs(model, tok, PROMPTS, judge, tmp_path / "p.jsonl", progress=False, **SETTINGS)
    assert stats.samples_malformed == len(PROMPTS)   # one of the K = 4 samples of every prompt
    assert judge.stats.requests == stats.samples_judged <= 3 * len(PROMPTS)
    for r in _rows(tmp_path / "p.jsonl"):
        assert user not in r["chosen_ids"] + r["rejected_ids"]
        assert "<|" not in r["chosen"] + r["rejected"]
        assert r["scores"][0] is None   # the malformed sample (first of each prompt) was not judged
