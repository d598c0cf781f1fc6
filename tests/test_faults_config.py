"""Absurd run configs and checkpoint config.json files: one ConfigError / CheckpointError naming the
file, line or --set, and the key, checked before anything is built; models and training runs that
cannot fit in memory are refused with the numbers."""
import json

import pytest
import torch

from fastdpo.cli import main as cli_main
from fastdpo.errors import ConfigError
from fastdpo.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.llama import LlamaConfig
from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.config import DPOConfig, TrainingConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("yaml_text,error", [
    ("train:\n  seed: 1\n  epochs: .inf\n", r"TrainingConfig\.epochs must be a finite number, got inf "
                                            r"\(.*c\.yaml:3 train\.epochs\)"),
    ("train:\n  adam_betas: abc\n", r"TrainingConfig\.adam_betas must be a list, got 'abc' \(.*c\.yaml:2 "),
    ("train:\n  adam_betas: [0.9, 1.5]\n", r"adam_betas\[1\] must be < 1, got 1\.5"),
    ("train:\n  weight_decay: -0.1\n", r"TrainingConfig\.weight_decay must be >= 0, got -0\.1"),
    ("train:\n  max_steps: 4.5\n", r"max_steps must be a whole number, got 4\.5"),
    ("train:\n  overwrite: 1\n", r"overwrite must be true or false, got 1"),
    ("train:\n  device: tpu:9\n", r"TrainingConfig\.device must be auto, cpu, cuda or cuda:N, got 'tpu:9'"),
    ("dpo:\n  beta: .nan\n", r"DPOConfig\.beta must be a finite number"),
    ("pref_beta: -1\n", r"DPOConfig\.beta must be > 0, got -1 \(.*c\.yaml:1 dpo\.beta\)"),   # a flat alias
    ("train: [1, 2]\n", r"section 'train' must be a mapping"),
    ("train:\n  seed: [\n", r"c\.yaml:\d+: invalid YAML"),
])
def test_bad_run_config_values_name_file_line_and_key(tmp_path, yaml_text, error):
    (tmp_path / "c.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError, match=error):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("override,error", [
    ("train.seed=[1,", r"--set train\.seed=\[1,: cannot parse the value as YAML"),
    ("train.epochs=.inf", r"TrainingConfig\.epochs must be a finite number, got inf \(--set train\.epochs\)"),
    ("train.adam_betas=abc", r"adam_betas must be a list, got 'abc' \(--set train\.adam_betas\)"),
    ("=3", r"--set expects key=value"),
])
def test_bad_overrides_are_named(override, error):
    with pytest.raises(ConfigError, match=error):
        load_config(None, [override])


def test_constructors_validate_too_and_a_non_utf8_config_names_its_file(tmp_path):
    with pytest.raises(ConfigError, match=r"TrainingConfig\.epochs must be a finite number"):
        TrainingConfig(epochs=float("inf"))
    with pytest.raises(ConfigError, match=r"DPOConfig\.rpo_alpha must be >= 0"):
        DPOConfig(rpo_alpha=-1)
    (tmp_path / "c.yaml").write_bytes(b"train:\n  run_name: \xff\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not UTF-8"):
        load_config(tmp_path / "c.yaml")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    tok = Tokenizer.train(["what is plus the answer yes no bad 0123456789 + = ?"] * 30, vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(d / "sft", GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                                             n_embd=16)), tokenizer=tok)
    return d


def with_model(ckpt, tmp_path, **model):
    import shutil
    out = tmp_path / "bad"
    shutil.copytree(ckpt / "sft", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"].update(model)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("model,error", [
    ({"n_layer": 4.0}, r"GPTConfig\.n_layer must be an integer, got 4\.0 \(.*config\.json model\.n_layer\)"),
    ({"n_layer": True}, r"GPTConfig\.n_layer must be a number, not a boolean, got True"),
    ({"dropout": "x"}, r"GPTConfig\.dropout must be a number"),
    ({"n_embd": -16}, r"GPTConfig\.n_embd must be > 0, got -16"),
    ({"block_size": 100_000_000}, r"block_size=100000000.*1\.6B parameters: 6\.4 GB of float32 weights, "
                                  r"more than the 4 GB of memory available on cpu"),
    ({"n_embd": 65536, "n_head": 16}, r"n_embd=65536.*more than the .* GB of memory available"),
])
def test_bad_model_configs_name_the_checkpoint_and_key(ckpt, tmp_path, monkeypatch, model, error):
    monkeypatch.setattr("fastdpo.models.memory.available_bytes", lambda device: 4 * 10**9)   # any machine
    bad = with_model(ckpt, tmp_path, **model)
    with pytest.raises((CheckpointError, ConfigError), match=error):
        load_checkpoint(bad)


def test_llama_config_values_are_checked_by_the_schema():
    with pytest.raises(ConfigError, match=r"LlamaConfig\.model_type must be one of \['llama'"):
        LlamaConfig(model_type="phi")
    with pytest.raises(ConfigError, match=r"LlamaConfig\.rope_theta must be a finite number"):
        LlamaConfig(rope_theta=float("inf"))


def test_a_non_utf8_config_json_names_the_checkpoint(ckpt, tmp_path):
    bad = with_model(ckpt, tmp_path)
    (bad / "config.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(CheckpointError, match=r"bad/config\.json: not UTF-8"):
        load_checkpoint(bad)


def run_train(ckpt, tmp_path, *sets):
    rows = [{"prompt": f"what is {a}?", "chosen": f"{a}", "rejected": f"{a} bad"} for a in range(8)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--sft-checkpoint", str(ckpt / "sft"), "--wandb", "disabled", "--report-to", "none",
            "--set", f"data.path=[{tmp_path / 'p.jsonl'}]", "--set", f"train.output_dir={tmp_path}",
            "--set", "train.max_steps=1", "--set", "train.batch_size=4", "--set", "health.enabled=false",
            "--set", "train.progress=false"]
    return cli_main(argv + [x for s in sets for x in ("--set", s)])


@pytest.mark.parametrize("sets,error", [
    (["train.device=cuda"], r"device 'cuda': CUDA is not available on this machine"),
    (["train.micro_batch_size=100000000", "train.batch_size=100000000"],
     r"training needs about .* GB \(weights .*, gradients .*, optimizer state .*, activations .*; "
     r"model .*micro_batch_size=100000000 x \d+ tokens\), more than the .* available on cpu"),
])
def test_devices_and_memory_the_machine_lacks_are_one_line(ckpt, tmp_path, capsys, sets, error):
    assert run_train(ckpt, tmp_path, *sets) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "corrupt" not in err
    assert err.startswith("fastdpo train: error: ")
    import re
    assert re.search(error, err), err
