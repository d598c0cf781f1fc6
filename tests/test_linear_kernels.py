"""The fused lm_head ops vs the oracle: ``linear_sequence_logprobs`` (recompute in backward) and
``linear_pair_loss`` (gradients in forward), on the torch path and the Triton kernels (under the
interpreter; tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).

Budgets are shrunk so that small shapes still span several vocabulary tiles, row blocks, row
chunks and pair chunks. Tolerances per dtype: float32 is the same math in another order; bf16
rounds the logits (and the gradient GEMMs' operands) to 8 bits of mantissa, and the Triton
recompute op keeps its logits in float32 where the oracle under autocast rounds them, so a bf16
log-prob may differ by ~1 bf16 ulp of a logit per token.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdpo import kernels
from fastdpo.kernels import linear_logprob, linear_pair, logprob, reference

TOL = {
    torch.float32: dict(val=(2e-5, 1e-5), grad=(2e-5, 1e-4)),
    torch.bfloat16: dict(val=(5e-2, 1e-2), grad=(3e-2, 3e-2)),
}
BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """A backend with budgets small enough for test shapes to take every chunking branch."""
    if request.param == "triton" and not kernels.HAS_TRITON:
        pytest.skip("triton not installed")
    small(monkeypatch)
    return request.param


def small(monkeypatch):
    monkeypatch.setattr(linear_logprob, "FWD_TILE_BYTES", 4 * 64 * 3)
    monkeypatch.setattr(linear_logprob, "BWD_TILE_BYTES", 4 * 64 * 8)
    monkeypatch.setattr(linear_logprob, "MAX_ROWS", 5)
    monkeypatch.setattr(linear_logprob, "SCRATCH_BYTES", 1)       # one row block per Triton chunk
    monkeypatch.setattr(linear_pair, "PAIR_CHUNK_BYTES", 1)   # one pair per torch chunk


def assert_close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), atol=tol[0], rtol=tol[1])


def case(B, T, C, V, *, seed=0, dtype=torch.float32, scale=1.0):
    """hidden, weight, ids, mask: a prompt, a response with holes, one fully masked row, labels
    0 and V-1 in use."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, C, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, C, generator=g) / C**0.5).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, -1] = V - 1
    if T > 2:
        ids[-1, 1] = 0
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, : T // 3] = False
    if B > 1:
        mask[1] = False
    return hidden, weight, ids, mask


def run_linear(hidden, weight, ids, mask, backend, autocast=False, gout=None):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    gout = torch.linspace(-1.0, 1.5, hidden.shape[0]) if gout is None else gout
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = kernels.linear_sequence_logprobs(h, w, ids, mask, backend=backend)
    gh, gw = torch.autograd.grad(out, (h, w), gout)
    assert out.dtype == torch.float32 and out.shape == (hidden.shape[0],)
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    return out, gh, gw


def check_linear(hidden, weight, ids, mask, backend, tol, autocast=False):
    got = run_linear(hidden, weight, ids, mask, backend, autocast)
    want = run_linear(hidden, weight, ids, mask, "reference", autocast)
    assert_close(got[0], want[0], tol["val"])
    for a, b in zip(got[1:], want[1:]):
        assert_close(a, b, tol["grad"])
    return got


# --------------------------------------------------------------------------- recompute op


# odd V with a ragged tile; C not a multiple of the K tile; V a multiple of the tile; T = 1
SHAPES = [(3, 9, 24, 301), (2, 6, 16, 128), (2, 1, 16, 33)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "autocast"])
def test_linear_matches_oracle(backend, shape, precision):
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    tol = TOL[torch.float32 if precision == "float32" else torch.bfloat16]
    got = check_linear(*case(*shape, dtype=dtype), backend, tol, autocast=precision == "autocast")
    if shape[1] == 1:   # no position has a next token
        assert all(torch.count_nonzero(t) == 0 for t in got)


