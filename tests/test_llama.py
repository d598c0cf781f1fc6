"""The Llama family on its own (transformers parity is in test_hf.py): the model contract, RoPE
positions, grouped-query KV caches, the packed DPO layout, the sampler and its oracle, configs."""
import json
import math

import pytest
import torch

from fastdpo.generation.sampler import sample, sample_reforward
from fastdpo.models.checkpoint import load_checkpoint, save_checkpoint
from fastdpo.models.families import PRESETS, build_model, config_from_preset, family_of
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.kv_cache import KVCache
from fastdpo.models.llama import Llama, LlamaConfig
from fastdpo.training.batches import TokenizedPair
from fastdpo.training.logprobs import pair_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")
V = 97


def small(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                intermediate_size=48), **kw})
    model = Llama(cfg).eval()
    with torch.no_grad():   # wider than the 0.02 init, so positions and heads visibly matter
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def test_contract_and_head_tying():
    untied, tied = small(), small(tie_word_embeddings=True)
    ids = torch.randint(0, V, (3, 11))
    for m in (untied, tied):
        assert m(ids).shape == (3, 11, V) and m.hidden_states(ids).shape == (3, 11, 32)
        torch.testing.assert_close(m.hidden_states(ids) @ m.lm_head_weight.T, m(ids), rtol=1e-5, atol=1e-5)
        assert len(m.blocks) == 2 and m.family == "llama" and family_of(m) == "llama"
    assert tied.lm_head_weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head_weight.data_ptr() == untied.lm_head.weight.data_ptr()
    assert not hasattr(tied, "lm_head")


def test_causal_and_relative_positions():
    """Later tokens never change earlier logits; shifting every position by the same offset leaves
    the logits unchanged (RoPE sees only differences), while shifting one row's differs."""
    m = small(qk_norm=True, model_type="qwen3")
    ids = torch.randint(0, V, (2, 16))
    base = m(ids)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 5) % V
    torch.testing.assert_close(m(changed)[:, :9], base[:, :9], rtol=0, atol=1e-5)
    shifted = m(ids, pos=torch.arange(16).expand(2, 16) + 20)
    torch.testing.assert_close(shifted, base, rtol=0, atol=1e-4)
    squeezed = torch.arange(16) * 2
    assert not torch.allclose(m(ids, pos=squeezed.expand(2, 16)), base, atol=1e-3)


def test_linear_rope_scaling_is_positions_divided_by_the_factor():
    plain = small()
    scaled = small(rope_scaling={"rope_type": "linear", "factor": 2.0})
    dynamic = small(rope_scaling={"type": "dynamic", "factor": 4.0})   # the legacy key spelling
    ids = torch.randint(0, V, (1, 12))
    pos = torch.arange(12)[None]
    torch.testing.assert_close(scaled(ids, pos=2 * pos), plain(ids, pos=pos), rtol=0, atol=1e-4)
    torch.testing.assert_close(dynamic(ids), plain(ids), rtol=0, atol=0)   # inside the context: plain RoPE
    assert scaled.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_cached_decode_equals_full_forward_and_caches_hold_kv_heads():
    m = small()
    ids = torch.randint(0, V, (3, 10))
    full = m(ids)
    caches = [KVCache(3, 16) for _ in range(2)]
    torch.testing.assert_close(m(ids[:, :6], kv_caches=caches), full[:, :6], rtol=0, atol=1e-5)
    assert caches[0].k.shape == (3, 2, 16, 8)   # n_kv_head heads, not n_head
    for t in range(6, 10):
        pos = torch.full((3, 1), t)
        mask = (torch.arange(t + 1) <= pos)[:, None, None, :]
        step = m(ids[:, t:t + 1], pos=pos, kv_caches=caches, attn_mask=mask)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, model_type="qwen2", tie_word_embeddings=True)])
def test_sampler_matches_its_oracle(kw):
    m = small(seed=3, **kw)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in range(1, 9)]
    temps = [0.0, 0.8, 1.2, 1.0] * 2
    a = sample(m, prompts, temps, 12, 20, eos_id=5, seed=7)
    assert a == sample_reforward(m, prompts, temps, 12, 20, eos_id=5, seed=7)
    assert sum(map(len, a)) > 30


