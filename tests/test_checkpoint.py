import json
from pathlib import Path

import pytest
import torch

from fastdpo.models.checkpoint import (
    CheckpointError,
    import_legacy_checkpoint,
    load_checkpoint,
    load_tokenizer,
    save_checkpoint,
)
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the quick brown fox jumps over the lazy dog 0123456789"] * 20, vocab_size=300)


def make_model(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16))


def test_round_trip_is_bit_exact(tmp_path, tok):
    m = make_model(tok)
    save_checkpoint(tmp_path / "ck", m, step=7, tokenizer=tok, meta={"note": "x"})
    loaded, cfg = load_checkpoint(tmp_path / "ck", tokenizer=tok)
    assert cfg["step"] == 7 and cfg["note"] == "x"
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_tokenizer(tmp_path / "ck").hash == tok.hash


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path, tok):
    save_checkpoint(tmp_path / "ck", make_model(tok, 0), step=1)

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ck", make_model(tok, 1), step=2, extra_files={"x": boom})
    _, cfg = load_checkpoint(tmp_path / "ck")
    assert cfg["step"] == 1  # the failed save left the old checkpoint whole
    save_checkpoint(tmp_path / "ck", make_model(tok, 1), step=3)
    assert load_checkpoint(tmp_path / "ck")[1]["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_truncated_weights_give_clear_error(tmp_path, tok):
    save_checkpoint(tmp_path / "ck", make_model(tok))
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or truncated"):
        load_checkpoint(tmp_path / "ck")


def test_corrupt_config_gives_clear_error(tmp_path, tok):
    save_checkpoint(tmp_path / "ck", make_model(tok))
    (tmp_path / "ck" / "config.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match="config.json:1: invalid JSON"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_vocab_mismatch_is_an_error(tmp_path, tok):
    save_checkpoint(tmp_path / "ck", make_model(tok), tokenizer=tok)
    other = Tokenizer.train(["completely different text corpus here"] * 20, vocab_size=280)
    with pytest.raises(CheckpointError, match="vocab size"):
        load_checkpoint(tmp_path / "ck", tokenizer=other)


def test_shape_mismatch_is_an_error(tmp_path, tok):
    save_checkpoint(tmp_path / "ck", make_model(tok))
    cfg_file = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model"]["n_embd"] = 32
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "ck")


def _die_between_the_two_renames(monkeypatch, name):
    """The process dies after the old checkpoint was moved aside, before the new one moved in."""
    rename = Path.rename

    def crashing(self, target):
        if self.name.startswith(f".{name}.tmp-"):
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crashing)


def test_save_that_died_between_renames_is_restored_on_load(tmp_path, tok, monkeypatch):
    save_checkpoint(tmp_path / "ck", make_model(tok, 0), step=1)
    with monkeypatch.context() as m:
        _die_between_the_two_renames(m, "ck")
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path / "ck", make_model(tok, 1), step=2)
    assert not (tmp_path / "ck").exists()   # only .ck.old-* is left
    assert load_checkpoint(tmp_path / "ck")[1]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_latest_checkpoint_restores_a_step_dir_left_mid_swap(tmp_path, tok, monkeypatch):
    from fastdpo.training.loop import STATE_FILE, latest_checkpoint

    extra = {STATE_FILE: lambda f: torch.save({"step": 2}, f)}
    save_checkpoint(tmp_path / "step-000002", make_model(tok, 0), step=2, extra_files=extra)
    with monkeypatch.context() as m:
        _die_between_the_two_renames(m, "step-000002")
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path / "step-000002", make_model(tok, 1), step=2, extra_files=extra)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"


def test_legacy_pt_import(tmp_path, tok):
    m = make_model(tok)
    state = {f"_orig_mod.{k}": v for k, v in m.state_dict().items()}
    state["_orig_mod.lm_head.weight"] = m.lm_head_weight.detach().clone()
    state["_orig_mod.transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    torch.save({"model": state, "config": m.config.to_dict()}, tmp_path / "sft.pt")
    imported = import_legacy_checkpoint(tmp_path / "sft.pt")
    ids = torch.randint(0, tok.vocab_size, (2, 8))
    assert torch.equal(imported.eval()(ids), m.eval()(ids))


def test_legacy_import_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "config": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        import_legacy_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("model, needle", [([1, 2], "field 'model' must be a state dict .* got list"),
                                           ({"w": 3}, "field 'model': entry 'w' is a int")])
def test_legacy_import_names_a_bad_model_field(tmp_path, tok, model, needle):
    torch.save({"model": model, "config": make_model(tok).config.to_dict()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=rf"bad\.pt: {needle}"):
        import_legacy_checkpoint(tmp_path / "bad.pt")
