"""`fastdpo bench`: the JSON keys the README documents exist, every comparison is on equal work,
and the peers compute the same numbers as fastdpo."""
import json
import math

import pytest
import torch

from fastdpo.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_quick_eval_and_train_phases_write_traceable_json(tmp_path, monkeypatch):
    from fastdpo.generation import evaluate as evaluate_module
    from fastdpo.generation.sampler import sample, sample_reforward

    reports = {}   # sampler -> the evaluation report of its timed (full) run
    real = evaluate_module.evaluate

    def recording(a, b, tok, prompts, *args, sampler=None, **kw):
        report = real(a, b, tok, prompts, *args, sampler=sampler, **kw)
        reports[(sampler, len(prompts))] = report
        return report

    monkeypatch.setattr(evaluate_module, "evaluate", recording)
    assert main(["bench", "--quick", "--phases", "eval,train", "--no-peers", "--device", "auto",
                 "--out", str(tmp_path)]) == 0
    # the fast sampler is timed on the same work as the oracle: same seeds, same answers, same verdicts
    fast, oracle = reports[(sample, 4)]["items"], reports[(sample_reforward, 4)]["items"]
    assert [(it["a"], it["b"]) for it in fast] == [(it["a"], it["b"]) for it in oracle]
    assert any(it["a"] or it["b"] for it in fast)
    assert reports[(sample, 4)]["compare"] == reports[(sample_reforward, 4)]["compare"]

    out = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert set(out) >= {"machine", "versions", "command", "git", "load_average", "preset", "summary",
                        "comparisons", "raw", "errors", "seconds"}
    m = out["machine"]
    assert m["device"] == "cpu" and m["cpu"] and m["threads"] >= 1 and m["matmul_peak_flops"]["float32"] > 0
    assert out["versions"]["python"] and out["versions"]["torch"] and "trl" in out["versions"]
    assert "bench" in out["command"]
    assert len(out["load_average"]["before"]) == 3 and len(out["load_average"]["after"]) == 3
    assert out["git"]["revision"] is None or len(out["git"]["revision"]) == 40
    documented = {"phase", "impl", "preset", "device", "rate", "unit", "peak_MB", "peak_fraction", "detail"}
    assert all(set(r) == documented and r["device"] == "cpu" for r in out["summary"])
    evals = {r["impl"]: r for r in out["summary"] if r["phase"] == "eval"}
    assert set(evals) == {"fastdpo sampler", "oracle sampler (sample_reforward)"}
    assert all(r["unit"] == "prompts/s" and r["rate"] > 0 for r in evals.values())
    # every comparison names fastdpo's side and the baseline; the ratio is the measured rates'
    comps = {(c["phase"], c["fast"], c["baseline"]): c for c in out["comparisons"]}
    ev = comps[("eval", "fastdpo sampler", "oracle sampler (sample_reforward)")]
    assert ev["speedup"] == pytest.approx(evals["fastdpo sampler"]["rate"]
                                          / evals["oracle sampler (sample_reforward)"]["rate"])
    train = {r["impl"]: r for r in out["summary"] if r["phase"] == "train"}
    assert {"fastdpo step", "fastdpo end to end", "naive step (reference model every step)",
            "naive end to end (reference model every step)"} <= set(train)
    assert ("train", "fastdpo end to end", "naive end to end") in comps
    # the end-to-end rows include the setup (fastdpo's reference pass) on top of the steps
    fast_raw = next(r for r in out["raw"]["train"] if r["variant"] == "fast")
    assert fast_raw["e2e_s"] > fast_raw["setup_s"] > 0
    table = (tmp_path / "table.md").read_text()
    assert "fastdpo speed-up" in table and str(tmp_path / "bench.json") in table


