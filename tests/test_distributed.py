"""Multi-process training and mining (torch.distributed, gloo on CPU, 2 processes).

The distributed runs are real ``torch.distributed.run`` launches of this file's ``__main__`` worker
(or of ``fastdpo``) as subprocesses with timeouts; each uses a 2-layer, 32-wide model for a few
steps. The single-process runs they are compared with run in the test process.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdpo import runtime
from fastdpo.models.checkpoint import load_checkpoint, save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.config import DPOConfig, PreferenceDatasetConfig, TrainingConfig

HERE = Path(__file__).resolve()
STEPS = 4
LAUNCH_TIMEOUT = 240


# --------------------------------------------------------------------------- world size 1


def test_single_process_helpers_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime.init_from_env() is False and not runtime.is_distributed()
    assert (runtime.rank(), runtime.world_size(), runtime.is_main()) == (0, 1, True)
    assert runtime.shard(range(5)) == [0, 1, 2, 3, 4]
    assert runtime.all_gather_object({"a": 1}) == [{"a": 1}]
    assert runtime.broadcast_object(7) == 7
    assert runtime.any_rank(False) is False and runtime.all_ranks(True) is True
    t = torch.arange(6.0).reshape(3, 2)
    assert runtime.gather_rows(t, [0]) is t
    sums = {"loss": torch.tensor(1.5), "n": 3}
    assert runtime.all_reduce_sums(sums) is sums
    assert runtime.local_device("cuda") == torch.device("cuda")
    assert runtime.run_on_main(lambda x: x + 1, 1) == 2
    runtime.barrier()


def test_run_on_main_raises_rank0_error_and_env_is_checked(monkeypatch):
    def bad():
        raise ValueError("runs/x already holds checkpoints")

    with pytest.raises(ValueError, match="already holds"):
        runtime.run_on_main(bad)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR.*torchrun"):
        runtime.init_from_env()
    with pytest.raises(ValueError, match="inside a torchrun launch"):
        runtime.relaunch(2, "fastdpo.cli", ["train"])


def test_shard_deals_round_robin():
    # what rank r of 3 would get: the shards are disjoint and cover everything
    items = list(range(10))
    shards = [items[r::3] for r in range(3)]
    assert sorted(sum(shards, [])) == items and shards[1] == [1, 4, 7]


# --------------------------------------------------------------------------- launching helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
            **extra}


def torchrun(args: list[str], timeout: float = LAUNCH_TIMEOUT, **extra_env) -> subprocess.CompletedProcess:
    # --standalone: torchrun binds a free port itself (no window for another process to take it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(**extra_env), timeout=timeout)


def worker(mode: str, spec: dict, **kw) -> subprocess.CompletedProcess:
    return torchrun([str(HERE), mode, json.dumps(spec)], **kw)


# --------------------------------------------------------------------------- training fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tok = Tokenizer.train(["what is plus the answer yes no good bad 0123456789 + = ?"] * 30, vocab_size=320)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(d / "sft", model, tokenizer=tok)
    rows = [{"prompt": f"what is {a}+{b}?", "chosen": f"{a + b}", "rejected": f"{a + b} bad" * (1 + b % 2)}
            for a in range(10, 30) for b in range(3)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def spec(work: Path, run: str, **train) -> dict:
    """One run's configuration; ``batch_size`` is per process."""
    t = dict(run_name=run, output_dir=str(work / "runs"), batch_size=4, micro_batch_size=2,
             learning_rate=3e-3, max_steps=STEPS, log_every=1, mixed_precision="fp32", wandb="disabled",
             progress=True, seed=3, device="cpu")
    return {"sft": str(work / "sft"), "train": {**t, **train},
            "dpo": {"beta": 0.3, "rpo_alpha": 0.5, "reference": "cached"},
            "data": {"path": [str(work / "pairs.jsonl")], "val_size": 6}}


def run_spec(s: dict, resume: bool = False, on_step=None) -> Path:
    from fastdpo.training.dpo import run_dpo
    return run_dpo(s["sft"], TrainingConfig(**s["train"]), DPOConfig(**s["dpo"]),
                   PreferenceDatasetConfig(**s["data"]), resume=resume, on_step=on_step)


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def weights(path: Path) -> dict:
    return load_checkpoint(path)[0].state_dict()


