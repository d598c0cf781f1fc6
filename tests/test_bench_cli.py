"""`fastdpo bench` end to end on its cheapest phase: the JSON keys the README documents exist."""
import json

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
