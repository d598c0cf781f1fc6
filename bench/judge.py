"""Judge-phase throughput: OpenAIJudge requests/s against a local ``fastdpo serve`` at several
concurrencies, and preference pairs mined per minute end to end.

The judge figures measure the client + HTTP + batching path, with the served model generating
only the few tokens a verdict takes; on the GPU box the judge is vLLM and its own speed dominates.
The server runs as a separate process (as in real use), so client threads and the model do not
share one interpreter lock.

    python -m fastdpo.bench.judge [--ckpt DIR] [--requests 64] [--concurrency 1,8,32] [--json out.json]
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

import torch

from fastdpo.generation.judge import OpenAIJudge, ProgrammaticJudge
from fastdpo.models.checkpoint import save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.tokenizer import Tokenizer

_WORDS = ("ant bee cat dog elk fox gnu hen ink jam kit log map nut owl pig rat sun toy urn van wig yak zoo "
          "reverse sort count add the words digits alphabetically how many answer score better").split()


def make_tiny_checkpoint(path: str | Path, *, n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
                         block_size: int = 1024, seed: int = 0, stop_logit: float = 0.0) -> Path:
    """A randomly initialised GPT (2 layers, 32 wide) with a small trained BPE tokenizer:
    enough to exercise sampling, serving and mining end to end in a second.

    ``stop_logit`` raises the end-of-turn token's logit by about that much everywhere (the final
    norm's bias moved along its output embedding), so the random model ends its turns like a
    trained one instead of always running out of tokens (3: most answers end within a dozen tokens)."""
    import random
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(12)) + f" {rng.randint(0, 99)}." for _ in range(300)]
    tok = Tokenizer.train(corpus, vocab_size=320, min_frequency=2)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd))
    if stop_logit:
        w = model.lm_head_weight[tok.eos_id].detach()
        with torch.no_grad():
            model.transformer.ln_f.bias += stop_logit * w / w.pow(2).sum()
    return save_checkpoint(path, model, tokenizer=tok)


def start_server(ckpt: str | Path, *, extra_args: tuple[str, ...] = (), timeout: float = 60.0,
                 env: dict | None = None):
    """``fastdpo serve --port 0`` as a subprocess; returns ``(process, base_url, model_name)``.
    ``env`` adds environment variables (tests pass OMP_NUM_THREADS=1)."""
    cmd = [sys.executable, "-m", "fastdpo.cli", "serve", "--ckpt", str(ckpt), "--port", "0", *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            url = line.split("listening on ", 1)[1].split()[0]
            name = line.rsplit("(model ", 1)[1].rstrip(")\n")
            return proc, url, name
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"fastdpo serve did not start: {line!r} {proc.stderr.read()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_judge_requests(url: str, model_name: str, concurrencies=(1, 8, 32),
                         n_requests: int = 64) -> list[dict]:
    rows = []
    items = [(f"Sort the words alphabetically: {' '.join(_WORDS[i % 20: i % 20 + 3])}", f"answer {i}")
             for i in range(n_requests)]
    for c in concurrencies:
        judge = OpenAIJudge(url, model_name, concurrency=c, max_tokens=4, timeout=60, max_retries=2)
        judge.score_many(items[: min(c, 4)])  # warm-up: connections, first batch
        judge.stats.requests = judge.stats.invalid = 0
        t0 = time.perf_counter()
        judge.score_many(items)
        dt = time.perf_counter() - t0
        rows.append({"phase": "judge", "name": f"openai_judge_c{c}", "concurrency": c,
                     "requests": n_requests, "seconds": dt, "items_per_s": n_requests / dt, "unit": "req/s",
                     "invalid": judge.stats.invalid, "retries": judge.stats.retries})
        judge.close()
    return rows


def _task_prompts(n: int) -> list[str] | None:
    try:
        import random

        from fastdpo.demo.task import FAMILIES, make_item
    except ImportError:
        return None
    rng = random.Random(1)
    return [make_item(rng, FAMILIES[i % len(FAMILIES)]).instruction for i in range(n)]


def bench_mining(ckpt: str | Path, n_prompts: int = 64, batch_size: int = 16, max_new_tokens: int = 32,
                 judge: str = "task", dtype: torch.dtype | None = None, device: str = "cpu",
                 trained: bool = True) -> dict:
    """Pairs/min end to end (sample K=4 -> judge -> filter -> write, overlapped) on task prompts.

    ``judge="task"`` scores with the demo task's checker (real kept rate for a trained demo model);
    ``judge="spread"`` is a stand-in that spreads scores over 1-10 so a random model still yields
    pairs: it measures the pipeline's capacity, not a kept rate."""
    from fastdpo.generation.mining import mine_pairs
    from fastdpo.models.checkpoint import load_policy
    model, tok = load_policy(ckpt, device=device)
    prompts = _task_prompts(n_prompts) or [f"Reverse the words: {' '.join(_WORDS[i % 20: i % 20 + 3])}"
                                           for i in range(n_prompts)]
    if judge == "task":
        from fastdpo.demo.task import score
        j = ProgrammaticJudge(score, name="task")
    else:
        j = ProgrammaticJudge(lambda _i, r: 1 + (7 * len(r)) % 10, name="spread")
    with tempfile.TemporaryDirectory() as d:
        stats = mine_pairs(model, tok, prompts, j, Path(d) / "pairs.jsonl", batch_size=batch_size,
                           max_new_tokens=max_new_tokens, dtype=dtype, progress=False)
    return {"phase": "judge", "name": f"mine_pairs_{j.name}", "prompts": stats.prompts_done,
            "pairs": stats.pairs_kept, "seconds": stats.elapsed_s, "items_per_s": stats.pairs_per_min / 60,
            "pairs_per_min": stats.pairs_per_min, "prompts_per_s": stats.prompts_per_s, "unit": "pairs/s",
            "kept_pct": stats.kept_pct, "sample_s": stats.sample_s, "judge_s": stats.judge_s,
            "samples_per_s": stats.samples_judged / stats.elapsed_s if stats.elapsed_s else 0.0,
            "model_params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype),
            "backend": "builtin", "device": str(device), "ckpt": str(ckpt), "trained_model": trained,
            "note": _mining_note(judge, trained, stats.pairs_kept)}