def assert_same_run(run_dir: Path, ref_dir: Path, atol: float = 1e-5, weight_atol: float = 3e-5) -> None:
    """Per-step losses within ``atol`` (float32 reduction order differs); weights within
    ``weight_atol``: AdamW divides by sqrt(v), so gradients near zero amplify rounding a little."""
    got, want = metrics(run_dir), metrics(ref_dir)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in ("loss", "loss/dpo", "rewards/margins", "grad_norm"):
            assert g[key] == pytest.approx(w[key], abs=atol), (g["step"], key)
    (gv,), (wv,) = metrics(run_dir, "val"), metrics(ref_dir, "val")
    assert gv["loss"] == pytest.approx(wv["loss"], abs=atol)
    a, b = weights(run_dir / "final"), weights(ref_dir / "final")
    assert a.keys() == b.keys()
    loss_diff = max(abs(g["loss"] - w["loss"]) for g, w in zip(got, want))
    print(f"{run_dir.name}: max |loss diff| {loss_diff:.2e}, "
          f"max |weight diff| {max(float((a[k] - b[k]).abs().max()) for k in a):.2e}")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=weight_atol, rtol=0), k


@pytest.fixture(scope="module")
def single(work):
    """The one-process run with twice the per-process batch (micro-batches of 2, accumulation 4)."""
    s = spec(work, "single", batch_size=8, progress=False)
    run_spec(s)
    return Path(s["train"]["output_dir"]) / "single"


# --------------------------------------------------------------------------- training


def test_ddp_two_ranks_match_one_process_with_twice_the_batch(work, single):
    """``fastdpo train --nproc 2`` (torchrun underneath): per-rank batch 4 == one process, batch 8."""
    s = spec(work, "ddp")
    cfg = work / "ddp.yaml"
    cfg.write_text(json.dumps({"sft_checkpoint": s["sft"], **{k: s[k] for k in ("train", "dpo", "data")}}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastdpo.cli", "train", "--nproc", "2",
                           "--config", str(cfg)],
                          capture_output=True, text=True, env=env(), timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    print(f"ddp launch {time.perf_counter() - t0:.1f}s")
    run_dir = work / "runs" / "ddp"
    assert_same_run(run_dir, single)
    out = proc.stdout
    assert "distributed: 2 ranks x 4 pairs = 8 pairs per optimizer step (ddp)" in out
    assert out.count("step=1 loss=") == 1 and out.count("data: ") == 1   # rank 0 talks, rank 1 does not
    # one cache entry per layout: the single run's packed rows, the ranks' shared separate-rows one
    assert len(list((work / "runs" / "ref_cache").glob("ref-logps-*.safetensors"))) == 2


def test_ddp_lora_with_gradient_checkpointing_matches_one_process(work):
    """Only the adapters are DDP's to reduce; the per-step reference is each rank's base view."""
    lora = dict(finetuning_type="lora", lora_rank=4, gradient_checkpointing=True)
    one = spec(work, "single-lora", batch_size=8, progress=False, **lora)
    one["dpo"]["reference"] = "model"
    run_spec(one)
    two = spec(work, "ddp-lora", **lora)
    two["dpo"]["reference"] = "model"
    proc = worker("train", two)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert_same_run(work / "runs" / "ddp-lora", work / "runs" / "single-lora")
    assert (work / "runs" / "ddp-lora" / "final" / "adapter_model.safetensors").is_file()


def test_ddp_two_ranks_packed_match_one_process_padded(work, single):
    """``train.packing`` under DDP: each rank's separate rows packed (on CPU into bins, through
    PolicyForward) train as the padded one-process run does."""
    s = spec(work, "ddp-packed", packing=True)
    s["dpo"]["reference_cache_dir"] = str(work / "cache-packed")   # its own entry, apart from the others
    proc = worker("train", s)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert_same_run(work / "runs" / "ddp-packed", single)


def test_fsdp2_two_ranks_match_one_process_and_save_one_file(work, single):
    s = spec(work, "fsdp", parallel="fsdp", save_every=2)
    proc = worker("train", s)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    run_dir = work / "runs" / "fsdp"
    assert_same_run(run_dir, single)
    # the sharded run's checkpoints are the ordinary single-file ones, loadable by any process
    for ckpt in (run_dir / "step-000002", run_dir / "final"):
        files = sorted(p.name for p in ckpt.iterdir())
        assert files == ["config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"]
    state = torch.load(run_dir / "final" / "trainer_state.pt", weights_only=True)
    assert sorted(state["optimizer"]["state"]) == list(range(len(weights(run_dir / "final"))))
    assert len(state["rng_per_rank"]) == 2


def test_killed_rank_ends_the_others_and_two_ranks_resume(work, single):
    """SIGKILL rank 1 right after step 3 (the step-2 checkpoint exists): rank 0 is blocked in the
    next collective; torchrun must end it with an error. Then resume on 2 ranks from step 2."""
    s = spec(work, "killed", save_every=2)
    stamp = work / "killed-at"
    t0 = time.perf_counter()
    proc = worker("train", {**s, "kill": [1, 3], "stamp": str(stamp)})
    end = time.time()
    assert proc.returncode != 0
    assert "exitcode  : -9" in proc.stderr and "(SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    exit_after_kill = end - float(stamp.read_text())
    print(f"killed run: {time.perf_counter() - t0:.1f}s, others gone {exit_after_kill:.2f}s after the kill")
    assert exit_after_kill < 30
    run_dir = work / "runs" / "killed"
    assert (run_dir / "step-000002").is_dir() and not (run_dir / "final").exists()

    proc = worker("train", {**s, "resume": True})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert_same_run(run_dir, single)
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))   # no duplicated steps


