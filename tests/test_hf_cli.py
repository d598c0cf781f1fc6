"""The README's "your own model" path through the CLI: a local Hugging Face directory -> SFT on
``messages`` rows -> DPO on TRL conversational pairs -> ``fastdpo export --hf`` -> transformers loads
the result; and ``fastdpo tokenizer`` -> a fresh Llama-shaped model -> export."""
import json

import pytest
import torch
from hf_helpers import build_hf_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastdpo.cli import main
from fastdpo.models.checkpoint import load_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def common(tmp_path, run):
    return ["--set", f"train.output_dir={tmp_path / 'runs'}", "--set", f"train.run_name={run}",
            "--set", "train.batch_size=4", "--set", "train.max_steps=2", "--set", "train.log_every=1",
            "--set", "train.mixed_precision=fp32", "--set", "train.device=cpu", "--wandb", "disabled"]


def test_your_own_model_from_hf_directory_to_transformers(tmp_path, capsys):
    model_dir = build_hf_model(tmp_path / "my-model", "qwen2")
    sft_rows = [{"messages": [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": f"hi {i}"},
                              {"role": "assistant", "content": "hello world"}]} for i in range(8)]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    assert main(["sft", "--init", str(model_dir), "--set", f"data.path=[{sft_data}]",
                 *common(tmp_path, "sft")]) == 0
    sft = tmp_path / "runs" / "sft" / "final"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": f"how are you {i}?"}],
         "chosen": [{"role": "assistant", "content": "good answer"}],
         "rejected": [{"role": "assistant", "content": "bad answer"}]} for i in range(8)])
    assert main(["train", "--sft-checkpoint", str(sft), "--set", f"data.path=[{pairs}]",
                 *common(tmp_path, "dpo")]) == 0
    assert "step=1 loss=0.6931" in capsys.readouterr().out
    dpo = tmp_path / "runs" / "dpo" / "final"
    out = tmp_path / "exported"
    assert main(["export", "--hf", str(out), str(dpo)]) == 0
    assert main(["export", "--hf", str(out), str(dpo)]) == 2   # never replaced silently
    assert "already exists" in capsys.readouterr().err

    ours, tok = load_policy(dpo)
    ref = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    chat = [{"role": "user", "content": "how are you?"}]
    assert hf_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == \
        tok.render_prompt("how are you?")


def test_fastdpo_tokenizer_command_then_a_fresh_llama_exports(tmp_path, capsys):
    rows = [{"prompt": f"what is {a}+1?", "response": f"{a + 1}"} for a in range(40)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    assert main(["tokenizer", data, "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert main(["sft", "--init", "llama-tiny", "--tokenizer", str(tmp_path / "tok" / "tokenizer.json"),
                 "--set", f"data.path=[{data}]", *common(tmp_path, "fresh")]) == 0
    out = tmp_path / "exported"
    final = tmp_path / "runs" / "fresh" / "final"
    assert main(["export", "--hf", str(out), str(final), "--dtype", "bfloat16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    ref = AutoModelForCausalLM.from_pretrained(str(out))
    assert ref.config.num_key_value_heads == 2 and next(ref.parameters()).dtype == torch.bfloat16
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.eos_token == "<|end|>"
    assert main(["tokenizer", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t2")]) == 2
    assert "missing.txt" in capsys.readouterr().err
