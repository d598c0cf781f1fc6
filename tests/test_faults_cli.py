"""Every command over bad inputs (missing files, bad configs, bad --set values, bad data, bad
checkpoints, devices the machine lacks): exit status 2, one ``fastdpo <command>: error:`` line,
never a traceback. Most cases run in-process (``fastdpo.cli.main``); a few as real processes."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastdpo.cli import main as cli_main
from fastdpo.models.checkpoint import save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """Good and bad inputs, by name."""
    d = tmp_path_factory.mktemp("sweep")
    tok = Tokenizer.train(["what is plus the answer yes no bad 0123456789 + = ?"] * 30, vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(d / "ckpt", GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                                              n_embd=16)), tokenizer=tok)
    for name, patch in (("float_layers", {"n_layer": 4.0}), ("huge", {"n_embd": 65536, "n_head": 16})):
        shutil.copytree(d / "ckpt", d / name)
        cfg = json.loads((d / name / "config.json").read_text())
        cfg["model"].update(patch)
        (d / name / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(d / "ckpt", d / "latin1")
    (d / "latin1" / "config.json").write_bytes(b'{"format": "caf\xe9"}')
    shutil.copytree(d / "ckpt", d / "no_weights")
    (d / "no_weights" / "model.safetensors").write_bytes(b"\x00" * 10)
    rows = [{"prompt": f"what is {a}?", "chosen": f"{a}", "rejected": f"{a} bad"} for a in range(8)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "trailing.json").write_text(json.dumps(rows) + "\n" + json.dumps(rows[0]) + "\n")
    (d / "surrogate.jsonl").write_text('{"prompt": "q", "chosen": "\\ud800", "rejected": "b"}\n')
    (d / "deep.jsonl").write_text('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n")
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    (d / "prompts_bad.jsonl").write_text("{not json\n")
    (d / "text_latin1.txt").write_bytes(b"caf\xe9 au lait\n" * 20)
    (d / "inf.yaml").write_text("train:\n  epochs: .inf\n")
    (d / "unknown.yaml").write_text("train:\n  lerning_rate: 0.1\n")
    (d / "broken.yaml").write_text("train: [1,\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "demo_bad.yaml").write_text("task: {}\nnonsense: 1\n")
    return d


def cases(d):
    ck, data = str(d / "ckpt"), str(d / "pairs.jsonl")
    missing = str(d / "missing")
    train = ["train", "--sft-checkpoint", ck, "--wandb", "disabled", "--set", f"train.output_dir={d}/runs",
             "--set", "train.max_steps=1", "--set", "train.batch_size=4", "--set", "train.progress=false"]
    sft = ["sft", "--init", ck, "--wandb", "disabled", "--set", f"train.output_dir={d}/runs",
           "--set", "train.max_steps=1", "--set", "train.batch_size=4", "--set", "train.progress=false"]
    judge = ["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--max-new-tokens", "8"]
    pairs = ["pairs", "--out", f"{d}/o.jsonl", *judge]
    loop = ["loop", "--sft-checkpoint", ck, "--out", f"{d}/loop", "--prompts", data, "--eval-prompts", data,
            *judge, "--no-progress"]
    return {
        "pairs: missing checkpoint": [*pairs, "--ckpt", missing, "--prompts", data],
        "pairs: missing prompts": [*pairs, "--ckpt", ck, "--prompts", missing],
        "pairs: float n_layer": [*pairs, "--ckpt", str(d / "float_layers"), "--prompts", data],
        "pairs: bad prompts": [*pairs, "--ckpt", ck, "--prompts", str(d / "prompts_bad.jsonl")],
        "pairs: tpu device": [*pairs, "--ckpt", ck, "--prompts", data, "--device", "tpu:9"],
        "eval: missing checkpoint": ["eval", "--a", missing, "--b", ck, "--prompts", data, *judge],
        "eval: missing prompts": ["eval", "--a", ck, "--b", ck, "--prompts", missing, *judge],
        "eval: cuda without CUDA": ["eval", "--a", ck, "--b", ck, "--prompts", data, "--device", "cuda",
                                    *judge],
        "eval: huge model": ["eval", "--a", str(d / "huge"), "--b", ck, "--prompts", data, *judge],
        "train: missing config": ["train", "--config", missing + ".yaml"],
        "train: epochs inf": ["train", "--config", str(d / "inf.yaml"), "--sft-checkpoint", ck],
        "train: unknown key": ["train", "--config", str(d / "unknown.yaml"), "--sft-checkpoint", ck],
        "train: broken YAML": ["train", "--config", str(d / "broken.yaml")],
        "train: YAML list": ["train", "--config", str(d / "list.yaml")],
        "train: unparsable --set": [*train, "--set", "train.seed=[1,"],
        "train: --set bad beta": [*train, "--set", "beta=abc", "--set", f"data.path=[{data}]"],
        "train: --set unknown key": [*train, "--set", "nonsense=1"],
        "train: missing checkpoint": [*train[:2], missing, *train[3:], "--set", f"data.path=[{data}]"],
        "train: no data": [*train],
        "train: missing data": [*train, "--set", f"data.path=[{missing}.jsonl]"],
        "train: trailing array": [*train, "--set", f"data.path=[{d / 'trailing.json'}]"],
        "train: surrogate": [*train, "--set", f"data.path=[{d / 'surrogate.jsonl'}]"],
        "train: deep nesting": [*train, "--set", f"data.path=[{d / 'deep.jsonl'}]"],
        "train: latin-1 data": [*train, "--set", f"data.path=[{d / 'latin1.jsonl'}]"],
        "train: tpu device": [*train, "--set", f"data.path=[{data}]", "--set", "train.device=tpu:9"],
        "train: cuda without CUDA": [*train, "--set", f"data.path=[{data}]", "--set", "train.device=cuda"],
        "train: float n_layer": ["train", "--sft-checkpoint", str(d / "float_layers"), *train[3:],
                                 "--set", f"data.path=[{data}]"],
        "train: latin-1 config.json": ["train", "--sft-checkpoint", str(d / "latin1"), *train[3:],
                                       "--set", f"data.path=[{data}]"],
        "train: resume nothing": [*train, "--set", f"data.path=[{data}]", "--set", "train.run_name=none",
                                  "--resume"],
        "sft: broken YAML": ["sft", "--config", str(d / "broken.yaml")],
        "sft: missing init": [*sft[:2], missing, *sft[3:], "--set", f"data.path=[{data}]"],
        "sft: negative max_length": [*sft, "--set", "sft.max_length=-1"],
        "sft: corrupt weights": [*sft[:2], str(d / "no_weights"), *sft[3:], "--set",
                                 f"data.path=[{d / 'pairs.jsonl'}]"],
        "serve: missing checkpoint": ["serve", "--ckpt", missing],
        "serve: float n_layer": ["serve", "--ckpt", str(d / "float_layers")],
        "serve: tpu device": ["serve", "--ckpt", ck, "--device", "tpu:9"],
        "export: missing checkpoint": ["export", "--hf", f"{d}/hf1", missing],
        "export: latin-1 config.json": ["export", "--hf", f"{d}/hf2", str(d / "latin1")],
        "export: corrupt weights": ["export", "--hf", f"{d}/hf3", str(d / "no_weights")],
        "tokenizer: missing file": ["tokenizer", "--out", f"{d}/t.json", missing],
        "tokenizer: latin-1 text": ["tokenizer", "--out", f"{d}/t2.json", str(d / "text_latin1.txt")],
        "audit: missing file": ["audit", missing],
        "audit: trailing array": ["audit", str(d / "trailing.json")],
        "audit: bad config": ["audit", "--config", str(d / "inf.yaml"), data],
        "audit: missing checkpoint": ["audit", "--ckpt", missing, data],
        "label: missing candidates": ["label", "--out", f"{d}/l.jsonl", "--candidates", missing],
        "label: missing model": ["label", "--out", f"{d}/l2.jsonl", "--prompts", data, "--model-a", missing],
        "bench: missing mining checkpoint": ["bench", "--phases", "judge", "--quick", "--out", f"{d}/b",
                                             "--mining-ckpt", missing],
        "bench: unknown phase": ["bench", "--phases", "nonsense", "--out", f"{d}/b2"],
        "loop: missing checkpoint": [*loop[:2], missing, *loop[3:]],
        "loop: missing prompts": [*loop, "--prompts", missing],
        "loop: missing eval prompts": [*loop[:8], missing, *loop[9:]],
        "loop: bad prompts": [*loop, "--prompts", str(d / "prompts_bad.jsonl")],
        "loop: zero rounds": [*loop, "--rounds", "0"],
        "loop: bad config": [*loop, "--config", str(d / "inf.yaml")],
        "loop: tpu device": [*loop, "--device", "tpu:9"],
        "demo: missing config": ["demo", "--config", missing + ".yaml", "--out", f"{d}/demo"],
        "demo: bad config": ["demo", "--config", str(d / "demo_bad.yaml"), "--out", f"{d}/demo2"],
    }


CASES = sorted(cases(__import__("pathlib").Path("/x")))


def error_lines(err: str) -> list[str]:
    """What stderr shows besides progress bars (tqdm redraws its line with carriage returns)."""
    return [ln for ln in err.replace("\r", "\n").splitlines()
            if ln.strip() and not re.search(r"\[\d\d:\d\d.*/s\]", ln)]


@pytest.mark.parametrize("name", CASES)
def test_every_command_fails_bad_input_in_one_line(f, capsys, name):
    argv = cases(f)[name]
    assert cli_main(argv) == 2, capsys.readouterr().err
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"fastdpo {argv[0]}: error: "), err
    assert lines[0].endswith("(set FASTDPO_TRACEBACK=1 for the traceback)")
    if "--device" in argv and "tpu:9" in argv:   # named as the flag the user gave
        assert "'tpu:9' is not a device" in lines[0] and "--set" not in lines[0], lines[0]


@pytest.mark.parametrize("name", ["train: epochs inf", "audit: trailing array"])
def test_real_processes_print_one_line_and_a_traceback_only_when_asked(f, name):
    argv = [sys.executable, "-m", "fastdpo.cli", *cases(f)[name]]
    env = {k: v for k, v in os.environ.items() if k != "FASTDPO_TRACEBACK"}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    lines = error_lines(run.stderr)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(lines) == 1 and lines[0].startswith("fastdpo "), run.stderr
    if name.startswith("train"):
        run = subprocess.run(argv, capture_output=True, text=True, env={**env, "FASTDPO_TRACEBACK": "1"},
                             timeout=300)
        assert run.returncode != 0 and "Traceback" in run.stderr and "ConfigError" in run.stderr
