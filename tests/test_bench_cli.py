"""`fastdpo bench` end to end on its cheapest phase: the JSON keys the README documents exist."""
import json

import pytest
import torch

from fastdpo.cli import main


def test_bench_quick_eval_phase_writes_json_and_png(tmp_path, monkeypatch):
    from fastdpo.generation import evaluate as evaluate_module
    from fastdpo.generation.sampler import sample, sample_reforward

    reports = {}   # sampler -> the evaluation report of its (first) timed run
    real = evaluate_module.evaluate

    def recording(*args, sampler=None, **kw):
        report = real(*args, sampler=sampler, **kw)
        reports.setdefault(sampler, report)
        return report

    monkeypatch.setattr(evaluate_module, "evaluate", recording)
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--quick", "--phases", "eval", "--no-peers", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    # the fast sampler is timed on the same work as the oracle: same seeds, same answers, same verdicts
    assert set(reports) == {sample, sample_reforward}
    fast, oracle = reports[sample]["items"], reports[sample_reforward]["items"]
    assert [(it["a"], it["b"]) for it in fast] == [(it["a"], it["b"]) for it in oracle]
    assert any(it["a"] or it["b"] for it in fast)
    assert reports[sample]["compare"] == reports[sample_reforward]["compare"]
    out = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert set(out) >= {"machine", "preset", "summary", "scaling", "raw", "errors", "seconds"}
    assert out["machine"]["matmul_peak_flops"]["float32"] > 0
    rows = {r["impl"]: r for r in out["summary"] if r["phase"] == "eval"}
    assert set(rows) == {"fast", "oracle"}
    documented = {"phase", "impl", "preset", "rate", "unit", "speedup", "peak_MB", "peak_fraction", "detail"}
    assert all(set(r) == documented and r["unit"] == "prompts/s" for r in rows.values())
    assert rows["fast"]["rate"] > 0 and rows["oracle"]["rate"] > 0
    # a ratio against the oracle on the fast row only (no claim about its size: the machine is shared)
    assert rows["fast"]["speedup"] > 0 and rows["oracle"]["speedup"] is None
    assert rows["fast"]["detail"]["max_new_tokens"] == 16


def test_unknown_phase_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--phases", "sample,nope", "--out", str(tmp_path)]) == 2
    assert "unknown bench phases ['nope']" in capsys.readouterr().err


def test_train_bench_memory_variants_report_the_training_footprint():
    from fastdpo.bench.train import run_train_bench

    threads = torch.get_num_threads()
    try:
        rows = run_train_bench("tiny", rounds=1, steps=1, micro_batch_size=2, prompt=(8, 8), answer=(8, 12),
                               variants=("fast", "checkpointing", "lora"), verbose=False)
    finally:
        torch.set_num_threads(threads)
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