def test_packed_shared_prompt_layout_equals_separate_rows():
    """The trainer's packed pairs give each token its own position (the rejected branch restarts
    where the prompt ends): RoPE must rotate by those, not by the column index."""
    g = torch.Generator().manual_seed(1)
    seq = lambda n: torch.randint(0, V, (n,), generator=g).tolist()   # noqa: E731
    pairs = [TokenizedPair(seq(5), seq(4), seq(6)), TokenizedPair(seq(1), seq(3), seq(2)),
             TokenizedPair(seq(9), seq(2), seq(5))]
    out = []
    for shared in (True, False):
        m = small(seed=2)
        c, r = pair_logprobs(m, pairs, pad_id=0, device="cpu", shared_prompt=shared)
        (c.sum() - 2 * r.sum()).backward()
        out.append((c.detach(), r.detach(), [p.grad for p in m.parameters()]))
    (c1, r1, g1), (c2, r2, g2) = out
    torch.testing.assert_close(c1, c2, rtol=0, atol=1e-4)
    torch.testing.assert_close(r1, r2, rtol=0, atol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_recomputes_blocks_with_equal_gradients():
    from fastdpo.models.recompute import set_gradient_checkpointing

    ids = torch.randint(0, V, (2, 12))
    grads, calls = [], []
    for on in (False, True):
        m = small(seed=5).train()
        set_gradient_checkpointing(m, on)
        seen = []
        for block in m.blocks:
            block.register_forward_pre_hook(lambda *a, seen=seen: seen.append(1))
        m(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in m.parameters()])
        calls.append(len(seen))
    assert calls == [2, 4]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradients_reach_every_parameter():
    m = small(qkv_bias=True, o_bias=True, mlp_bias=True).train()
    m(torch.randint(0, V, (2, 8))).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_presets_and_families():
    assert {"tiny", "gpt2-124m", "llama-tiny", "llama-124m"} <= set(PRESETS)
    big = config_from_preset("llama-124m")
    with torch.device("meta"):
        n = build_model(big).num_params()
    assert 120e6 < n < 130e6 and big.n_kv_head == 4
    assert isinstance(build_model(config_from_preset("tiny", vocab_size=300)), GPT)
    assert isinstance(build_model(config_from_preset("llama-tiny", vocab_size=300)), Llama)
    with pytest.raises(ValueError, match="unknown model preset"):
        config_from_preset("llama-7b")


@pytest.mark.parametrize("kw,match", [
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(head_dim=7), "even"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs numbers"),
    (dict(model_type="qwen2"), "qkv_bias true"),
    (dict(model_type="qwen3"), "qk_norm must be true"),
    (dict(qk_norm=True), "no q/k norm"),
    (dict(model_type="mistral", qkv_bias=True, o_bias=True), "no attention biases"),
    (dict(model_type="gemma"), "model_type must be one of"),
])
def test_bad_configs_say_what_is_wrong(kw, match):
    base = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                intermediate_size=48)
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**base, **kw})
    with pytest.raises(ValueError, match="unknown LlamaConfig fields"):
        LlamaConfig.from_dict({**base, "num_layers": 2})


def test_checkpoint_records_the_family_and_old_checkpoints_stay_gpt(tmp_path):
    m = small(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    ckpt = save_checkpoint(tmp_path / "llama", m)
    assert json.loads((ckpt / "config.json").read_text())["family"] == "llama"
    again, _ = load_checkpoint(ckpt)
    ids = torch.randint(0, V, (2, 20))
    assert isinstance(again, Llama) and torch.equal(again(ids), m(ids))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16))
    old = save_checkpoint(tmp_path / "gpt", gpt)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["family"]   # written before families existed
    (old / "config.json").write_text(json.dumps(cfg))
    assert isinstance(load_checkpoint(old)[0], GPT)


def test_step0_dpo_loss_is_ln2_on_a_fresh_llama():
    from fastdpo.training.config import DPOConfig, TrainingConfig
    from fastdpo.training.dpo import prepare_dpo

    g = torch.Generator().manual_seed(4)
    seq = lambda n: torch.randint(0, V, (n,), generator=g).tolist()   # noqa: E731
    pairs = [TokenizedPair(seq(6), seq(3), seq(4)) for _ in range(8)]
    tc = TrainingConfig(batch_size=4, micro_batch_size=4, learning_rate=1e-2, max_steps=3,
                        mixed_precision="fp32", wandb="disabled", progress=False, device="cpu", log_every=1)
    trainer = prepare_dpo(small(seed=4), pairs, [], tc, DPOConfig(beta=0.5, reference="model"), pad_id=0)
    losses = [h["loss/dpo"] for h in trainer.train().history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[-1] < losses[0]
