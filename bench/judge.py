"""Judge-phase throughput: OpenAIJudge requests/s against a local ``fastdpo serve`` at several
concurrencies, and preference pairs mined per minute end to end.

The judge figures measure the client + HTTP + batching path, with the served model generating
only the few tokens a verdict takes; on the GPU box the judge is vLLM and its own speed dominates.
The server runs as a separate process (as in real use), so client threads and the model do not
share one interpreter lock.

    python -m bench.judge [--ckpt DIR] [--requests 64] [--concurrency 1,8,32] [--json out.json]
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

from dpo.checkpoint import save_checkpoint
from dpo.judge import OpenAIJudge, ProgrammaticJudge
from dpo.model import GPT, GPTConfig
from dpo.tokenizer import Tokenizer

_WORDS = ("ant bee cat dog elk fox gnu hen ink jam kit log map nut owl pig rat sun toy urn van wig yak zoo "
          "reverse sort count add the words digits alphabetically how many answer score better").split()


def make_tiny_checkpoint(path: str | Path, *, n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
                         block_size: int = 1024, seed: int = 0) -> Path:
    """A randomly initialised GPT (2 layers, 32 wide) with a small trained BPE tokenizer:
    enough to exercise sampling, serving and mining end to end in a second."""
    import random
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(12)) + f" {rng.randint(0, 99)}." for _ in range(300)]
    tok = Tokenizer.train(corpus, vocab_size=320, min_frequency=2)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd))
    return save_checkpoint(path, model, tokenizer=tok)


def start_server(ckpt: str | Path, *, extra_args: tuple[str, ...] = (), timeout: float = 60.0,
                 env: dict | None = None):
    """``fastdpo serve --port 0`` as a subprocess; returns ``(process, base_url, model_name)``.
    ``env`` adds environment variables (tests pass OMP_NUM_THREADS=1)."""
    cmd = [sys.executable, "-m", "dpo.cli", "serve", "--ckpt", str(ckpt), "--port", "0", *extra_args]
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


def _demo_judge():
    try:
        from dpo.task import score
        return ProgrammaticJudge(score, name="task")
    except ImportError:
        return None


def bench_mining(ckpt: str | Path, prompts: list[str] | None = None, n_prompts: int = 64,
                 batch_size: int = 16, max_new_tokens: int = 32, dtype: torch.dtype | None = None) -> dict:
    """Pairs/min end to end (sample K=4 -> judge -> filter -> write) with the demo task's judge."""
    from dpo.pairs import load_policy, mine_pairs
    model, tok = load_policy(ckpt)
    judge = _demo_judge()
    if prompts is None:
        try:
            from dpo.task import make_items  # type: ignore[attr-defined]
            prompts = [it.instruction for it in make_items(n_prompts, seed=1)]
        except (ImportError, TypeError):
            prompts = [f"Reverse the words: {' '.join(_WORDS[i % 20: i % 20 + 3])}" for i in range(n_prompts)]
    if judge is None or not _task_accepts(judge, prompts[0]):
        # No demo task here: a length-based stand-in keeps the pipeline busy the same way.
        judge = ProgrammaticJudge(lambda _i, r: 1 + len(r.split()) % 10, name="length")
    with tempfile.TemporaryDirectory() as d:
        stats = mine_pairs(model, tok, prompts[:n_prompts], judge, Path(d) / "pairs.jsonl",
                           batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype, progress=False)
    return {"phase": "judge", "name": f"mine_pairs_{judge.name}", "prompts": stats.prompts_done,
            "pairs": stats.pairs_kept, "seconds": stats.elapsed_s, "items_per_s": stats.pairs_per_min / 60,
            "pairs_per_min": stats.pairs_per_min, "prompts_per_s": stats.prompts_per_s, "unit": "pairs/s",
            "kept_pct": stats.kept_pct, "sample_s": stats.sample_s, "judge_s": stats.judge_s,
            "model_params": sum(p.numel() for p in model.parameters())}


def _task_accepts(judge, instruction: str) -> bool:
    try:
        judge.score(instruction, "x")
        return True
    except ValueError:
        return False


def run_judge_bench(ckpt: str | Path | None = None, *, concurrencies=(1, 8, 32), n_requests: int = 64,
                    mining_ckpt: str | Path | None = None, n_prompts: int = 64,
                    dtype: torch.dtype | None = None) -> list[dict]:
    """Rows for ``fastdpo bench``: judge req/s at each concurrency, then pairs/min.

    ``ckpt`` is served for the judge figures (default: a tiny random model); ``mining_ckpt``
    (default: ``ckpt``) is the policy mined from (use the demo's SFT checkpoint)."""
    with tempfile.TemporaryDirectory() as d:
        if ckpt is None:
            ckpt = make_tiny_checkpoint(Path(d) / "tiny")
        proc, url, name = start_server(ckpt)
        try:
            rows = bench_judge_requests(url, name, concurrencies, n_requests)
        finally:
            stop_server(proc)
        rows.append(bench_mining(mining_ckpt or ckpt, n_prompts=n_prompts, dtype=dtype))
    return rows


def format_rows(rows: list[dict]) -> str:
    out = [f"{'name':<28} {'rate':>12}  detail"]
    for r in rows:
        if "concurrency" in r:
            out.append(f"{r['name']:<28} {r['items_per_s']:>8.1f} req/s  {r['requests']} requests, "
                       f"{r['invalid']} non-verdict replies")
        else:
            out.append(f"{r['name']:<28} {r['pairs_per_min']:>6.1f} pairs/min  {r['prompts']} prompts, "
                       f"{r['kept_pct']:.0f}% kept, {r['prompts_per_s']:.1f} prompts/s")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.judge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint to serve (default: a tiny random model)")
    ap.add_argument("--mining-ckpt", default=None, help="policy to mine from (default: --ckpt)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--bf16", action="store_true", help="sample in bf16 autocast while mining")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    rows = run_judge_bench(a.ckpt, concurrencies=tuple(int(c) for c in a.concurrency.split(",")),
                           n_requests=a.requests, mining_ckpt=a.mining_ckpt, n_prompts=a.prompts,
                           dtype=torch.bfloat16 if a.bf16 else None)
    print(format_rows(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