@pytest.mark.parametrize("scale", [4e3, 1e-3], ids=["large", "small"])
def test_linear_extreme_values(backend, scale):
    # |logits| ~ 1e4: the online max/log-sum must stay exact where one float32 lse would not
    # (value tolerance relative to |log-prob| ~ 3e4); ~0: every log-prob is -log(V)
    hidden, weight, ids, mask = case(2, 6, 16, 157, seed=3, scale=scale)
    z = hidden @ weight.t()
    assert (z.abs().max() > 5e3) if scale > 1 else (z.abs().max() < 1e-2)
    out = check_linear(hidden, weight, ids, mask, backend, dict(val=(2e-2, 1e-5), grad=(1e-4, 1e-3)))[0]
    assert torch.isfinite(out).all()


def test_linear_all_masked_batch(backend):
    hidden, weight, ids, mask = case(2, 5, 16, 70)
    out, gh, gw = check_linear(hidden, weight, ids, torch.zeros_like(mask), backend, TOL[torch.float32])
    assert torch.equal(out, torch.zeros(2))
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_linear_soft_mask_and_one_input_grad(backend):
    hidden, weight, ids, _ = case(2, 7, 16, 99, seed=8)
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(1))   # per-token loss weights
    check_linear(hidden, weight, ids, mask, backend, TOL[torch.float32])
    h = hidden.clone().requires_grad_()
    out = kernels.linear_sequence_logprobs(h, weight, ids, mask, backend=backend)
    (gh,) = torch.autograd.grad(out.sum(), h)
    h_ref = hidden.clone().requires_grad_()
    (gh_ref,) = torch.autograd.grad(reference.linear_sequence_logprobs(h_ref, weight, ids, mask).sum(), h_ref)
    assert_close(gh, gh_ref, TOL[torch.float32]["grad"])
    with torch.no_grad():   # the frozen reference model's pass
        assert_close(kernels.linear_sequence_logprobs(hidden, weight, ids, mask, backend=backend),
                     reference.linear_sequence_logprobs(hidden, weight, ids, mask), TOL[torch.float32]["val"])


# --------------------------------------------------------------------------- pair op


def pair_case(layout, P=3, T=10, C=24, V=301, seed=0, dtype=torch.float32):
    """Packed: row i = prompt | chosen | copy of the prompt's last token | rejected | padding.
    Separate: P chosen rows, then P rejected rows. Masks with a hole; pair 2's rejected answer
    is empty in the separate layout (its log-prob is 0)."""
    g = torch.Generator().manual_seed(seed)
    R = P if layout == "packed" else 2 * P
    hidden = torch.randn(R, T, C, generator=g).to(dtype)
    weight = (torch.randn(V, C, generator=g) / C**0.5).to(dtype)
    ids = torch.randint(0, V, (R, T), generator=g)
    ids[0, 4], ids[-1, -1] = 0, V - 1
    cm = torch.zeros(P, T, dtype=torch.bool)
    rm = torch.zeros(P, T, dtype=torch.bool)
    if layout == "packed":
        cm[:, 3:6], rm[:, 7:10] = True, True
        rm[1, 9] = False            # padding
    else:
        cm[:, 4:9], rm[:2, 3:10] = True, True
    cm[1, 4] = False                # a hole
    return hidden, weight, ids, cm, rm


def loss_fn(kind, P, ref_c, ref_r, n_chosen_tokens, beta=0.3):
    """A per-pair loss of each kind the trainer has (and an NLL-only one that ignores rejected)."""
    def fn(c, r, pairs):
        if kind == "sft":
            return -c / n_chosen_tokens
        z = (c - ref_c[pairs]) - (r - ref_r[pairs])
        if kind == "ipo":
            losses = (z - 1 / (2 * beta)) ** 2
        elif kind == "hinge":
            losses = torch.relu(1 - beta * z)
        else:
            eps = 0.1 if kind == "sigmoid_ls" else 0.0
            losses = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
        losses = losses / P
        if kind == "rpo":
            losses = losses + 0.5 * (-c / n_chosen_tokens)
        return losses
    return fn


def run_pair(hidden, weight, ids, cm, rm, fn, backend, autocast=False, upstream=2.0):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, lc, lr = kernels.linear_pair_loss(h, w, ids, cm, rm, fn, backend=backend)
    assert loss.shape == () and loss.dtype == torch.float32 and not lc.requires_grad
    gh, gw = torch.autograd.grad(loss * upstream, (h, w))
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    return loss, lc, lr, gh, gw


