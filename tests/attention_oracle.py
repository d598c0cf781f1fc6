"""Attention checked against float32 SDPA: values and gradients of a fast path on its inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def assert_matches_float32_sdpa(out, q, k, v, attn_mask=None, is_causal=False, seed=2):
    """``out`` (computed from ``q``, ``k``, ``v`` in their dtype) equals float32 SDPA on the same
    values, and so do the gradients of a random weighting of it: tight in float32, loose in half
    precision (the fast path rounds in the inputs' dtype)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])
    want_grads = torch.autograd.grad((want * w).sum(), (q32, k32, v32))
    tol = dict(rtol=1e-5, atol=1e-5) if q.dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.float(), want, **tol)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.float(), b, **tol)
