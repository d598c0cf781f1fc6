"""Fused log-prob kernels vs the naive oracle in kernels/reference.py, forward and gradients.

The Triton cases run the real kernels under the Triton interpreter on CPU tensors. Triton decides
interpreted vs compiled when it is first imported, so tests/conftest.py sets TRITON_INTERPRET=1
before anything imports it; setting it inside a test would change nothing.
"""
import pytest
import torch

from fastdpo import kernels
from fastdpo.kernels import linear_logprob, logprob, reference

# float32: both sides do the same float32 math in a different order. bf16 logits: the value is
# still float32 math on identical inputs, but gradients are rounded to bf16 (8 bits of mantissa),
# so they may differ by one bf16 ulp of the largest entry.
TOL = {torch.float32: dict(val=(1e-5, 1e-5), grad=(1e-5, 1e-5)),
       torch.bfloat16: dict(val=(1e-4, 1e-5), grad=(8e-3, 1.6e-2))}


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        if not kernels.HAS_TRITON:
            pytest.skip("triton not installed")
        # a small block makes odd vocabularies span several blocks plus a ragged tail
        monkeypatch.setattr(logprob, "MAX_BLOCK_V", 64)
    else:
        # a few rows per chunk, so spans, trimming and zero-filled gaps are all exercised
        monkeypatch.setattr(logprob, "TORCH_CHUNK_BYTES", 4 * 300 * 3)
    return request.param


def make_case(B, T, V, *, seed=0, scale=3.0, kind="holes"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * scale
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, -1] = V - 1
    if T > 2:
        ids[-1, 1] = 0
    if kind == "holes":  # prompt, response with holes, padding, one fully masked row
        mask = torch.rand(B, T, generator=g) > 0.35
        mask[:, : T // 3] = False
        if B > 1:
            mask[1] = False
    elif kind == "float":  # soft weights, as a per-token loss weighting would pass
        mask = torch.rand(B, T, generator=g)
    else:
        mask = torch.ones(B, T, dtype=torch.bool)
    return logits, ids, mask


def assert_close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol[1], atol=tol[0])


def check_seq(logits, ids, mask, backend, dtype, inplace=False):
    x_ref = logits.to(dtype).requires_grad_()
    x_new = logits.to(dtype).requires_grad_()
    gout = torch.linspace(-1.5, 2.0, logits.shape[0])
    want = reference.sequence_logprobs(x_ref, ids, mask)
    (want_grad,) = torch.autograd.grad(want, x_ref, gout)
    if inplace:  # the in-place gradient lands in the buffer the Function saw: pass a non-leaf
        buf = x_new * 1
        got = kernels.sequence_logprobs(buf, ids, mask, backend=backend, inplace_backward=True)
    else:
        got = kernels.sequence_logprobs(x_new, ids, mask, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (logits.shape[0],)
    (got_grad,) = torch.autograd.grad(got, x_new, gout)
    assert got_grad.dtype == dtype
    assert_close(got, want, TOL[dtype]["val"])
    assert_close(got_grad, want_grad, TOL[dtype]["grad"])
    return got, got_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 9, 257), (2, 5, 300), (2, 2, 17), (3, 1, 33)])
def test_sequence_logprobs_matches_oracle(backend, dtype, shape):
    check_seq(*make_case(*shape), backend, dtype)