LOSSES = ["sigmoid", "sigmoid_ls", "ipo", "hinge", "rpo", "sft"]


@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("kind", LOSSES)
def test_pair_loss_matches_autograd_through_oracle(backend, layout, kind):
    hidden, weight, ids, cm, rm = pair_case(layout)
    ref_c, ref_r = torch.tensor([-30.0, -28.0, -35.0]), torch.tensor([-31.0, -27.5, -40.0])
    fn = loss_fn(kind, 3, ref_c, ref_r, n_chosen_tokens=int(cm[:, 1:].sum()))
    got = run_pair(hidden, weight, ids, cm, rm, fn, backend)
    want = run_pair(hidden, weight, ids, cm, rm, fn, "reference")
    for a, b in zip(got[:3], want[:3]):
        assert_close(a, b, TOL[torch.float32]["val"])
    for a, b in zip(got[3:], want[3:]):
        assert_close(a, b, TOL[torch.float32]["grad"])
    if kind == "hinge":   # some pairs past the margin: their gradient is exactly 0
        assert torch.count_nonzero(got[3]) > 0


@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("precision", ["bfloat16", "autocast"])
def test_pair_loss_bf16(backend, layout, precision):
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    hidden, weight, ids, cm, rm = pair_case(layout, dtype=dtype, seed=4)
    fn = loss_fn("rpo", 3, torch.full((3,), -30.0), torch.full((3,), -31.0), n_chosen_tokens=11)
    got = run_pair(hidden, weight, ids, cm, rm, fn, backend, autocast=precision == "autocast")
    want = run_pair(hidden, weight, ids, cm, rm, fn, "reference", autocast=precision == "autocast")
    for a, b in zip(got[:3], want[:3]):
        assert_close(a, b, TOL[torch.bfloat16]["val"])
    for a, b in zip(got[3:], want[3:]):
        assert_close(a, b, TOL[torch.bfloat16]["grad"])


def test_pair_logprobs_equal_the_recompute_op(backend):
    # the same log-probs the trainer gets today from one linear_sequence_logprobs call
    hidden, weight, ids, cm, rm = pair_case("packed", seed=2)
    _, lc, lr = kernels.linear_pair_loss(hidden, weight, ids, cm, rm, lambda c, r, p: c - r, backend=backend)
    lp = kernels.linear_sequence_logprobs(torch.cat([hidden, hidden]), weight, torch.cat([ids, ids]),
                                          torch.cat([cm, rm]), backend=backend)
    assert_close(torch.cat([lc, lr]), lp, TOL[torch.float32]["val"])


def test_pair_loss_all_masked_batch_and_no_grad(backend):
    hidden, weight, ids, cm, rm = pair_case("separate")
    cm[:], rm[:] = False, False
    fn = loss_fn("sigmoid", 3, torch.zeros(3), torch.zeros(3), 1)
    loss, lc, lr, gh, gw = run_pair(hidden, weight, ids, cm, rm, fn, backend)
    assert torch.equal(lc, torch.zeros(3)) and torch.equal(lr, torch.zeros(3))
    assert_close(loss, torch.log(torch.tensor(2.0)), (1e-6, 1e-6))   # sigmoid DPO at z = 0 is ln 2
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    hidden, weight, ids, cm, rm = pair_case("packed")
    h = hidden.clone().requires_grad_()
    with torch.no_grad():   # evaluation: the loss and log-probs, no gradient work, no graph
        loss, lc, lr = kernels.linear_pair_loss(h, weight, ids, cm, rm, fn, backend=backend)
    assert not loss.requires_grad
    want = kernels.linear_pair_loss(hidden, weight, ids, cm, rm, fn, backend="reference")
    assert_close(loss, want[0], TOL[torch.float32]["val"])


