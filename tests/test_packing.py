"""Padding-free packing (``train.packing``): a micro-batch's rows end to end in one flat row.

- The segment attention equals SDPA with the dense document mask it replaces (values and
  gradients, GQA too), and so does the varlen (FlashAttention) call's setup, run here through a
  CPU stand-in of ``varlen_attn`` with FlashAttention's bottom-right causal convention.
- No attention across sequences: changing every other pair leaves a pair's log-probs as they
  were; inside a shared-prompt row, neither answer sees the other. Positions restart per sequence.
- Training packed ends where the padded layouts end, in float32: losses, gradients and weights after
  3 AdamW steps, for the GPT and Llama families, both DPO layouts, several losses with
  ``rpo_alpha``, SFT, gradient checkpointing, LoRA, and the Triton kernels under the interpreter.
- The cached reference log-probs per pair are the unpacked ones, under their own cache key.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from attention_oracle import assert_matches_float32_sdpa

from fastdpo import kernels
from fastdpo.models import segments as seg_mod
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.llama import Llama, LlamaConfig
from fastdpo.models.segments import Segments, attend_segments
from fastdpo.training.batches import TokenizedPair, TokenizedSFT
from fastdpo.training.config import DPOConfig, TrainingConfig
from fastdpo.training.dpo import DPOTask, prepare_dpo
from fastdpo.training.logprobs import pair_logprobs
from fastdpo.training.loop import Trainer
from fastdpo.training.packing import flat_pairs, flat_sft
from fastdpo.training.sft import SFTTask

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
V = 67


def gpt(dropout=0.0, n_layer=2):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=40, n_layer=n_layer, n_head=2, n_embd=16, dropout=dropout))


def llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=V, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                             intermediate_size=24))


FAMILIES = {"gpt": gpt, "llama": llama}


def make_pairs(n: int, seed: int = 1) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(1, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    out = [TokenizedPair(ids(1, 7), ids(1, 9), ids(1, 9)) for _ in range(n)]
    out[0] = TokenizedPair(out[0].prompt[:1], out[0].chosen, out[0].rejected)   # a 1-token prompt
    return out


def dense_mask(s: Segments) -> torch.Tensor:
    """The (N, N) document mask the segments stand for, built token by token."""
    starts, N = s.starts(), s.n_tokens
    m = torch.zeros(N, N, dtype=torch.bool)
    for i, (n, pre) in enumerate(zip(s.lengths, s.prefix)):
        for t in range(n):
            m[starts[i] + t, starts[i]:starts[i] + t + 1] = True
            if pre is not None:
                m[starts[i] + t, starts[pre[0]]:starts[pre[0]] + pre[1]] = True
    return m


SEGMENTS = Segments([5, 3, 1, 4, 6, 2], [None, (0, 4), None, None, (3, 4), (4, 1)])


def attend_in_bins(q, k, v, segments: Segments):
    """Flat (1, H, N, D) tensors through the bins: gathered into their slots, one masked SDPA call,
    the real slots' outputs back in flat order."""
    bins = segments.bins()
    slot, mask = bins.on(q.device)

    def into(t):   # (1, h, N, D) -> (n, h, W, D), empty slots zero
        flat = t[0].transpose(0, 1)
        out = flat.new_zeros(bins.n * bins.width, *flat.shape[1:]).index_copy(0, slot, flat)
        return out.view(bins.n, bins.width, *flat.shape[1:]).transpose(1, 2)

    y = F.scaled_dot_product_attention(into(q), into(k), into(v), attn_mask=mask,
                                       enable_gqa=k.shape[1] != q.shape[1])
    y = y.transpose(1, 2).reshape(bins.n * bins.width, q.shape[1], -1)
    return y.index_select(0, slot).transpose(0, 1)[None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("path", ["bins", "one-bin"])
def test_segment_attention_equals_the_dense_document_mask(heads, dtype, path):
    """The bins' mask (and the dense fallback ``attend_segments`` takes off varlen) against SDPA
    with the document mask built token by token: values and gradients, float32 tight; bf16 against
    the float32 formula on the same bf16 inputs, loose."""
    H, Hkv = heads
    g = torch.Generator().manual_seed(0)
    N = SEGMENTS.n_tokens
    q, k, v = (torch.randn(1, h, N, 8, generator=g).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
    out = attend_in_bins(q, k, v, SEGMENTS) if path == "bins" else attend_segments(q, k, v, SEGMENTS)
    assert_matches_float32_sdpa(out, q, k, v, dense_mask(SEGMENTS))

@pytest.mark.parametrize("lengths,prefix", [
    (SEGMENTS.lengths, SEGMENTS.prefix),
    ([7, 3, 12, 2, 5, 5, 1, 9, 4, 4], [None, (0, 6), None, (2, 11), None, None, (5, 4), None, None, (8, 3)]),
    ([30], [None]),
], ids=["mixed", "dpo-like", "one"])
def test_bins_hold_every_unit_whole_and_never_more_slots_than_padded_rows(lengths, prefix):
    """Every token gets its own slot; a unit (a segment and the segments behind it) shares one bin;
    widths are between the longest unit and twice it; never more slots than padded rows (one unit
    per row of the longest unit's width); no mask row is empty (an empty slot must see something,
    or its softmax is NaN and so is the gradient it sends to token 0)."""
    s = Segments(lengths, prefix)
    bins = s.bins()
    slots = bins.slot.tolist()
    assert len(set(slots)) == s.n_tokens and all(0 <= x < bins.n * bins.width for x in slots)
    starts = s.starts()
    for unit in s.units():
        assert len({slots[starts[seg]] // bins.width for seg in unit}) == 1
    longest = max(sum(lengths[seg] for seg in u) for u in s.units())
    assert (bins.width - longest) % seg_mod.BIN_STEP == 0 and longest <= bins.width <= 2 * longest
    assert bins.n * bins.width <= len(s.units()) * longest   # never more slots than padded rows
    _, mask = bins.on(CPU)
    assert mask.shape == (bins.n, 1, bins.width, bins.width) and mask.any(-1).all()
    empty = bins.seg == -1
    assert not (mask[:, 0] & ~empty[:, :, None] & empty[:, None, :]).any()   # no real slot sees an empty one


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, enable_gqa):
    """FlashAttention's varlen semantics on CPU: sequence i's queries q[cu_q[i]:cu_q[i+1]] over its
    keys k[cu_k[i]:cu_k[i+1]], causal aligned bottom-right (window (-1, 0))."""
    assert window_size == (-1, 0) and cu_q.dtype == cu_k.dtype == torch.int32
    out = []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        nq, nk = qs.stop - qs.start, ks.stop - ks.start
        assert nq <= max_q and nk <= max_k
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        out.append(F.scaled_dot_product_attention(q[qs].transpose(0, 1), k[ks].transpose(0, 1),
                                                  v[ks].transpose(0, 1), attn_mask=mask,
                                                  enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


def test_the_varlen_call_is_set_up_as_the_segments_say(monkeypatch):
    """On CUDA in half precision the row is one ``varlen_attn`` call: its gathered keys and
    cumulative lengths, checked through a CPU stand-in with FlashAttention's conventions."""
    monkeypatch.setattr(seg_mod, "varlen_attn", fake_varlen)
    monkeypatch.setattr(seg_mod, "varlen_usable", lambda device, dtype, p: True)
    g = torch.Generator().manual_seed(1)
    N = SEGMENTS.n_tokens
    q, k, v = (torch.randn(1, h, N, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    out = attend_segments(q, k, v, SEGMENTS)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(SEGMENTS), enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), k)[0], torch.autograd.grad(want.sum(), k)[0],
                               rtol=1e-5, atol=1e-6)


def test_segments_are_validated():
    with pytest.raises(ValueError, match="earlier segment"):
        Segments([3, 2], [None, (1, 1)])
    with pytest.raises(ValueError, match="empty"):
        Segments([3, 0], [None, None])
    with pytest.raises(ValueError, match="flat row of 5 tokens"):
        attend_segments(*(torch.zeros(1, 2, 4, 8) for _ in range(3)), Segments([5], [None]))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompt", "separate"])
def test_positions_restart_and_padding_is_gone(shared):
    pairs = make_pairs(4)
    ids, chosen, rejected, flat = flat_pairs(pairs, pad_id=0, shared_prompt=shared)
    real = sum(p.packed_length if shared else p.n_tokens for p in pairs)
    assert flat.ids.shape == flat.pos.shape == (1, real) and ids.numel() > real   # the padding is gone
    if shared:   # each pair: prompt + chosen from 0, then the rejected branch from the prompt's end
        want = [t for p in pairs for P in [len(p.prompt)]
                for t in [*range(P + len(p.chosen)), P - 1, *range(P, P + len(p.rejected))]]
    else:        # each sequence from 0: the chosen rows, then the rejected rows
        want = [t for a in ("chosen", "rejected") for p in pairs
                for t in range(len(p.prompt) + len(getattr(p, a)))]
    assert flat.pos[0].tolist() == want
    # every slot of the padded layout that a mask selects holds the same token in the flat row
    valid = ids != 0
    assert torch.equal(flat.ids[0][flat.index][valid], ids[valid])
    assert len(flat.segments.lengths) == (2 * len(pairs))


@pytest.mark.parametrize("family", FAMILIES)
def test_no_attention_across_sequences(family):
    """Pair 0 keeps its log-probs when every other pair changes; inside a shared-prompt row the
    rejected answer's log-prob ignores the chosen answer. A leak would move them by ~1e-2."""
    model = FAMILIES[family]().eval()
    pairs = make_pairs(4)
    other = make_pairs(4, seed=9)
    changed = [pairs[0], *other[1:]]
    swapped = [TokenizedPair(pairs[0].prompt, other[0].chosen, pairs[0].rejected), *pairs[1:]]
    with torch.no_grad():
        for shared in (True, False):
            c, r = pair_logprobs(model, pairs, pad_id=0, device=CPU, shared_prompt=shared, packing=True)
            c2, r2 = pair_logprobs(model, changed, pad_id=0, device=CPU, shared_prompt=shared, packing=True)
            assert abs(float(c2[0] - c[0])) < 1e-5 and abs(float(r2[0] - r[0])) < 1e-5
            assert (c2[1:] - c[1:]).abs().max() > 1e-2   # the other pairs did change
            c3, r3 = pair_logprobs(model, swapped, pad_id=0, device=CPU, shared_prompt=shared, packing=True)
            assert abs(float(r3[0] - r[0])) < 1e-5 and abs(float(c3[0] - c[0])) > 1e-3


def train_cfg(tmp_path, packing, kernel="torch", **kw):
    base = dict(run_name=f"run-{packing}-{kernel}", output_dir=tmp_path, batch_size=4, micro_batch_size=2,
                learning_rate=1e-3, max_steps=3, log_every=1, mixed_precision="fp32", wandb="disabled",
                report_to="none", progress=False, device="cpu", kernel=kernel, packing=packing)
    return TrainingConfig(**{**base, **kw})


def make_task(kind, model, packing, shared=True, kernel="torch", **dpo):
    pairs = make_pairs(8)
    if kind == "sft":
        return SFTTask(model, [TokenizedSFT(p.prompt, p.chosen) for p in pairs], [], pad_id=0, device=CPU,
                       kernel=kernel, packing=packing)
    ref = torch.randn(len(pairs), 2, generator=torch.Generator().manual_seed(2)) - 15   # not the policy's
    cfg = DPOConfig(**{"beta": 0.3, "rpo_alpha": 0.5, "shared_prompt": shared, **dpo})
    return DPOTask(model, pairs, [], cfg, pad_id=0, device=CPU, kernel=kernel, ref_train=ref, packing=packing)


def train(tmp_path, family, kind, packing, shared=True, kernel="torch", train_kw=None, precision="fp32",
          **dpo):
    """(logged train metrics, each step's gradients, final weights) of a 3-step run."""
    model = FAMILIES[family]()
    trainer = Trainer(model, make_task(kind, model, packing, shared, kernel, **dpo),
                      train_cfg(tmp_path / family, packing, kernel, **(train_kw or {})), device=CPU,
                      precision=precision)
    grads, step = [], trainer.optimizer.step

    def record_then_step(*a, **k):
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    trainer.optimizer.step = record_then_step
    history = trainer.train().history
    return history, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_run(a, b, rtol=1e-5, grad_atol=1e-6, weight_atol=1e-5):
    (h1, g1, w1), (h2, g2, w2) = a, b
    assert len(h1) == len(h2) == 3
    for x, y in zip(h1, h2):
        for key in x:
            if isinstance(x[key], float) and key not in ("tokens/s", "seconds"):
                assert y[key] == pytest.approx(x[key], rel=rtol, abs=1e-6), key
    for s1, s2 in zip(g1, g2):
        assert s1.keys() == s2.keys()
        for name, g in s1.items():
            torch.testing.assert_close(s2[name], g, rtol=1e-4, atol=grad_atol, msg=name)
    for name, w in w1.items():
        torch.testing.assert_close(w2[name], w, rtol=0, atol=weight_atol, msg=name)


CASES = [("gpt", "dpo", True, {}), ("gpt", "dpo", False, {}), ("llama", "dpo", True, {}),
         ("llama", "dpo", False, {}), ("gpt", "dpo", True, {"loss_type": "ipo"}),
         ("llama", "dpo", True, {"loss_type": "simpo", "rpo_alpha": 0.0}), ("gpt", "sft", True, {}),
         ("llama", "sft", True, {})]


@pytest.mark.parametrize("family,kind,shared,dpo", CASES,
                         ids=[f"{f}-{k}-{'shared' if s else 'separate'}-{d.get('loss_type', 'sigmoid')}"
                              for f, k, s, d in CASES])
def test_packed_training_ends_where_the_padded_layout_does(tmp_path, family, kind, shared, dpo):
    padded = train(tmp_path / "padded", family, kind, False, shared, **dpo)
    packed = train(tmp_path / "packed", family, kind, True, shared, **dpo)
    assert_same_run(padded, packed)
    init = FAMILIES[family]().state_dict()
    assert any(not torch.equal(w, init[n]) for n, w in packed[2].items())   # the steps moved the weights
    if kind == "dpo" and "loss_type" not in dpo:
        assert packed[0][0]["loss/dpo"] != pytest.approx(math.log(2))   # a reference unlike the policy


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_packed_bf16_training_follows_the_padded_layout(tmp_path, family):
    """bf16 autocast: the bins (with empty slots) and short attention under gradients; packed and
    padded round differently, so the losses and first gradients agree loosely, and stay finite."""
    padded = train(tmp_path / "padded", family, "dpo", False, precision="bf16")
    packed = train(tmp_path / "packed", family, "dpo", True, precision="bf16")
    for a, b in zip(padded[0], packed[0]):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
    for name, g in padded[1][0].items():
        got = packed[1][0][name]
        assert torch.isfinite(got).all(), name
        assert (got - g).norm() <= 0.05 * g.norm() + 1e-6, name


def test_flat_rows_choose_varlen_only_for_a_half_precision_cuda_forward_without_dropout(monkeypatch):
    """What ``FlatRows.hidden_states`` asks ``varlen_usable``: the autocast dtype when autocast is on,
    else the weights'; dropout only while training."""
    from fastdpo.training import packing as packing_mod

    asked = []
    monkeypatch.setattr(packing_mod, "varlen_usable", lambda device, dtype, p=0.0: asked.append((dtype, p)))
    model, pairs = gpt(dropout=0.1), make_pairs(3)
    flat = flat_pairs(pairs, 0, True)[3]
    with torch.no_grad():
        model.eval()
        flat.hidden_states(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            flat.hidden_states(model)
        model.train()
        flat.hidden_states(model)
    assert asked == [(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.float32, 0.1)]


def test_packed_training_with_checkpointing_and_lora(tmp_path):
    lora = {"finetuning_type": "lora", "lora_rank": 4, "gradient_checkpointing": True}
    padded = train(tmp_path / "padded", "llama", "dpo", False, train_kw=lora)
    packed = train(tmp_path / "packed", "llama", "dpo", True, train_kw=lora)
    assert_same_run(padded, packed)
    assert all(".lora_" in n for n in packed[1][0])   # only the adapters trained


def test_checkpointed_packed_step_keeps_its_dropout():
    """Gradient checkpointing re-runs each block on the flat row with the same dropout masks."""
    ps = make_pairs(6)
    ref = torch.randn(len(ps), 2, generator=torch.Generator().manual_seed(1)) - 30
    out = []
    for on in (False, True):
        model = gpt(dropout=0.1).train()
        model.gradient_checkpointing = on
        task = DPOTask(model, ps, [], DPOConfig(beta=0.2, rpo_alpha=0.3), pad_id=0, device=CPU, ref_train=ref,
                       packing=True)
        torch.manual_seed(7)
        idx = list(range(len(ps)))
        loss, _ = task.loss(idx, task.step_norm([idx]))
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(out[0][0], out[1][0])
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_packed_training_on_the_triton_kernels_ends_where_torch_padded_does(tmp_path, kind):
    """The Triton kernels (interpreter) read the unflattened hidden states like padded ones."""
    padded = train(tmp_path / "padded", "gpt", kind, False, kernel="torch")
    packed = train(tmp_path / "packed", "gpt", kind, True, kernel="triton")
    assert_same_run(padded, packed)


def test_cached_reference_logprobs_equal_unpacked_under_their_own_key(tmp_path):
    pairs = make_pairs(10)
    say = []
    out = {}
    for packing in (False, True):
        cfg = train_cfg(tmp_path, packing, max_steps=1, run_name=f"ref-{packing}")
        t = prepare_dpo(gpt(), pairs[:8], pairs[8:], cfg, DPOConfig(reference="cached",
                                                                    reference_cache_dir=tmp_path / "cache"),
                        pad_id=0, say=lambda *a, **k: say.append(a[0]))
        out[packing] = torch.cat([t.task.ref_train, t.task.ref_val])
    torch.testing.assert_close(out[True], out[False], rtol=1e-6, atol=1e-5)
    assert sum("computed" in s for s in say) == 2                      # two keys: computed twice
    assert len(list((tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 2


def test_sft_rows_unflatten_to_collate_sft():
    items = [TokenizedSFT(p.prompt, p.chosen) for p in make_pairs(5)]
    ids, mask, flat = flat_sft(items, pad_id=0)
    assert flat.ids.shape[1] == sum(x.n_tokens for x in items)
    assert torch.equal(flat.ids[0][flat.index][mask], ids[mask])
    assert flat.segments.lengths == [x.n_tokens for x in items] and set(flat.segments.prefix) == {None}


def test_the_bench_compares_equal_work():
    """``python -m fastdpo.bench.packing``: same pairs and tokens per variant, fewer model tokens packed."""
    from fastdpo.bench.packing import run_packing_bench

    rows = run_packing_bench("wide", rounds=1, steps=1, precision="fp32", micro_batch_size=8, length_bucket=1,
                             variants=("padded", "packed", "separate"), verbose=False)
    real, model = ([r[key] for r in rows] for key in ("real_tokens_per_step", "model_tokens_per_step"))
    padded, packed, separate = rows
    assert real[0] == real[1] == real[2]
    assert model[1] < model[0] < model[2]   # packed < shared-prompt padded < separate padded
    assert packed["speedup"] > 0 and "speedup" not in padded


def test_the_bench_json_says_where_its_rows_came_from(tmp_path):
    """``--json`` writes the rows with the command, CPU, versions, git revision and load average,
    so a figure quoted from it can be traced."""
    import json

    from fastdpo.bench.packing import main

    out = tmp_path / "packing.json"
    main(["--data", "demo", "--rounds", "1", "--steps", "1", "--precision", "fp32", "--micro-batch-size", "2",
          "--variants", "padded,packed", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["rows"]] == ["padded", "packed"]
    meta = doc["meta"]
    assert "--variants padded,packed" in meta["command"]
    assert meta["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(meta["git"]) == {"revision", "dirty"} and set(meta["load_average"]) == {"before", "after"}


@pytest.mark.parametrize("path", ["bins", "varlen"])
def test_the_wrapped_policy_runs_the_flat_row(monkeypatch, path):
    """Under DDP/FSDP2 the policy is ``PolicyForward``: the packed rows go through its forward, in
    bins on CPU, or as one varlen call per layer (the CPU stand-in of ``varlen_attn``) where that
    kernel runs; both give the padded layout's log-probs."""
    from fastdpo.training import packing as packing_mod
    from fastdpo.training.logprobs import PolicyForward, pair_forward, pair_rows

    calls = []
    real = seg_mod.attend_segments
    monkeypatch.setattr("fastdpo.models.kv_cache.attend_segments",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    if path == "varlen":
        monkeypatch.setattr(seg_mod, "varlen_attn", fake_varlen)
        monkeypatch.setattr(seg_mod, "varlen_usable", lambda device, dtype, p=0.0: True)
        monkeypatch.setattr(packing_mod, "varlen_usable", lambda device, dtype, p=0.0: True)
    model, pairs = gpt(), make_pairs(3)
    want = pair_forward(model, pair_rows(pairs, 0, CPU, False))
    got = pair_forward(PolicyForward(model), pair_rows(pairs, 0, CPU, False, packing=True))
    assert len(calls) == (model.config.n_layer if path == "varlen" else 0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
