import pytest
import torch

from fastdpo.models.gpt import GPT, GPTConfig, config_from_preset


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32), **kw})
    return GPT(cfg).eval()


def test_contract_shapes():
    m = small_model()
    ids = torch.randint(0, 97, (3, 11))
    assert m(ids).shape == (3, 11, 97)
    assert m.hidden_states(ids).shape == (3, 11, 32)
    assert m.lm_head_weight.shape == (97, 32)


def test_lm_head_is_tied_and_hidden_states_give_logits():
    m = small_model()
    assert m.lm_head_weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(m.hidden_states(ids) @ m.lm_head_weight.T, m(ids), rtol=1e-5, atol=1e-5)


def test_causal_later_tokens_never_change_earlier_logits():
    m = small_model()
    ids = torch.randint(0, 97, (2, 16))
    base = m(ids)
    for t in (1, 7, 15):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 5) % 97
        out = m(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


def test_explicit_positions_match_default():
    m = small_model()
    ids = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(m(ids, pos=torch.arange(6).expand(2, 6)), m(ids))


def test_presets():
    tiny = GPT(config_from_preset("tiny", vocab_size=2048))
    assert 1e6 <= tiny.num_params() <= 3e6
    cfg = config_from_preset("gpt2-124m", vocab_size=50257)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    with pytest.raises(ValueError, match="unknown model preset"):
        config_from_preset("huge")


def test_too_long_input_is_an_error():
    m = small_model()
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({"n_layers": 3})


def test_gradients_flow_to_all_parameters():
    m = small_model().train()
    m(torch.randint(0, 97, (2, 8))).float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