@pytest.mark.parametrize("kind", ["float", "full"])
def test_sequence_logprobs_mask_kinds(backend, kind):
    check_seq(*make_case(2, 7, 129, kind=kind, seed=3), backend, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(backend, dtype):
    logits, ids, mask = make_case(2, 6, 131, seed=5, kind="full")
    logits = torch.where(torch.rand(logits.shape, generator=torch.Generator().manual_seed(1)) > 0.5,
                         1e4, -1e4)
    logits[0, 0, ids[0, 1]] = -1e4  # a label far below the row's maximum: log-prob ~ -2e4
    logits[1, 2, :] = 1e4  # a flat row: log-prob = -log(V)
    got, _ = check_seq(logits, ids, mask, backend, dtype)
    assert torch.isfinite(got).all()


def test_all_masked_gives_zero_and_zero_grad(backend):
    logits, ids, _ = make_case(2, 5, 70)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    got, grad = check_seq(logits, ids, mask, backend, torch.float32)
    assert torch.equal(got, torch.zeros(2)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_grad_into_logits(backend, dtype):
    logits, ids, mask = make_case(3, 6, 150, seed=7)
    check_seq(logits, ids, mask, backend, dtype, inplace=True)
    x = logits.to(dtype).requires_grad_()
    buf = x * 1
    out = kernels.sequence_logprobs(buf, ids, mask, backend=backend, inplace_backward=True)
    seen = {}
    buf.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    out.sum().backward()
    assert seen["ptr"] == buf.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_oracle(backend, dtype):
    logits, labels, mask = make_case(3, 5, 211, seed=11)
    x_ref, x_new = logits.to(dtype).requires_grad_(), logits.to(dtype).requires_grad_()
    gout = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    want = reference.token_logprobs(x_ref, labels, mask)
    got = kernels.token_logprobs(x_new, labels, mask, backend=backend)
    assert got.shape == labels.shape and got.dtype == torch.float32
    assert_close(got, want, TOL[dtype]["val"])
    assert_close(torch.autograd.grad(got, x_new, gout)[0], torch.autograd.grad(want, x_ref, gout)[0],
                 TOL[dtype]["grad"])
    # 2-D logits (N, V): the SFT path on already flattened tokens
    flat = kernels.token_logprobs(logits.reshape(15, 211), labels.reshape(15), mask.reshape(15),
                                  backend=backend)
    assert_close(flat, reference.token_logprobs(logits, labels, mask).reshape(15), TOL[torch.float32]["val"])


def test_noncontiguous_logits(backend):
    logits, ids, mask = make_case(2, 6, 90, seed=13)
    wide = torch.randn(2, 8, 90)
    wide[:, 1:7] = logits
    view = wide[:, 1:7]  # strided in T: the kernels index it, no copy needed
    assert not view.is_contiguous()
    assert_close(kernels.sequence_logprobs(view, ids, mask, backend=backend),
                 reference.sequence_logprobs(logits, ids, mask), TOL[torch.float32]["val"])


def test_reference_backend_is_the_oracle():
    logits, ids, mask = make_case(2, 4, 50)
    assert torch.equal(kernels.sequence_logprobs(logits, ids, mask, backend="reference"),
                       reference.sequence_logprobs(logits, ids, mask))


# --------------------------------------------------------------------------- linear path


@pytest.fixture
def small_linear_chunks(monkeypatch):
    # a handful of rows per forward chunk and several vocabulary tiles per backward super-chunk
    monkeypatch.setattr(linear_logprob, "FWD_TILE_BYTES", 4 * 64 * 3)
    monkeypatch.setattr(linear_logprob, "BWD_TILE_BYTES", 4 * 64 * 8)
    monkeypatch.setattr(linear_logprob, "MAX_ROWS", 5)


def linear_case(B, T, C, V, seed=0, dtype=torch.float32):
    logits, ids, mask = make_case(B, T, V, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(B, T, C, generator=g).to(dtype)
    weight = (torch.randn(V, C, generator=g) / C**0.5).to(dtype)
    return hidden, weight, ids, mask


def check_linear(hidden, weight, ids, mask, tol, autocast=False):
    gout = torch.linspace(-1.0, 1.5, hidden.shape[0])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with ctx:
        want = reference.linear_sequence_logprobs(h1, w1, ids, mask)
        got = kernels.linear_sequence_logprobs(h2, w2, ids, mask)
    want_g = torch.autograd.grad(want, (h1, w1), gout)
    got_g = torch.autograd.grad(got, (h2, w2), gout)
    assert got.dtype == torch.float32
    assert got_g[0].dtype == hidden.dtype and got_g[1].dtype == weight.dtype
    assert_close(got, want, tol["val"])
    for a, b in zip(got_g, want_g):
        assert_close(a, b, tol["grad"])


@pytest.mark.parametrize("shape", [(3, 9, 16, 301), (2, 2, 8, 67), (2, 1, 8, 33)])
def test_linear_matches_oracle_float32(small_linear_chunks, shape):
    check_linear(*linear_case(*shape), dict(val=(2e-5, 1e-5), grad=(2e-5, 1e-4)))


def test_linear_under_autocast_bf16(small_linear_chunks):
    # the trainer's call: float32 hidden (LayerNorm output) and weight, bf16 autocast. Both sides
    # run the same bf16 matmuls; ours accumulates weight/hidden grads in float32 across tiles, the
    # oracle in one bf16-output GEMM, hence a bf16-level gradient tolerance.
    check_linear(*linear_case(3, 9, 16, 301, seed=4), dict(val=(1e-4, 1e-5), grad=(2e-2, 2e-2)),
                 autocast=True)


def test_linear_bf16_params(small_linear_chunks):
    check_linear(*linear_case(2, 7, 16, 129, seed=6, dtype=torch.bfloat16),
                 dict(val=(1e-3, 1e-4), grad=(3e-2, 3e-2)))


def test_linear_bf16_params_one_superchunk(small_linear_chunks, monkeypatch):
    # one row super-chunk: the bf16 weight gradient is written tile by tile into the returned tensor
    monkeypatch.setattr(linear_logprob, "MAX_ROWS", 10**6)
    check_linear(*linear_case(3, 7, 16, 193, seed=12, dtype=torch.bfloat16),
                 dict(val=(1e-3, 1e-4), grad=(3e-2, 3e-2)))


def test_linear_extreme_logits_and_all_masked(small_linear_chunks):
    # logits ~ +-1e4: the online max/log-sum over vocabulary tiles must stay exact where a single
    # float32 lse would not; the label is often far below the row max (log-prob ~ -1e4)
    hidden, weight, ids, mask = linear_case(2, 6, 8, 157, seed=14)
    hidden = hidden * 4e3
    assert (hidden @ weight.t()).abs().max() > 5e3
    # value tolerance relative to |log-prob| ~ 3e4 (float32 resolution there is ~2e-3); measured: equal
    check_linear(hidden, weight, ids, mask, dict(val=(2e-2, 1e-5), grad=(1e-4, 1e-3)))
    mask[:] = False
    h = hidden.clone().requires_grad_()
    out = kernels.linear_sequence_logprobs(h, weight, ids, mask)
    assert torch.equal(out, torch.zeros(2))
    (gh,) = torch.autograd.grad(out.sum(), h)
    assert torch.equal(gh, torch.zeros_like(gh))


def test_linear_only_hidden_grad_and_no_grad(small_linear_chunks):
    hidden, weight, ids, mask = linear_case(2, 6, 8, 99, seed=8)
    h = hidden.clone().requires_grad_()
    out = kernels.linear_sequence_logprobs(h, weight, ids, mask)
    (gh,) = torch.autograd.grad(out.sum(), h)
    h_ref = hidden.clone().requires_grad_()
    (gh_ref,) = torch.autograd.grad(reference.linear_sequence_logprobs(h_ref, weight, ids, mask).sum(), h_ref)
    assert_close(gh, gh_ref, (2e-5, 1e-4))
    with torch.no_grad():  # the frozen reference model's pass
        assert_close(kernels.linear_sequence_logprobs(hidden, weight, ids, mask),
                     reference.linear_sequence_logprobs(hidden, weight, ids, mask), (2e-5, 1e-5))


def test_linear_skips_prompt_rows(monkeypatch):
    hidden, weight, ids, mask = linear_case(2, 8, 8, 50, seed=9)
    mask[:] = False
    mask[:, 5:7] = True  # rows 4 and 5 of each sequence predict response tokens
    seen = []
    real = torch.Tensor.index_select

    def spy(self, dim, index):
        seen.append(index.clone())
        return real(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    kernels.linear_sequence_logprobs(hidden, weight, ids, mask)
    assert torch.equal(seen[0], torch.tensor([4, 5, 12, 13]))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fn", ["sequence", "token"])
def test_minus_inf_label_logit_at_masked_position_is_not_nan(backend, fn):
    logits, ids, mask = make_case(2, 5, 30)
    mask = torch.ones_like(ids)
    mask[0, 2] = 0                                  # position 1 predicts ids[0, 2] (shifted)...
    logits = logits.detach().clone()
    logits[0, 1, ids[0, 2]] = -float("inf")         # ...whose logit is -inf: a banned token
    if fn == "sequence":
        call = kernels.sequence_logprobs
        want = reference.sequence_logprobs(logits, ids, mask)
    else:
        mask[0, 1], mask[0, 2] = 0, 1               # unshifted: position 1's label is ids[0, 1]
        logits[0, 1, ids[0, 1]] = -float("inf")
        call = kernels.token_logprobs
        want = reference.token_logprobs(logits, ids, mask)
    assert torch.isfinite(want).all()
    x = logits.requires_grad_()
    got = call(x, ids, mask, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_errors_are_clear(monkeypatch):
    logits, ids, mask = make_case(2, 4, 10)
    bad = ids.clone()
    bad[0, 2] = 10
    with pytest.raises(ValueError, match=r"token id 10, outside the vocabulary \[0, 10\)"):
        kernels.sequence_logprobs(logits, bad, mask)
    bad[0, 2] = -1
    with pytest.raises(ValueError, match="token id -1"):
        kernels.token_logprobs(logits, bad, mask)
    with pytest.raises(ValueError, match="mask shape"):
        kernels.sequence_logprobs(logits, ids, mask[:, :3])
    with pytest.raises(ValueError, match=r"ids shape .* must equal"):
        kernels.sequence_logprobs(logits, ids[:, :3], mask[:, :3])
    with pytest.raises(TypeError, match="integer"):
        kernels.sequence_logprobs(logits, ids.float(), mask)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.sequence_logprobs(logits, ids, mask, backend="cuda")
    with pytest.raises(ValueError, match=r"weight must be \(V, C\)"):
        kernels.linear_sequence_logprobs(torch.randn(2, 4, 8), torch.randn(10, 7), ids, mask)
    with pytest.raises(ValueError, match="token id 10"):
        kernels.linear_sequence_logprobs(torch.randn(2, 4, 8), torch.randn(10, 8), ids + 1, mask)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if kernels.HAS_TRITON:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.sequence_logprobs(logits, ids, mask, backend="triton")


def test_auto_uses_torch_on_cpu_even_under_interpreter(monkeypatch):
    assert logprob._check_backend("auto", torch.device("cpu")) == "torch"

    def boom(*a, **k):
        raise AssertionError("auto must not launch Triton on CPU")

    monkeypatch.setattr(logprob, "_triton_forward", boom)
    logits, ids, mask = make_case(2, 4, 20)
    kernels.sequence_logprobs(logits, ids, mask)