def test_without_an_agent_a_dead_peer_is_an_error_not_a_hang(tmp_path):
    """Two processes started by hand (no torchrun agent to reap them): rank 1 dies mid-run and
    rank 0's next collective fails within seconds on the closed gloo connection."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(HERE), "collective", json.dumps({"stamp": str(tmp_path)})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port, FASTDPO_DIST_TIMEOUT="20"))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    end = time.time()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode not in (0, None), outs[0]
    assert "peer" in outs[0][1].lower() or "connection" in outs[0][1].lower(), outs[0][1][-2000:]
    waited = end - float((tmp_path / "killed-at").read_text())
    print(f"no agent: rank 0 failed {waited:.2f}s after rank 1 died")
    assert waited < 30


# --------------------------------------------------------------------------- mining

TOY_JUDGE = '''
def score(instruction, response):
    return 1 + (len(response) * 7 + len(instruction)) % 10
'''


def test_sharded_mining_equals_unsharded_and_resumes_after_a_killed_rank(tmp_path):
    """``torchrun -m fastdpo.cli pairs`` on 2 ranks: rank 1 is SIGKILLed after writing batch 1's pairs
    but before recording them; the rerun resumes both shards and merges them into the same bytes
    (pairs and progress file) as one process mining everything."""
    from fastdpo.bench.judge import make_tiny_checkpoint
    from fastdpo.generation.judge import make_judge
    from fastdpo.generation.mining import mine_pairs
    from fastdpo.models.checkpoint import load_policy

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", block_size=96, stop_logit=3.0)   # ends most turns
    (tmp_path / "toyjudge.py").write_text(TOY_JUDGE)
    words = "fox dog elk gnu hen ink jam kit owl pig".split()
    rows = [f"Reverse the words: {w} cat {i}" for i, w in enumerate(words)]
    rows.insert(5, "word " * 200)   # too long: dropped by every rank alike
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    settings = {"batch_size": 3, "max_new_tokens": 12, "seed": 5}
    sys.path.insert(0, str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the ranks (torchrun sets OMP_NUM_THREADS=1)
    try:
        model, tok = load_policy(ckpt)
        ref = tmp_path / "unsharded.jsonl"
        want = mine_pairs(model, tok, prompts, make_judge("toyjudge:score"), ref, progress=False, **settings)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(tmp_path))
    out = tmp_path / "sharded.jsonl"
    args = ["-m", "fastdpo.cli", "pairs", "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", str(out),
            "--judge", "toyjudge:score", "--no-progress", *[x for k, v in settings.items()
                                                             for x in (f"--{k.replace('_', '-')}", str(v))]]
    faults = Path(__file__).parent / "faults"   # sitecustomize: kills a child at a chosen point
    pythonpath = os.pathsep.join([str(tmp_path), str(faults), os.environ.get("PYTHONPATH", "")])
    killed = torchrun(args, PYTHONPATH=pythonpath, FASTDPO_FAULT="kill-mining:1:pairs")
    assert killed.returncode != 0 and "(SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert not out.exists() and (tmp_path / "sharded.jsonl.shard-1-of-2").is_file()
    done = torchrun(args, PYTHONPATH=pythonpath)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    assert want.pairs_kept > 0 and out.read_bytes() == ref.read_bytes()
    progress = [tmp_path / f"{name}.jsonl.progress.jsonl" for name in ("sharded", "unsharded")]
    assert progress[0].read_bytes() == progress[1].read_bytes()
    assert f"pairs kept: {want.pairs_kept}" in done.stdout and "2 shards" in done.stdout
    assert done.stdout.count("pairs kept") == 1


# --------------------------------------------------------------------------- the worker


def _train(s: dict) -> None:
    kill = s.get("kill")

    def on_step(trainer, step):
        if kill and runtime.rank() == kill[0] and step == kill[1]:
            Path(s["stamp"]).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    run_spec(s, resume=s.get("resume", False), on_step=on_step)


def _collective(s: dict) -> None:
    runtime.init_from_env()
    x = torch.ones(4)
    for i in range(1000):
        torch.distributed.all_reduce(x)
        x.fill_(1)
        if i == 20 and runtime.rank() == 1:
            (Path(s["stamp"]) / "killed-at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.01)


if __name__ == "__main__":
    {"train": _train, "collective": _collective}[sys.argv[1]](json.loads(sys.argv[2]))