def test_pair_loss_backward_once():
    hidden, weight, ids, cm, rm = pair_case("packed")
    h = hidden.clone().requires_grad_()
    loss, _, _ = kernels.linear_pair_loss(h, weight, ids, cm, rm, lambda c, r, p: c - r)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_pair_loss_frozen_weight(backend):
    hidden, weight, ids, cm, rm = pair_case("packed", seed=5)
    fn = loss_fn("ipo", 3, torch.zeros(3), torch.zeros(3), 1)
    h = hidden.clone().requires_grad_()
    loss, _, _ = kernels.linear_pair_loss(h, weight, ids, cm, rm, fn, backend=backend)
    (gh,) = torch.autograd.grad(loss, h)
    h_ref = hidden.clone().requires_grad_()
    want = kernels.linear_pair_loss(h_ref, weight, ids, cm, rm, fn, backend="reference")[0]
    (gh_ref,) = torch.autograd.grad(want, h_ref)
    assert_close(gh, gh_ref, TOL[torch.float32]["grad"])


# --------------------------------------------------------------------------- bad input, every backend

ALL = ["reference", "torch", "triton"]


def linear_call(backend, hidden, weight, ids, mask):
    return kernels.linear_sequence_logprobs(hidden, weight, ids, mask, backend=backend)


def pair_call(backend, hidden, weight, ids, mask):
    """The pair op on the same rows: a separate-rows batch, first half chosen."""
    P = hidden.shape[0] // 2
    return kernels.linear_pair_loss(hidden, weight, ids, mask[:P], mask[P:], lambda c, r, p: c + r,
                                    backend=backend)[0]


@pytest.mark.parametrize("op", [linear_call, pair_call], ids=["linear", "pair"])
@pytest.mark.parametrize("backend", ALL)
def test_bad_input_is_a_value_error_on_every_backend(op, backend):
    hidden, weight, ids, mask = case(2, 6, 16, 67)
    bad_cases = {
        "int hidden": (hidden.long(), weight, ids, mask, "float32, bfloat16 or float16"),
        "float64 weight": (hidden, weight.double(), ids, mask, "float32, bfloat16 or float16"),
        "mixed dtypes": (hidden.bfloat16(), weight, ids, mask, "one dtype"),
        "float ids": (hidden, weight, ids.float(), mask, "integer"),
        "id = V": (hidden, weight, torch.where(ids == ids[0, 2], 67, ids), mask, "outside the vocabulary"),
        "id = -1": (hidden, weight, torch.where(ids == ids[0, 2], -1, ids), mask, "token id -1"),
        "weight C": (hidden, weight[:, :8], ids, mask, r"weight must be \(V, C\)"),
        "mask shape": (hidden, weight, ids, mask[:, :5], "shape"),
    }
    for name, (h, w, i, m, msg) in bad_cases.items():
        with pytest.raises(ValueError, match=msg):
            print(name)
            op(backend, h, w, i, m)


@pytest.mark.parametrize("op", [linear_call, pair_call], ids=["linear", "pair"])
def test_odd_inputs_give_the_same_answer_on_every_backend(op, monkeypatch):
    small(monkeypatch)
    hidden, weight, ids, mask = case(2, 6, 16, 67)   # V = 67: not a multiple of any tile
    wide = torch.randn(2, 6, 48)
    wide[..., ::3] = hidden
    strided = wide[..., ::3]                          # non-contiguous hidden
    assert not strided.is_contiguous()
    inputs = {"odd V, strided hidden": (strided, weight, ids, mask),
              "all masked": (hidden, weight, ids, torch.zeros_like(mask)),
              "T = 1": (hidden[:, :1], weight, ids[:, :1], mask[:, :1])}
    for name, args in inputs.items():
        print(name)
        outs = {}
        for backend in ALL:
            h = args[0].detach().requires_grad_()
            out = op(backend, h, *args[1:])
            outs[backend] = (out, *torch.autograd.grad(out.sum(), h, allow_unused=True))
        for backend in ("torch", "triton"):
            for a, b in zip(outs[backend], outs["reference"]):
                assert_close(a, b, TOL[torch.float32]["grad"])


