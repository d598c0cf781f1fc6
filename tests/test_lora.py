"""LoRA: adapters start as a no-op, only they train, merging is exact, the reference is the base
(and its cached log-probs are the base's), checkpoints hold the adapter in the PEFT format, SFT ->
DPO continues an adapter or merges it and starts a new one, and ``peft`` reads our files."""
import json
import math
from pathlib import Path

import pytest
import torch

from fastdpo.models import lora
from fastdpo.models.checkpoint import load_checkpoint, read_config, save_checkpoint
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.tokenizer import Tokenizer
from fastdpo.training.batches import tokenize_pairs
from fastdpo.training.config import (
    DPOConfig,
    PreferenceDatasetConfig,
    SFTConfig,
    SFTDatasetConfig,
    TrainingConfig,
)
from fastdpo.training.data import DataStats, load_examples
from fastdpo.training.dpo import prepare_dpo, run_dpo
from fastdpo.training.sft import run_sft

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = [f"transformer.h.{i}.{m}" for i in range(2)
       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["what is plus the answer yes no good bad 0123456789 + = ?"] * 30, vocab_size=320)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    save_checkpoint(d / "base", tiny(tok.vocab_size), tokenizer=tok)
    rows = [{"prompt": f"what is {a}+{b}?", "chosen": f"{a + b}", "rejected": f"{a + b} bad"}
            for a in range(10, 30) for b in range(3)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = [{"prompt": f"what is {a}+{b}?", "response": f"{a + b}"} for a in range(10, 30) for b in range(2)]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return d


def tiny(vocab=61, dropout=0.0):
    return GPT(GPTConfig(vocab_size=vocab, block_size=48, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def cfg(workdir, run, **kw):
    base = dict(run_name=run, output_dir=workdir / "runs", batch_size=8, micro_batch_size=4,
                learning_rate=1e-2, max_steps=4, log_every=1, mixed_precision="fp32", wandb="disabled",
                progress=False, seed=3, device="cpu", finetuning_type="lora", lora_rank=4, lora_alpha=8)
    return TrainingConfig(**{**base, **kw})


def metrics(run_dir: Path):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["split"] == "train"]


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


IDS = torch.randint(1, 61, (3, 11), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- the adapters


def test_adapters_start_as_a_noop_and_only_they_train():
    torch.manual_seed(0)
    model = tiny()
    base = model(IDS)
    names = lora.apply_lora(model, ["all"], rank=4, alpha=8)
    assert names == ALL
    assert torch.equal(model(IDS), base)              # B = 0: exactly the base
    assert lora.adapters_are_noop(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}.weight" for n in ALL for ab in "AB")
    # the base weights keep their names (and are the very same tensors)
    assert {f"{n}.weight" for n in ALL} <= set(model.state_dict())


def test_targets_by_name_and_suffix_and_errors():
    model = tiny()
    assert lora.match_targets(model, ["c_attn"]) == [n for n in ALL if n.endswith("c_attn")]
    assert lora.match_targets(model, ["mlp.c_proj", "c_fc"]) == [
        "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.1.mlp.c_fc"]
    with pytest.raises(ValueError, match=r"q_proj.*matches no linear module.*c_attn"):
        lora.match_targets(model, ["q_proj"])


def test_a_linear_output_head_is_never_adapted():
    class Untied(torch.nn.Module):   # the shape of a family with an untied nn.Linear head
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 9, bias=False)

        @property
        def lm_head_weight(self):
            return self.lm_head.weight

    assert lora.match_targets(Untied(), ["all"]) == ["proj"]
    with pytest.raises(ValueError, match="output head"):
        lora.match_targets(Untied(), ["lm_head"])


def test_merged_weights_give_the_logits_of_base_plus_adapter():
    torch.manual_seed(0)
    model = tiny()
    base = model(IDS).detach()
    lora.apply_lora(model, ["c_attn", "c_fc"], rank=4, alpha=16)
    randomize_adapters(model)
    adapted = model(IDS).detach()
    assert not torch.allclose(adapted, base, atol=1e-3)
    with lora.adapters_disabled(model):
        assert torch.equal(model(IDS), base)
    plain = tiny()
    plain.load_state_dict(lora.merged_state_dict(model))
    assert torch.allclose(plain(IDS), adapted, atol=1e-5)
    lora.merge_lora(model)
    assert not lora.has_lora(model) and set(model.state_dict()) == set(plain.state_dict())
    assert torch.allclose(model(IDS), adapted, atol=1e-5)


def test_gradient_checkpointing_with_adapters_gives_the_same_gradients():
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = tiny(dropout=0.1)
        lora.apply_lora(model, ["all"], rank=4, alpha=8, dropout=0.1)
        randomize_adapters(model)
        model.gradient_checkpointing = on
        torch.manual_seed(5)
        model(IDS).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-6, atol=1e-7), name


def test_adapter_files_round_trip_and_bad_files_name_the_field(tmp_path):
    torch.manual_seed(0)
    model = tiny()
    lora.apply_lora(model, ["attn.c_proj", "c_fc"], rank=3, alpha=6)
    randomize_adapters(model)
    lora.save_adapter(tmp_path, model, "some/base")
    config = json.loads((tmp_path / lora.ADAPTER_CONFIG).read_text())
    # not every c_proj is adapted (only attention's), so the targets are full module names
    assert config["target_modules"] == sorted([*[n for n in ALL if "attn.c_proj" in n],
                                               *[n for n in ALL if n.endswith("c_fc")]])
    assert config["r"] == 3 and config["lora_alpha"] == 6 and config["fan_in_fan_out"] is True
    fresh = tiny()
    torch.manual_seed(0)
    fresh.load_state_dict(tiny().state_dict())
    lora.load_adapter(tmp_path, fresh)
    assert torch.equal(fresh(IDS), model(IDS))
    config["use_dora"] = True
    (tmp_path / lora.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'use_dora'"):
        lora.load_adapter(tmp_path, tiny())


# --------------------------------------------------------------------------- training with LoRA


def test_lora_dpo_starts_at_ln2_trains_only_adapters_and_saves_the_adapter(workdir, tok):
    tc = cfg(workdir, "dpo-lora", max_steps=6)
    final = run_dpo(workdir / "base", tc, DPOConfig(beta=0.5, reference="model"),
                    PreferenceDatasetConfig(path=workdir / "pairs.jsonl"), tok)
    m = metrics(tc.run_dir)
    assert m[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert m[-1]["rewards/margins"] > 0.1
    files = sorted(p.name for p in final.iterdir())
    assert lora.ADAPTER_CONFIG in files and lora.ADAPTER_WEIGHTS in files and "model.safetensors" not in files
    config = read_config(final)
    assert config["base_checkpoint"] == str((workdir / "base").resolve())
    # the optimizer held the adapters only
    state = torch.load(final / "trainer_state.pt", weights_only=True)
    n_params = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert n_params == 2 * len(ALL)
    # loading the adapter-only checkpoint merges it onto its base; the base itself is untouched
    merged, _ = load_checkpoint(final)
    base, _ = load_checkpoint(workdir / "base")
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed == {f"{n}.weight" for n in ALL}


def test_only_adapter_parameters_change_in_memory(workdir, tok):
    pairs = tokenize_pairs(load_examples([workdir / "pairs.jsonl"]), tok, 32, 32, 48, DataStats())
    model = load_checkpoint(workdir / "base")[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = prepare_dpo(model, pairs, [], cfg(workdir, "inmem", log_every=0), DPOConfig(reference="model"),
                          pad_id=tok.pad_id)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if ".lora_" in n}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    trainer.train(steps=3)
    after = model.state_dict()
    assert set(after) == set(before) | set(adapters)
    assert all(torch.equal(after[k], before[k]) for k in before)            # the base: untouched
    assert all(not torch.equal(after[k], v) for k, v in adapters.items())   # every adapter tensor moved


def test_reference_cache_is_the_bases_and_shared_with_full_finetuning(workdir, tok, capsys):
    data = PreferenceDatasetConfig(path=workdir / "pairs.jsonl")
    cache = workdir / "shared-cache"
    dc = DPOConfig(reference="cached", reference_cache_dir=cache)
    run_dpo(workdir / "base", cfg(workdir, "full-cached", finetuning_type="full", max_steps=1, progress=True),
            dc, data, tok)
    assert "reference log-probs: computed" in capsys.readouterr().out
    tc = cfg(workdir, "lora-cached", max_steps=3, progress=True)
    run_dpo(workdir / "base", tc, dc, data, tok)
    assert "reference log-probs: cache hit" in capsys.readouterr().out   # the base's numbers, one file
    assert len(list(cache.iterdir())) == 1
    assert metrics(tc.run_dir)[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)


def test_resume_restores_the_adapter_and_is_bit_identical(workdir, tok):
    dc = DPOConfig(beta=0.3, reference="model")
    data = PreferenceDatasetConfig(path=workdir / "pairs.jsonl")
    straight = run_dpo(workdir / "base", cfg(workdir, "lora-straight", lora_dropout=0.1), dc, data, tok)

    def stop(trainer, step):
        if step == 2:
            raise KeyboardInterrupt

    tc = cfg(workdir, "lora-resumed", save_every=2, lora_dropout=0.1)
    with pytest.raises(KeyboardInterrupt):
        run_dpo(workdir / "base", tc, dc, data, tok, on_step=stop)
    resumed = run_dpo(workdir / "base", tc, dc, data, tok, resume=True)
    a = (straight / lora.ADAPTER_WEIGHTS).read_bytes()
    assert a == (resumed / lora.ADAPTER_WEIGHTS).read_bytes()


def test_sft_then_dpo_on_the_same_adapter_or_a_new_one(workdir, tok):
    sft = run_sft(workdir / "base", cfg(workdir, "sft-lora", learning_rate=3e-3), SFTConfig(max_length=32),
                  SFTDatasetConfig(path=workdir / "sft.jsonl"), tok)
    assert lora.is_adapter_dir(sft) and not (sft / "model.safetensors").exists()
    sft_model, _ = load_checkpoint(sft)   # base + SFT adapter, merged
    data = PreferenceDatasetConfig(path=workdir / "pairs.jsonl")
    # continue: same adapter, same base; the reference is the SFT model (ln 2 at step 1)
    tc = cfg(workdir, "dpo-continue", lora_rank=8)   # the adapter's own rank wins
    cont = run_dpo(sft, tc, DPOConfig(reference="cached"), data, tok)
    assert metrics(tc.run_dir)[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert read_config(cont)["base_checkpoint"] == str((workdir / "base").resolve())
    assert json.loads((cont / lora.ADAPTER_CONFIG).read_text())["r"] == 4
    # merge then a new adapter: its base is the SFT checkpoint, loaded as base + SFT adapter
    tc = cfg(workdir, "dpo-new", create_new_adapter=True, lora_save_merged=True)
    new = run_dpo(sft, tc, DPOConfig(reference="model"), data, tok)
    assert metrics(tc.run_dir)[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert read_config(new)["base_checkpoint"] == str(sft.resolve())
    assert (new / "model.safetensors").is_file() and lora.is_adapter_dir(new)
    # the merged file and the adapter-on-its-base chain are the same model
    merged = load_checkpoint(new)[0]
    chain = load_checkpoint(sft)[0]
    lora.load_adapter(new, chain)
    assert torch.allclose(merged(IDS % 300), chain(IDS % 300), atol=1e-5)
    assert not torch.allclose(merged(IDS % 300), sft_model(IDS % 300), atol=1e-4)


def test_lora_settings_are_validated():
    with pytest.raises(ValueError, match="finetuning_type must be one of"):
        TrainingConfig(finetuning_type="qlora")
    assert TrainingConfig(lora_target="q_proj, v_proj").lora_target == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="lora_rank"):
        TrainingConfig(lora_rank=0)
    with pytest.raises(ValueError, match="fsdp"):
        TrainingConfig(finetuning_type="lora", parallel="fsdp")


# --------------------------------------------------------------------------- peft reads our files


def hf_gpt2(model: GPT):
    """The transformers GPT2LMHeadModel computing what ``model`` computes (Conv1D: weights (in, out))."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)).eval()
    state = {}
    for k, v in model.state_dict().items():
        conv = any(k.endswith(f"{m}.weight") for m in ("c_attn", "c_proj", "c_fc"))
        state[k] = v.t().contiguous() if conv else v
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") or k.endswith("masked_bias") for k in missing)
    return hf


@pytest.mark.filterwarnings("ignore::FutureWarning")   # transformers' own deprecations inside peft
def test_peft_loads_our_adapter_onto_the_transformers_model(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = tiny().eval()
    hf = hf_gpt2(model)
    assert torch.allclose(hf(IDS).logits, model(IDS), atol=1e-5)
    lora.apply_lora(model, ["all"], rank=4, alpha=8)
    randomize_adapters(model, seed=2)
    lora.save_adapter(tmp_path, model, "tiny-gpt2")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        ours = model(IDS)
        assert torch.allclose(peft_model(IDS).logits, ours, atol=1e-5)
        assert not torch.allclose(hf_gpt2(tiny_copy(model))(IDS).logits, ours, atol=1e-3)
        merged = peft_model.merge_and_unload()     # fan_in_fan_out: PEFT merges into Conv1D's (in, out)
        assert torch.allclose(merged(IDS).logits, ours, atol=1e-5)


def tiny_copy(model):
    """The base of an adapted model, as a plain GPT."""
    plain = tiny()
    with lora.adapters_disabled(model):
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    return plain


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_export_writes_the_base_and_the_peft_adapter_or_merged_weights(workdir, tok, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from fastdpo.cli import main

    model, _ = load_checkpoint(workdir / "base", tokenizer=tok)
    lora.apply_lora(model, ["all"], rank=4, alpha=8)
    randomize_adapters(model, seed=5)
    save_checkpoint(tmp_path / "lora", model, tokenizer=tok, meta={"base_checkpoint": str(workdir / "base")})
    assert not (tmp_path / "lora" / "model.safetensors").exists()     # the adapter alone
    ids = torch.randint(1, tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.eval()(ids)

    assert main(["export", "--hf", str(tmp_path / "split"), str(tmp_path / "lora")]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "split").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "split" / "adapter").eval()
    config = json.loads((tmp_path / "split" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "split").resolve())
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, ours, atol=1e-5)
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(ids).logits, ours, atol=1e-3)   # the base really is the base

    assert main(["export", "--hf", str(tmp_path / "merged"), str(tmp_path / "lora"), "--merge"]) == 0
    assert not (tmp_path / "merged" / "adapter").exists()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ours, atol=1e-5)
