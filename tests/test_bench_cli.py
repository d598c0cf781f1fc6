"""`fastdpo bench` end to end on its cheapest phase: the JSON keys the README documents exist."""
import json

import torch

from dpo.cli import main


def test_bench_quick_eval_phase_writes_json_and_png(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--quick", "--phases", "eval", "--no-peers", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert set(out) >= {"machine", "preset", "summary", "scaling", "raw", "errors", "seconds"}
    assert out["machine"]["matmul_peak_flops"]["float32"] > 0
    rows = {r["impl"]: r for r in out["summary"] if r["phase"] == "eval"}
    assert set(rows) == {"fast", "oracle"}
    assert rows["fast"]["rate"] > 0 and rows["oracle"]["rate"] > 0
    assert rows["fast"]["speedup"] == rows["fast"]["rate"] / rows["oracle"]["rate"]


def test_unknown_phase_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--phases", "sample,nope", "--out", str(tmp_path)]) == 2
    assert "unknown bench phases ['nope']" in capsys.readouterr().err
