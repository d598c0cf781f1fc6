"""Short rows on CPU in half precision attend by the plain formula (``kv_cache.short_attention``).

It replaces SDPA only where it measured faster, so it must give SDPA's answer: values and
gradients against float32 SDPA (causal, a boolean mask, grouped-query heads), the routing in
``attend``, and dropout that drops.
"""
import pytest
import torch
import torch.nn.functional as F
from attention_oracle import assert_matches_float32_sdpa

from fastdpo.models import kv_cache
from fastdpo.models.kv_cache import SHORT_ATTENTION_MAX, attend, short_attention, short_attention_pays


def inputs(dtype, heads=(4, 4), T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, Hkv = heads
    return [torch.randn(3, h, T, 8, generator=g).to(dtype).requires_grad_() for h in (H, Hkv, Hkv)]


def random_mask(T, seed=1):
    """Causal with holes, every query keeping itself (a row must see at least one key)."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(3, 1, T, T, generator=g) < 0.6) & torch.ones(T, T, dtype=torch.bool).tril()
    return m | torch.eye(T, dtype=torch.bool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask"])
def test_short_attention_equals_sdpa(dtype, heads, masked):
    q, k, v = inputs(dtype, heads)
    mask = random_mask(q.shape[2]) if masked else None
    out = short_attention(q, k, v, mask)
    assert_matches_float32_sdpa(out, q, k, v, mask, is_causal=mask is None)

def test_scores_are_not_rounded_to_half_precision():
    """Logits of a few units (q and k scaled up, 64 dims): a bf16 product would round the scores
    before the softmax (there 1.9x bf16 SDPA's error); the error must stay at bf16 SDPA's."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 4, 100, 64, generator=g) * s for s in (2.0, 2.0, 1.0))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    half = [t.bfloat16() for t in (q, k, v)]
    sdpa_err = (F.scaled_dot_product_attention(*half, is_causal=True).float() - want).abs().max()
    err = (short_attention(*half, None).float() - want).abs().max()
    assert err <= 1.25 * sdpa_err + 1e-3, (float(err), float(sdpa_err))


def test_attend_takes_it_for_short_half_precision_rows_only(monkeypatch):
    calls = []
    real = kv_cache.short_attention
    monkeypatch.setattr(kv_cache, "short_attention",
                        lambda *a, **k: calls.append((a[0].shape, torch.is_grad_enabled())) or real(*a, **k))
    for dtype, T in ((torch.bfloat16, 12), (torch.bfloat16, SHORT_ATTENTION_MAX + 1), (torch.float32, 12)):
        q, k, v = inputs(dtype, T=T)                  # a training forward: gradients on
        attend(q, k, v, torch.arange(T))
        with torch.no_grad():   # the cached reference's forward takes the same path as the policy's
            attend(q, k, v, torch.arange(T))
    assert calls == [((3, 4, 12, 8), True), ((3, 4, 12, 8), False)]
    assert not short_attention_pays(torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16, device="meta"))


def test_dropout_drops():
    q, k, v = (t.detach() for t in inputs(torch.float32))
    torch.manual_seed(0)
    a = short_attention(q, k, v, None, dropout_p=0.5)
    assert not torch.allclose(a, short_attention(q, k, v, None))