def test_pair_op_rejects_a_batch_of_neither_layout():
    hidden, weight, ids, cm, rm = pair_case("packed")
    fn = loss_fn("sigmoid", 3, torch.zeros(3), torch.zeros(3), 1)
    with pytest.raises(ValueError, match=r"\(P, T, C\) \(packed pairs\) or \(2P, T, C\)"):
        kernels.linear_pair_loss(hidden[:2], weight, ids[:2], cm, rm, fn)
    with pytest.raises(ValueError, match="both be"):
        kernels.linear_pair_loss(hidden, weight, ids, cm, rm[:2], fn)
    for backend in ALL:
        with pytest.raises(ValueError, match=r"one loss per pair, shape \(3,\)"):
            kernels.linear_pair_loss(hidden, weight, ids, cm, rm, lambda c, r, p: (c - r).sum(),
                                     backend=backend)


# --------------------------------------------------------------------------- the Triton kernels ran


@pytest.fixture
def launches(monkeypatch):
    """Records every launch of the linear ops' Triton kernels: the spy replaces the kernel
    object's own ``run`` (what ``kernel[grid](...)`` calls), not a Python wrapper around it."""
    if not kernels.HAS_TRITON:
        pytest.skip("triton not installed")
    seen = []
    for name in ("_logits_kernel", "_dlogits_kernel", "_grad_hidden_kernel", "_grad_weight_kernel"):
        kernel = getattr(linear_logprob, name)
        real = kernel.run

        def spy(*args, grid, warmup, real=real, name=name, **kw):
            seen.append((name, tuple(grid), {k: v for k, v in kw.items() if k in ("STATS", "OUT")}))
            return real(*args, grid=grid, warmup=warmup, **kw)

        # in the instance's __dict__, so that undo deletes it again (setattr's undo would leave the
        # bound method there, hiding class-level spies of later tests)
        monkeypatch.setitem(vars(kernel), "run", spy)
    return seen


def test_triton_kernels_launch(launches):
    hidden, weight, ids, mask = case(3, 9, 24, 301)
    run_linear(hidden, weight, ids, mask, "triton")
    modes = [(n, k.get("STATS"), k.get("OUT")) for n, _, k in launches]
    assert modes[0] == ("_logits_kernel", True, 0)                 # forward: statistics only
    assert ("_logits_kernel", False, 2) in modes                   # backward: dlogits recomputed
    assert {"_grad_hidden_kernel", "_grad_weight_kernel"} <= {n for n, _, _ in launches}
    launches.clear()
    hp, wp, idp, cm, rm = pair_case("packed")
    run_pair(hp, wp, idp, cm, rm, lambda c, r, p: c - r, "triton")
    names = [n for n, _, _ in launches]
    assert ("_logits_kernel", True, 1) in [(n, k.get("STATS"), k.get("OUT")) for n, _, k in launches]
    assert {"_dlogits_kernel", "_grad_hidden_kernel", "_grad_weight_kernel"} <= set(names)
    launches.clear()
    run_linear(hidden, weight, ids, mask, "auto")                  # auto on CPU tensors: the torch path
    assert launches == []


def test_triton_path_never_reads_a_device_value_on_the_host(monkeypatch):
    """Past input validation, the Triton path's host code never waits for the device: no
    nonzero, item, tolist or bool/int/float of a tensor (each is a sync on CUDA)."""
    if not kernels.HAS_TRITON:
        pytest.skip("triton not installed")
    hidden, weight, ids, mask = case(3, 9, 24, 301)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    cm, rm = mask[:, :], mask.roll(1, 1) & ~mask

    def sync(*a, **k):
        raise AssertionError("host sync")

    monkeypatch.setattr(linear_pair.lin, "check_linear_inputs", lambda *a, **k: None)
    monkeypatch.setattr(linear_logprob, "check_linear_inputs", lambda *a, **k: None)
    for name in ("nonzero", "item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "nonzero", sync)
    out = kernels.linear_sequence_logprobs(h, w, ids, mask, backend="triton")
    torch.autograd.grad(out.sum(), (h, w))
    loss, _, _ = kernels.linear_pair_loss(h, w, ids, cm, rm, lambda c, r, p: c - r, backend="triton")
    torch.autograd.grad(loss * 1.0, (h, w))
    monkeypatch.undo()
    assert torch.isfinite(out).all()


def test_auto_picks_triton_only_for_cuda():
    assert logprob.resolve_backend("auto", torch.device("cpu")) == "torch"
    if kernels.HAS_TRITON:
        assert logprob.resolve_backend("auto", torch.device("cuda")) == "triton"