def test_unknown_phase_and_missing_cuda_are_clear_errors(tmp_path, capsys):
    assert main(["bench", "--phases", "sample,nope", "--out", str(tmp_path)]) == 2
    assert "unknown bench phases ['nope']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--phases", "eval", "--out", str(tmp_path)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_sampler_rows_are_measured_on_the_same_work():
    pytest.importorskip("transformers")
    from fastdpo.bench.sampler import run_sampler_bench

    rows = run_sampler_bench("tiny", ("float32",), quick=True, verbose=False)
    by = {(r["comparison"], r["impl"]): r for r in rows}
    assert set(by) == {("oracle", "fast"), ("oracle", "oracle"), ("generate", "fast"),
                       ("generate", "hf_generate")}
    for cmp, base in (("oracle", "oracle"), ("generate", "hf_generate")):
        f, b = by[(cmp, "fast")], by[(cmp, base)]
        same = ("rows", "prompts", "k", "prompt_tokens", "max_new_tokens", "new_tokens", "dtype")
        assert all(f[k] == b[k] for k in same)
        assert f["method"] == b["method"] == "measured"
        assert b["fast_speedup"] == pytest.approx(b["seconds"] / f["seconds"], rel=1e-2, abs=2e-3)


def test_torch_linear_cross_entropy_row_computes_the_oracle_on_the_active_rows():
    from fastdpo.bench.kernels import _linear_impls

    impls, _, info = _linear_impls(2, 48, 311, 16, torch.float32)
    (o, (ogh, ogw)), (t, (tgh, tgw)) = impls["oracle"](), impls["torch_lce"]()
    torch.testing.assert_close(t, o, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tgh, ogh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tgw, ogw, rtol=1e-5, atol=1e-6)
    assert 0 < info["response_frac"] < 1


def test_peer_losses_must_agree():
    from fastdpo.bench.peers import PeerMismatch, check_same

    check_same({"fastdpo": 0.6931, "trl": 0.6932, "ln 2": math.log(2)}, atol=1e-3, reference="ln 2")
    check_same({"a": -215.07, "b": -215.5}, rtol=2e-2)
    with pytest.raises(PeerMismatch, match="trl computed step-0 loss"):
        check_same({"ln 2": math.log(2), "trl": 0.70}, atol=1e-3, what="step-0 loss")
    with pytest.raises(PeerMismatch):
        check_same({"a": 1.0, "b": float("nan")}, rtol=1.0)


def test_trl_side_trains_the_same_pairs_from_the_same_weights():
    """fastdpo's and TRL's trainer sides (run in-process here): same tokens, same reference
    log-probs (same weights), step-0 loss ln 2, and every figure the bench reports."""
    pytest.importorskip("trl")
    from fastdpo.bench.peers import REF_RTOL, run_side

    sides = {s: run_side(s, "tiny", steps=1) for s in ("fastdpo", "trl")}
    f, t = sides["fastdpo"], sides["trl"]
    assert f["e2e_tokens"] == t["e2e_tokens"] > 0
    for side in (f, t):
        assert side["step0_loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert len(side["step_s"]) == 1 and side["e2e_s"] > sum(side["step_s"]) > 0
        assert side["peak_MB"] is None or side["peak_MB"] > 0
    for key in ("ref_chosen_mean", "ref_rejected_mean"):
        assert t[key] == pytest.approx(f[key], rel=REF_RTOL)


def test_train_bench_memory_variants_report_the_training_footprint():
    from fastdpo.bench.train import run_train_bench

    rows = run_train_bench("tiny", rounds=1, steps=1, micro_batch_size=2, prompt=(8, 8), answer=(8, 12),
                           variants=("fast", "checkpointing", "lora"), verbose=False)
    by = {r["variant"]: r for r in rows}
    fast, ckpt, lora = by["fast"], by["checkpointing"], by["lora"]
    assert ckpt["gradient_checkpointing"] and lora["finetuning_type"] == "lora"
    # the same model and optimizer state with checkpointing; LoRA trains ~10% of the tiny model's
    # weights (rank 16 on every projection) and keeps Adam state for those only
    assert ckpt["trainable_params"] == fast["trainable_params"]
    assert ckpt["optimizer_MB"] == fast["optimizer_MB"]
    assert lora["trainable_params"] < fast["trainable_params"] / 5
    assert lora["optimizer_MB"] == pytest.approx(2 * 4 * lora["trainable_params"] / 2**20, rel=1e-3)
    for r in (ckpt, lora):
        assert r["tokens_per_s_vs_fast"] > 0
        if r["train_peak_MB"] is not None:   # /proc readings exist (Linux)
            assert r["train_peak_MB"] >= r["params_MB"] + r["optimizer_MB"]
            assert r["train_memory_vs_fast"] == r["train_peak_MB"] / fast["train_peak_MB"]