def _mining_note(judge: str, trained: bool, pairs: int) -> str:
    if judge == "spread":
        return ("stand-in judge spreading scores over 1-10: the pipeline's capacity (sample, judge, filter, "
                "write), not a kept rate")
    if not trained:
        return ("random-weight model of the demo's shape (no trained checkpoint given): its answers almost "
                "never pass the task's checker, so pairs/min is ~0 by construction; pass --mining-ckpt "
                "(e.g. runs/demo/sft/final) to measure a trained model")
    return f"trained model with the task's own judge: {pairs} pairs kept"


# Sampler backends mined from in the judge phase: name -> function(ckpt, **bench_mining kwargs) -> row.
# Another backend (a vLLM server, an OpenAI-compatible sampler) adds its entry here and gets its
# own mining row in `fastdpo bench`.
MINING_BACKENDS = {"builtin": bench_mining}


def run_judge_bench(ckpt: str | Path | None = None, *, concurrencies=(1, 8, 32), n_requests: int = 64,
                    mining_ckpt: str | Path | None = None, n_prompts: int = 64,
                    dtype: torch.dtype | None = None, server_threads: int | None = None,
                    device: str = "cpu", backends: tuple[str, ...] = ("builtin",)) -> list[dict]:
    """Rows for ``fastdpo bench``: judge req/s at each concurrency, then pairs/min.

    ``ckpt`` is served for the judge figures (default: a 2-layer, 32-wide random model, so the
    figures measure client, HTTP and batching rather than the model). ``mining_ckpt`` is the policy
    mined from: pass the demo's SFT checkpoint; by default a random model of the demo's shape
    (preset 'tiny': 4 layers, 160 wide) is mined with both the task judge and the score-spreading
    stand-in (a random model's answers rarely make task pairs; each row's ``note`` says which it
    is). One mining row per (judge, sampler backend in ``backends``, see ``MINING_BACKENDS``)."""
    with tempfile.TemporaryDirectory() as d:
        if ckpt is None:
            ckpt = make_tiny_checkpoint(Path(d) / "tiny")
        extra = ("--threads", str(server_threads)) if server_threads else ()
        proc, url, name = start_server(ckpt, extra_args=extra)
        try:
            rows = bench_judge_requests(url, name, concurrencies, n_requests)
            for r in rows:
                r["server_threads"] = server_threads or torch.get_num_threads()
        finally:
            stop_server(proc)
        judges = ("task",) if mining_ckpt else ("task", "spread")
        trained = mining_ckpt is not None
        if mining_ckpt is None:
            mining_ckpt = make_tiny_checkpoint(Path(d) / "demo-shaped", n_layer=4, n_embd=160, n_head=4,
                                               block_size=256, stop_logit=3.0)
        if _task_prompts(1) is None:
            judges = ("spread",)
        for backend in backends:
            for j in judges:
                rows.append(MINING_BACKENDS[backend](mining_ckpt, n_prompts=n_prompts, judge=j, dtype=dtype,
                                                     device=device, trained=trained))
    return rows


def format_rows(rows: list[dict]) -> str:
    out = [f"{'name':<28} {'rate':>12}  detail"]
    for r in rows:
        if "concurrency" in r:
            out.append(f"{r['name']:<28} {r['items_per_s']:>8.1f} req/s  {r['requests']} requests, "
                       f"{r['invalid']} non-verdict replies")
        else:
            out.append(f"{r['name']:<28} {r['pairs_per_min']:>6.1f} pairs/min  {r['prompts']} prompts, "
                       f"{r['kept_pct']:.0f}% kept, {r['prompts_per_s']:.1f} prompts/s ({r['note']})")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.bench.judge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint to serve (default: a tiny random model)")
    ap.add_argument("--mining-ckpt", default=None, help="policy to mine from (default: --ckpt)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--bf16", action="store_true", help="sample in bf16 autocast while mining")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads in the served process (0 = torch default; 1 avoids OpenMP stalls "
                         "on a busy CPU with a tiny model)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    rows = run_judge_bench(a.ckpt, concurrencies=tuple(int(c) for c in a.concurrency.split(",")),
                           n_requests=a.requests, mining_ckpt=a.mining_ckpt, n_prompts=a.prompts,
                           dtype=torch.bfloat16 if a.bf16 else None, server_threads=a.server_threads)
    print(format_rows(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
