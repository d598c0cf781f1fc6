"""--resume over damaged checkpoints: the damage is named, an earlier checkpoint that validates is
used (and gives the uninterrupted run's weights), or the run stops with one line; temporary
directories of killed saves are removed; a finished run is left as it is."""
import json
import os

import pytest
import torch

from fastdpo.cli import main as cli_main
from fastdpo.models.checkpoint import load_checkpoint, save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    tok = Tokenizer.train(["what is plus the answer yes no bad 0123456789 + = ?"] * 30, vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(d / "sft", GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                                             n_embd=16)), tokenizer=tok)
    rows = [{"prompt": f"what is {a}+{b}?", "chosen": f"{a + b}", "rejected": f"{a + b} bad"}
            for a in range(10, 20) for b in range(2)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def train(base, run, *extra, steps=4, save_every=1, keep=10):
    argv = ["train", "--sft-checkpoint", str(base / "sft"), "--wandb", "disabled", "--report-to", "none",
            "--set", f"data.path=[{base / 'pairs.jsonl'}]", "--set", f"train.output_dir={base / 'runs'}",
            "--set", f"train.run_name={run}", "--set", f"train.max_steps={steps}",
            "--set", "train.batch_size=4",
            "--set", f"train.save_every={save_every}", "--set", f"train.keep_checkpoints={keep}",
            "--set", "train.progress=false", "--set", "train.device=cpu", "--set", "health.enabled=false",
            "--set", "train.mixed_precision=fp32", "--set", "train.log_every=1", *extra]
    return cli_main(argv)


def interrupted(base, run, steps):
    """A run of ``steps`` whose process died while saving its final checkpoint: its newest
    checkpoint is step ``steps - 1``."""
    assert train(base, run, steps=steps) == 0
    d = base / "runs" / run
    (d / "final").rename(d / ".final.tmp-deadbeef")   # as a kill during the final save leaves it
    return d


def weights(path):
    return load_checkpoint(path)[0].state_dict()


DAMAGE = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:100]),
    "random bytes": lambda f: f.write_bytes(os.urandom(2048)),
    "no optimizer": lambda f: torch.save({"step": 3, "total_steps": 4, "rng": torch.get_rng_state()}, f),
    "bad rng": lambda f: torch.save({**torch.load(f, weights_only=True), "rng": torch.zeros(3)}, f),
    "wrong step": lambda f: torch.save({**torch.load(f, weights_only=True), "step": 1}, f),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_trainer_state_falls_back_to_the_previous_checkpoint(base, damage, capsys):
    run = f"fallback-{damage.replace(' ', '-')}"
    d = interrupted(base, run, 4)
    DAMAGE[damage](d / "step-000003" / "trainer_state.pt")
    capsys.readouterr()
    assert train(base, run, "--resume") == 0
    out = capsys.readouterr().out
    assert f"checkpoint {d / 'step-000003'} is damaged: {d / 'step-000003' / 'trainer_state.pt'}" in out
    assert f"resuming from {d / 'step-000002'}, the newest checkpoint that validates" in out
    assert "resumed from" in out and "at step 2" in out
    assert not list(d.glob(".*.tmp-*"))          # the killed save's leftovers are gone
    if damage == "truncated":                     # the fallback run ends where an unbroken one does
        assert train(base, "straight", steps=4) == 0
        a, b = weights(d / "final"), weights(base / "runs" / "straight" / "final")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_weights_fall_back_too(base, capsys):
    d = interrupted(base, "fallback-weights", 3)
    w = d / "step-000002" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-50])
    capsys.readouterr()
    assert train(base, "fallback-weights", "--resume") == 0
    out = capsys.readouterr().out
    assert f"{w}: corrupt or truncated" in out and "resuming from" in out and "step-000001" in out


def test_no_valid_checkpoint_is_one_line(base, capsys):
    d = interrupted(base, "none-valid", 2)
    (d / "step-000001" / "trainer_state.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert train(base, "none-valid", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"fastdpo train: error: --resume: no checkpoint in {d} validates")
    assert "trainer_state.pt: unreadable" in err


def test_stale_temporary_directories_are_removed_when_a_run_starts(base, capsys):
    d = base / "runs" / "stale"
    for name in (".step-000002.tmp-0123abcd", ".final.tmp-89abcdef"):
        (d / name).mkdir(parents=True)
        (d / name / "model.safetensors").write_bytes(b"x" * 1000)
    (d / "keep-me").mkdir()
    assert train(base, "stale", steps=1) == 0
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["final", "keep-me"]
    assert "removed" in capsys.readouterr().out


def test_resume_of_a_finished_run_writes_nothing(base, capsys):
    assert train(base, "finished", steps=2) == 0
    d = base / "runs" / "finished"
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train(base, "finished", "--resume", steps=2) == 0   # the same plan: nothing left to do
    assert f"is finished: {d / 'final'} (step 2)" in capsys.readouterr().out
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert after == before


def test_a_continued_runs_step_past_final_is_the_newest_checkpoint(base):
    """A finished run (final at step 2) continued with a longer plan writes step-3 next to the old
    final; killed there, --resume must pick step-3, not final (which would redo and overwrite it)."""
    import shutil

    from fastdpo.training.runs import checkpoints_newest_first, latest_checkpoint
    assert train(base, "long", steps=4) == 0    # its step-3 checkpoint is an intermediate one, kept
    assert train(base, "short", steps=2) == 0
    short = base / "runs" / "short"
    shutil.copytree(base / "runs" / "long" / "step-000003", short / "step-000003")
    assert checkpoints_newest_first(short)[:2] == [short / "step-000003", short / "final"]
    assert latest_checkpoint(short) == short / "step-000003"
    (short / "step-000003" / "config.json").write_text("{")   # damaged: final is next
    assert checkpoints_newest_first(short)[:2] == [short / "step-000003", short / "final"]
    (short / "final" / "config.json").write_text("{")         # a final whose step is unknown comes first
    assert checkpoints_newest_first(short)[0] == short / "final"
