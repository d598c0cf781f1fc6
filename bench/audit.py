"""``fastdpo audit`` throughput and memory on a generated preference file.

``generate_pairs`` writes N preference rows (Zipf-distributed pseudo-words; prompts of 8-60 words,
answers of 20-200; a few percent planted formatting-only, near-identical, duplicate and
contradicting pairs, every one counted). Each audit then runs in a fresh subprocess (so its peak
RSS is its own) without and with a tokenizer (a byte-level BPE trained on the generated text), on
the first ``--small`` rows and on all of them: rows/s and peak memory at two file sizes show
whether the audit streams.

    python -m fastdpo.bench.audit [--rows 1000000] [--small 100000] [--quick] [--json out.json]

Timings on a shared machine are only meaningful next to its load average, which is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastdpo.files import write_json

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "pa", "qu", "da", "fe", "go", "hi", "ju")


def _vocabulary(n: int, rng: np.random.Generator) -> np.ndarray:
    words = {"".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(n * 3)}
    return np.array(sorted(words)[:n])


def generate_pairs(path: str | Path, rows: int, seed: int = 0) -> dict:
    """Write ``rows`` JSONL preference rows; returns what was planted (counts per class)."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(3000, rng)
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    planted = {"formatting_only": 0, "near_identical": 0, "duplicate_pairs": 0, "contradicting_rows": 0}
    recent: list[dict] = []

    def text(n_min, n_max):
        return " ".join(vocab[rng.choice(len(vocab), size=int(rng.integers(n_min, n_max)), p=zipf)])

    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            roll = rng.random()
            prompt = f"Q{i}: {text(8, 60)}?"
            if roll < 0.02:
                chosen = text(20, 200)
                row = {"prompt": prompt, "chosen": f"**{chosen.capitalize()}.**", "rejected": chosen}
                planted["formatting_only"] += 1
            elif roll < 0.04:
                chosen = text(40, 200)
                cut = len(chosen) // 2
                row = {"prompt": prompt, "chosen": chosen, "rejected": chosen[:cut] + "x" + chosen[cut + 1:]}
                planted["near_identical"] += 1
            elif roll < 0.05 and recent:
                row = dict(recent[int(rng.integers(len(recent)))])
                planted["duplicate_pairs"] += 1
            elif roll < 0.055 and recent:
                old = recent[int(rng.integers(len(recent)))]
                row = {"prompt": old["prompt"], "chosen": old["rejected"], "rejected": old["chosen"]}
                planted["contradicting_rows"] += 1
            else:
                row = {"prompt": prompt, "chosen": text(20, 200), "rejected": text(20, 200)}
            f.write(json.dumps(row) + "\n")
            if roll >= 0.055 and len(recent) < 1000:
                recent.append(row)
    return planted


_CHILD = """
import json, resource, sys, time
from fastdpo.training.audit import audit_preferences
path, tok = sys.argv[1], sys.argv[2] or None
if tok:
    from fastdpo.models.tokenizer import Tokenizer
    tok = Tokenizer.load(tok)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0, c0 = time.perf_counter(), time.process_time()
r = audit_preferences([path], tokenizer=tok)
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"rows": r["rows"], "seconds": dt, "rows_per_s": r["rows"] / dt, "cpu_seconds": cpu,
                  "rows_per_cpu_s": r["rows"] / cpu, "baseline_rss_mb": base,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "near_identical": r["near_identical"], "formatting_only": r["formatting_only"],
                  "duplicate_pairs": r["duplicate_pairs"], "contradictions": r["contradictions"]}))
"""


def _audit_in_child(path: Path, tokenizer: Path | None) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tokenizer or "")], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_audit_bench(rows: int = 1_000_000, small: int = 100_000, work_dir: str | Path | None = None,
                    seed: int = 0) -> dict:
    from fastdpo.models.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        big = tmp / "pairs.jsonl"
        t0 = time.perf_counter()
        planted = generate_pairs(big, rows, seed)
        gen_s = time.perf_counter() - t0
        with open(big, encoding="utf-8") as f, open(tmp / "small.jsonl", "w", encoding="utf-8") as g:
            for _, line in zip(range(small), f):
                g.write(line)
        with open(tmp / "small.jsonl", encoding="utf-8") as f:
            corpus = [json.loads(ln)["chosen"] for _, ln in zip(range(5000), f)]
        tok_path = Tokenizer.train(corpus, vocab_size=8192).save(tmp / "tokenizer.json")
        results = []
        for tokenizer in (None, tok_path):
            for path in (tmp / "small.jsonl", big):
                res = _audit_in_child(path, tokenizer)
                res.update(tokenizer=tokenizer is not None, file_mb=path.stat().st_size / 2**20,
                           loadavg=list(os.getloadavg()))
                results.append(res)
                print(format_row(res), flush=True)
        return {"rows": rows, "small": small, "planted": planted, "generate_seconds": gen_s,
                "bytes_per_row": big.stat().st_size / rows, "cpu_count": os.cpu_count(), "results": results}


def format_row(r: dict) -> str:
    return (f"{'tokens' if r['tokenizer'] else 'chars':<7}{r['rows']:>10,} rows {r['file_mb']:>8.1f} MB "
            f"{r['rows_per_s']:>9,.0f} rows/s ({r['rows_per_cpu_s']:,.0f} per CPU-s)  peak RSS "
            f"{r['peak_rss_mb']:>6.0f} MB (after imports {r['baseline_rss_mb']:.0f} MB)  "
            f"load {r['loadavg'][0]:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.bench.audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000, help="rows of the smaller file (memory comparison)")
    ap.add_argument("--quick", action="store_true", help="20k and 2k rows: a smoke run")
    ap.add_argument("--work-dir", default=None, help="where the generated files go (default: the temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    rows, small = (20_000, 2_000) if a.quick else (a.rows, a.small)
    out = run_audit_bench(rows, small, a.work_dir)
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
