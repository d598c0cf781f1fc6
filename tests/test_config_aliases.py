"""LLaMA-Factory's names and flat layout in fastdpo's YAML, warmup_ratio, and the LLaMA-Factory DPO
config of the seed guide running with only its model paths changed."""
import json
import math

import pytest
import torch

from fastdpo.cli import main as cli_main
from fastdpo.models import lora
from fastdpo.models.checkpoint import save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.config import TrainingConfig, load_config
from fastdpo.training.loop import lr_at

pytestmark = pytest.mark.usefixtures("one_thread")

# The seed guide's LLaMA-Factory DPO config as written there, but for the two model paths.
SEED_YAML = """\
# DPO Configuration
model_name_or_path: {model}
ref_model: {model}  # Reference model
stage: dpo
do_train: true
dataset: comparison_gpt4_en
template: qwen

# DPO-specific parameters
pref_beta: 0.1  # KL penalty coefficient
pref_loss: sigmoid  # or hinge, ipo

# Training hyperparameters
cutoff_len: 2048
per_device_train_batch_size: 1
gradient_accumulation_steps: 32
learning_rate: 5.0e-7  # Much lower than SFT!
num_train_epochs: 1.0  # Usually just 1 epoch
lr_scheduler_type: cosine
warmup_ratio: 0.1

# Optimization
fp16: true
gradient_checkpointing: true

# LoRA configuration
finetuning_type: lora
lora_target: all
lora_rank: 16
lora_alpha: 32

# Evaluation
val_size: 0.1
eval_strategy: steps
eval_steps: 100

# Output
output_dir: checkpoints/dpo/aligned-model
logging_steps: 5
save_steps: 500
"""


def write(tmp_path, text, name="c.yaml"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_llamafactory_names_inside_sections_and_flat(tmp_path):
    cfg = load_config(write(tmp_path, "dpo: {pref_beta: 0.3, pref_loss: ipo, cutoff_len: 64}\n"
                                      "train: {lora_rank: 4, finetuning_type: lora}\n"))
    assert (cfg["dpo"].beta, cfg["dpo"].loss_type, cfg["dpo"].max_length) == (0.3, "ipo", 64)
    assert cfg["train"].finetuning_type == "lora" and cfg["train"].lora_rank == 4
    flat = load_config(write(tmp_path, "pref_beta: 0.2\nlearning_rate: 1.0e-5\nmodel_name_or_path: ck\n"
                                       "per_device_train_batch_size: 2\ngradient_accumulation_steps: 3\n"),
                       ["pref_beta=0.4", "learning_rate=2e-5"])     # overrides win over the file
    assert flat["dpo"].beta == 0.4 and flat["train"].learning_rate == 2e-5 and flat["sft_checkpoint"] == "ck"
    assert flat["train"].batch_size == 6
    sft = load_config(write(tmp_path, "cutoff_len: 99\nstage: sft\nmodel_name_or_path: base\n"), kind="sft")
    assert sft["sft"].max_length == 99 and sft["init_checkpoint"] == "base"


@pytest.mark.parametrize("text,error", [
    ("dpo: {beta: 0.1, pref_beta: 0.2}\n", "sets dpo.beta, which is set already"),
    ("pref_beta: 0.1\ndpo: {beta: 0.2}\n", "sets dpo.beta, which is set already"),
    ("stage: sft\n", "this command trains stage 'dpo'"),
    ("lr_scheduler_type: linear\n", "lr_scheduler_type: 'linear'"),
    ("eval_strategy: epoch\n", "eval_strategy: 'epoch'"),
    ("dataset: nowhere\n", "dataset: 'nowhere' is neither a file_name entry"),
    ("learnin_rate: 0.1\n", "unknown key 'learnin_rate'"),
])
def test_llamafactory_keys_that_cannot_be_honoured_are_errors(tmp_path, text, error):
    with pytest.raises(ValueError, match=error):
        load_config(write(tmp_path, text))


def test_warmup_ratio_is_a_fraction_of_the_run():
    cfg = TrainingConfig(learning_rate=1.0, warmup_ratio=0.1)
    assert [lr_at(s, cfg, 25) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])   # ceil(2.5) = 3
    assert lr_at(25, cfg, 25) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="not both"):
        TrainingConfig(warmup_ratio=0.1, warmup_steps=3)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainingConfig(warmup_ratio=1.5)


def test_the_seed_guides_llamafactory_config_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = Tokenizer.train(["what is plus the answer yes no good bad 0123456789 + = ?"] * 30, vocab_size=320)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft-model", GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2,
                                                          n_head=2, n_embd=32)), tokenizer=tok)
    # LLaMA-Factory's dataset registry, holding the seed guide's preference format
    (tmp_path / "data").mkdir()
    rows = [{"conversations": [{"from": "user", "value": f"what is {a}+{b}?"}], "chosen": f"{a + b}",
             "rejected": f"{a + b} bad"} for a in range(10, 30) for b in range(2)]
    (tmp_path / "data" / "comparison.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(
        {"comparison_gpt4_en": {"file_name": "comparison.jsonl", "ranking": True, "formatting": "sharegpt"}}))
    config = write(tmp_path, SEED_YAML.format(model="sft-model"), "dpo_config.yaml")
    assert cli_main(["train", "--config", str(config), "--wandb", "disabled"]) == 0
    run = tmp_path / "checkpoints" / "dpo" / "aligned-model"
    final = run / "final"
    assert lora.is_adapter_dir(final)
    adapter = json.loads((final / lora.ADAPTER_CONFIG).read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (16, 32)
    assert adapter["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    saved = json.loads((final / "config.json").read_text())["config"]
    assert saved["train"]["gradient_checkpointing"] and saved["train"]["warmup_ratio"] == 0.1
    assert saved["train"]["batch_size"] == 32 and saved["dpo"]["beta"] == 0.1
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in rows if r["split"] == "train")   # health checks log a heldout row first
    assert step1["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
