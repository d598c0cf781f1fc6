import dataclasses
import json

import pytest
import torch

from fastdpo.cli import main as cli_main
from fastdpo.models.checkpoint import load_checkpoint, load_tokenizer, save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.batches import tokenize_sft
from fastdpo.training.config import SFTConfig, SFTDatasetConfig, TrainingConfig
from fastdpo.training.data import DataError, DataStats, load_examples
from fastdpo.training.sft import SFTTask, init_model, run_sft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["what is plus the answer 0123456789 + = ?"] * 30, vocab_size=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": f"what is {a}+{b}?", "response": f"{a + b}"} for a in range(10, 40) for b in range(2)]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok.save(d / "tokenizer.json")
    return d


def tiny(tok):
    return GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)


def train_cfg(d, run, **kw):
    base = dict(run_name=run, output_dir=d / "runs", batch_size=16, micro_batch_size=8, learning_rate=3e-3,
                max_steps=30, log_every=5, mixed_precision="fp32", wandb="disabled", progress=False,
                device="cpu")
    return TrainingConfig(**{**base, **kw})


def test_sft_learns_answers_from_a_fresh_model(data, tok):
    tc = train_cfg(data, "fresh")
    final = run_sft(tiny(tok), tc, SFTConfig(max_length=32), SFTDatasetConfig(path=data / "sft.jsonl"), tok)
    m = [json.loads(ln) for ln in (tc.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["loss"] < 0.7 * m[0]["loss"]
    model, cfg = load_checkpoint(final, tokenizer=tok)
    assert cfg["kind"] == "sft" and cfg["step"] == 30


def test_sft_loss_is_masked_token_mean_nll_and_kernels_agree(data, tok):
    items = tokenize_sft(load_examples([data / "sft.jsonl"], kind="sft"), tok, 32, 32, 32, DataStats())[:6]
    torch.manual_seed(0)
    model = GPT(tiny(tok))
    out = {}
    for kernel in ("auto", "oracle"):
        task = SFTTask(model, items, [], pad_id=tok.pad_id, device=torch.device("cpu"), kernel=kernel)
        idx = list(range(6))
        loss, _ = task.loss(idx, task.step_norm([idx]))
        model.zero_grad()
        loss.backward()
        out[kernel] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    # the textbook: cross-entropy on answer tokens only, averaged over them
    ids = [x.prompt + x.response for x in items]
    total, n = 0.0, 0
    for x, seq in zip(items, ids):
        t = torch.tensor([seq])
        logits = model(t)[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="none")
        total += nll[len(x.prompt) - 1:].sum().item()
        n += len(x.response)
    assert out["auto"][0].item() == pytest.approx(total / n, rel=1e-5)
    assert torch.allclose(out["auto"][0], out["oracle"][0], rtol=1e-5)
    for a, b in zip(out["auto"][1], out["oracle"][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sft_conversations_format(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "what is 1+1?"},
                                                  {"from": "gpt", "value": "2"}]}) + "\n"
                    + json.dumps({"conversations": [{"from": "user", "value": "what is 1+1?"}]}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: conversations must end with the assistant's answer"):
        load_examples([path], kind="sft")
    ex = load_examples([path], kind="sft", on_error="skip")
    assert ex[0].turns == [("user", "what is 1+1?")] and ex[0].response == "2"


def test_cli_sft_then_train(data, tok, tmp_path, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: null\ntokenizer: {data / 'tokenizer.json'}\n"
                   f"train:\n  output_dir: {tmp_path / 'runs'}\n  run_name: s\n  max_steps: 4\n"
                   f"  batch_size: 8\n"
                   f"  mixed_precision: fp32\n  wandb: disabled\n  progress: false\n"
                   f"data:\n  path: [{data / 'sft.jsonl'}]\n")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init", GPT(tiny(tok)), tokenizer=tok)
    assert cli_main(["sft", "--config", str(cfg), "--init", str(tmp_path / "init")]) == 0
    sft = tmp_path / "runs" / "s" / "final"
    assert load_checkpoint(sft)[1]["step"] == 4
    fresh = init_model("tiny", tok, torch.device("cpu"))   # a preset name makes a fresh model
    assert fresh.config.n_layer == 4 and fresh.config.vocab_size == tok.vocab_size
    pairs = tmp_path / "p.jsonl"
    rows = [{"prompt": f"what is {a}+1?", "chosen": f"{a + 1}", "rejected": f"{a}"} for a in range(10, 30)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--sft-checkpoint", str(sft), "--set", f"data.path=[{pairs}]",
            "--set", "train.max_steps=2", "--set", "train.batch_size=4",
            "--set", f"train.output_dir={tmp_path / 'runs'}", "--set", "train.log_every=1",
            "--set", "mixed_precision=fp32", "--wandb", "disabled"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "step=1 loss=0.6931 accuracy=" in out and "saved" in out
    assert cli_main(["train", "--sft-checkpoint", str(sft), "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_fresh_model_without_tokenizer_trains_one_and_progress_false_hides_bars_only(data, tmp_path, capsys):
    """``progress: false`` still prints the data summary, "resumed from", "saved" and "curves"; a fresh
    model given no tokenizer gets one trained on the SFT data (kept by resume)."""
    tc = train_cfg(data, "fresh-tok", output_dir=tmp_path / "runs", max_steps=4, save_every=2)
    assert tc.progress is False
    cfg = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)
    final = run_sft(cfg, tc, SFTConfig(max_length=32), SFTDatasetConfig(path=data / "sft.jsonl"))
    out = capsys.readouterr()
    assert "tokenizer: none given for a fresh model; trained a" in out.out
    assert "data: " in out.out and f"saved {final}" in out.out and "curves: " in out.out
    assert "it/s" not in out.err + out.out   # no tqdm bar
    assert (tc.run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    tok = Tokenizer.load(tc.run_dir / "tokenizer.json")
    assert load_tokenizer(final).hash == tok.hash and load_checkpoint(final, tokenizer=tok)[1]["step"] == 4
    (tc.run_dir / "tokenizer.json").unlink()   # resuming reads the checkpoint's, it trains none
    run_sft(cfg, dataclasses.replace(tc, max_steps=6), SFTConfig(max_length=32),
            SFTDatasetConfig(path=data / "sft.jsonl"), resume=True)
    out = capsys.readouterr().out
    assert "resumed from" in out and "trained a" not in out
    assert load_tokenizer(tc.run_dir / "final").hash == tok.hash
