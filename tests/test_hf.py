"""Real models in and out, per family (GPT-2, Llama 3 with rope_scaling and attention biases, Qwen2
with tied embeddings, Qwen3 with q/k norms and its own head_dim, Mistral with a sliding window):
tiny random transformers models saved locally, imported, compared with transformers, sampled,
trained with DPO on TRL-format data, exported, and read back by transformers."""
import json
import math

import pytest
import torch
from hf_helpers import FAMILIES, build_hf_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastdpo.generation.sampler import sample
from fastdpo.models import lora
from fastdpo.models.checkpoint import CheckpointError, load_checkpoint, load_policy, save_checkpoint
from fastdpo.models.hf_export import export_hf
from fastdpo.models.hf_weights import from_hf_name, is_conv1d, to_hf_name
from fastdpo.models.tokenizer import open_tokenizer
from fastdpo.training.config import DPOConfig, PreferenceDatasetConfig, TrainingConfig
from fastdpo.training.dpo import run_dpo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: build_hf_model(root / f, f, seed=i) for i, f in enumerate(FAMILIES)}


def reference(directory, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_per_row_positions(hf_dirs, family):
    ours, info = load_checkpoint(hf_dirs[family])
    ref = reference(hf_dirs[family])
    assert info["hf_model_type"] == family and ours.family == ("gpt2" if family == "gpt2" else "llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 30), generator=g)
    pos = torch.stack([torch.arange(30), torch.arange(30) + 9])   # a row that starts mid-context
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4
        assert (ours(ids, pos=pos) - ref(ids, position_ids=pos).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_name_mapping_covers_every_parameter_and_module(hf_dirs, family):
    """What a LoRA adapter in PEFT's format needs: every fastdpo parameter and projection module has
    a transformers name, and the Conv1D ones (stored transposed) are the ones flagged."""
    ours, _ = load_checkpoint(hf_dirs[family])
    ref = reference(hf_dirs[family])
    theirs = ref.state_dict()
    tied = {"lm_head.weight"} if getattr(ours.config, "tie_word_embeddings", True) else set()   # GPT-2 ties
    assert {to_hf_name(ours.family, n) for n in ours.state_dict()} == set(theirs) - tied
    for name in ours.state_dict():
        assert from_hf_name(ours.family, to_hf_name(ours.family, name)) == name
    for name, module in ours.named_modules():
        if isinstance(module, torch.nn.Linear):
            target = ref.get_submodule(to_hf_name(ours.family, name))
            assert is_conv1d(ours.family, f"{name}.weight") == (type(target).__name__ == "Conv1D"), name


@pytest.mark.filterwarnings("ignore::FutureWarning")   # transformers' own deprecations inside peft
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_lora_adapter_onto_the_transformers_model(hf_dirs, family, tmp_path):
    peft = pytest.importorskip("peft")
    ours, _ = load_checkpoint(hf_dirs[family])
    lora.apply_lora(ours, ["all"], rank=4, alpha=8)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora.lora_modules(ours).values():   # a trained-looking adapter, not the zero start
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    lora.save_adapter(tmp_path, ours, str(hf_dirs[family]))
    theirs = peft.PeftModel.from_pretrained(reference(hf_dirs[family]), tmp_path).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        assert (theirs(ids).logits - ours.eval()(ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_error_is_transformers_own(hf_dirs, family):
    """bf16 (autocast over float32 weights) is as far from float32 as transformers' bf16 model is:
    within 2x of its max abs logit error (both ~0.05-0.7 on these wide random weights)."""
    ours, _ = load_checkpoint(hf_dirs[family])
    ids = torch.randint(0, ours.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = reference(hf_dirs[family])(ids).logits
        theirs = reference(hf_dirs[family], torch.bfloat16)(ids).logits.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mine = ours(ids).float()
    assert (mine - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_sampler_greedy_equals_transformers_generate(hf_dirs, family):
    ours, _ = load_checkpoint(hf_dirs[family])
    ref = reference(hf_dirs[family])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 14)]
    got = sample(ours.eval(), prompts, 0.0, 10, top_k=None, eos_id=None)   # one ragged batch
    for prompt, tokens in zip(prompts, got):
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        out = ref.generate(torch.tensor([prompt]), attention_mask=mask, do_sample=False, max_new_tokens=10,
                           eos_token_id=None, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()


def trl_rows():
    """TRL's conversational preference rows: explicit prompts (one with a system message) and
    implicit-prompt rows; the chosen answer is always 'good answer'."""
    rows = []
    for i in range(12):
        q = f"how are you today {i}?"
        if i % 3 == 2:
            conv = [{"role": "user", "content": q}]
            rows.append({"chosen": conv + [{"role": "assistant", "content": "good answer"}],
                         "rejected": conv + [{"role": "assistant", "content": "bad answer, maybe"}]})
            continue
        system = [{"role": "system", "content": "be brief"}] if i % 3 else []
        prompt = system + [{"role": "user", "content": q}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": "good answer"}],
                     "rejected": [{"role": "assistant", "content": "bad answer, maybe"}]})
    return rows


@pytest.fixture(scope="module")
def trained(hf_dirs, tmp_path_factory):
    """Each family: DPO from the Hugging Face directory on TRL data (explicit and implicit prompts
    in two files), then exported for transformers."""
    root = tmp_path_factory.mktemp("trained")
    rows = trl_rows()
    explicit, implicit = root / "explicit.jsonl", root / "implicit.jsonl"
    explicit.write_text("".join(json.dumps(r) + "\n" for r in rows if "prompt" in r))
    implicit.write_text("".join(json.dumps(r) + "\n" for r in rows if "prompt" not in r))
    out = {}
    for family in FAMILIES:
        tc = TrainingConfig(run_name=family, output_dir=root / "runs", batch_size=4, micro_batch_size=4,
                            learning_rate=3e-3, max_steps=4, log_every=1, mixed_precision="fp32",
                            wandb="disabled", progress=False, seed=0, device="cpu")
        final = run_dpo(hf_dirs[family], tc, DPOConfig(beta=0.5, reference="cached"),
                        PreferenceDatasetConfig(path=[explicit, implicit]))
        metrics = [json.loads(ln) for ln in (tc.run_dir / "metrics.jsonl").read_text().splitlines()]
        out[family] = (final, [m for m in metrics if m["split"] == "train"],
                       export_hf(final, root / f"export-{family}"))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_from_a_hf_directory_starts_at_ln2_and_learns(trained, family):
    final, metrics, _ = trained[family]
    assert metrics[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[-1]["loss/dpo"] < metrics[0]["loss/dpo"] - 0.01
    config = json.loads((final / "config.json").read_text())
    assert config["tokenizer_kind"] == "hf" and (final / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_equal_logits_and_template(trained, hf_dirs, family):
    final, _, exported = trained[family]
    ours, tok = load_policy(final)
    ref = reference(exported)
    assert type(ref).__name__ == type(reference(hf_dirs[family])).__name__
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4
    hf_tok = AutoTokenizer.from_pretrained(str(exported))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "good answer"}, {"role": "user", "content": "how are you?"}]
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert theirs == tok.render_conversation([(m["role"], m["content"]) for m in messages])
    generation = json.loads((exported / "generation_config.json").read_text())
    assert tok.eos_id in generation["eos_token_id"]
    # transformers 5's own class name, which transformers 4 cannot resolve, is not exported
    assert json.loads((exported / "tokenizer_config.json").read_text())["tokenizer_class"] != \
        "TokenizersBackend"
    assert open_tokenizer(exported).hash == tok.hash   # what decides the ids is unchanged


def test_sharded_safetensors_import(tmp_path, hf_dirs):
    sharded = build_hf_model(tmp_path / "sharded", "llama", seed=FAMILIES.index("llama"),
                             max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a, _ = load_checkpoint(sharded)
    b, _ = load_checkpoint(hf_dirs["llama"])
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_sharded_export_reads_back(tmp_path, hf_dirs):
    out = export_hf(hf_dirs["qwen3"], tmp_path / "out", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    a, _ = load_checkpoint(out)
    b, _ = load_checkpoint(hf_dirs["qwen3"])
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _copy(src, dst, edit_config=None, drop=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in drop:
            (dst / f.name).write_bytes(f.read_bytes())
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_checkpoints_name_file_and_field(tmp_path, hf_dirs):
    src = hf_dirs["llama"]
    phi = _copy(src, tmp_path / "phi", lambda c: c.update(model_type="phi3"))
    with pytest.raises(CheckpointError, match=r"config\.json: field 'model_type': 'phi3' is not supported"):
        load_checkpoint(phi)
    quant = _copy(src, tmp_path / "q", lambda c: c.update(quantization_config={"quant_method": "awq"}))
    with pytest.raises(CheckpointError, match=r"field 'quantization_config'.*awq"):
        load_checkpoint(quant)
    yarn = _copy(src, tmp_path / "yarn", lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0},
                                                            rope_parameters=None))
    with pytest.raises(CheckpointError, match="yarn"):
        load_checkpoint(yarn)
    bigger = _copy(src, tmp_path / "bigger", lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'model\.layers\.2\."):
        load_checkpoint(bigger)
    pickled = _copy(src, tmp_path / "bin", drop=("model.safetensors",))
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: fastdpo never unpickles"):
        load_checkpoint(pickled)
    no_template = _copy(src, tmp_path / "notemplate", drop=("chat_template.jinja",))
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: field 'chat_template': missing"):
        open_tokenizer(no_template)


def test_a_fastdpo_checkpoint_records_its_hf_tokenizer(tmp_path, hf_dirs):
    model, _ = load_checkpoint(hf_dirs["qwen2"])
    tok = open_tokenizer(hf_dirs["qwen2"])
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer=tok)
    again_model, again_tok = load_policy(ckpt)
    assert again_tok.kind == "hf" and again_tok.hash == tok.hash and again_tok.eos_id == tok.eos_id
    assert again_model.config == model.config
    assert again_tok.render_prompt("hi") == tok.render_prompt("hi")
