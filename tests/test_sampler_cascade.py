"""Shared-prefix (cascade) decoding and the sampler's CUDA path, on CPU with tiny float32 models.

- The cascade parts (prefix once per group + each row's own tokens, merged by log-sum-exp) equal
  one softmax attention over the union (against SDPA).
- ``sample`` with K rows per prompt: every step's logits and every token equal the re-forward
  oracle's, with cascade on and off, for GPT and for Llama with grouped-query attention, while rows
  finish at different steps (rows and whole prompt groups dropped from the batch).
- The prompt really is read once per group (the attention calls' shapes).
- The CUDA code path of the loop reads the host once per CHECK_EVERY steps, not per token
  (``host_syncs.HostSyncs``), and draws the same tokens as the CPU path.
- The decode step's device part traces into one graph (``torch.compile(fullgraph=True)``): no host
  reads and no data-dependent Python branches, as CUDA graphs need.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from host_syncs import HostSyncs

from fastdpo.generation import sampler
from fastdpo.generation.decode_batch import DecodeBatch, use_cascade
from fastdpo.generation.sampler import sample, sample_reforward
from fastdpo.models import decode_cache, kv_cache
from fastdpo.models.decode_cache import merge_attention, partial_attention
from fastdpo.models.gpt import GPT, GPTConfig
from fastdpo.models.llama import Llama, LlamaConfig

pytestmark = pytest.mark.usefixtures("one_thread")
V = 97


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "gpt":
        m = GPT(GPTConfig(vocab_size=V, block_size=96, n_layer=2, n_head=2, n_embd=32))
    else:   # grouped-query attention: 2 query heads per key/value head
        m = Llama(LlamaConfig(vocab_size=V, block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              intermediate_size=48))
    with torch.no_grad():   # wider than the init, so attention visibly shapes the logits
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return m.eval()


def grouped_prompts(seed=0):
    """Four distinct ragged prompts, K = 4, 3, 1 and 2 rows each, interleaved (not adjacent)."""
    g = torch.Generator().manual_seed(seed)
    distinct = [torch.randint(0, V, (n,), generator=g).tolist() for n in (9, 23, 14, 30)]
    order = [0, 1, 0, 3, 1, 0, 2, 3, 1, 0]
    return [distinct[i] for i in order], order


def record(store):
    def hook(step, rows, logits):
        store[step] = (rows.clone(), logits.clone())
    return hook


def test_cascade_parts_merge_to_one_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(3))
    k, v = torch.randn(3, 2, 11, 8, generator=g), torch.randn(3, 2, 11, 8, generator=g)
    hidden = torch.rand(3, 1, 5, 11, generator=g) < 0.3
    hidden[..., 0] = False                               # every query sees a key in each part
    hidden[..., 6] = False
    split = 6                                            # keys 0..5 | 6..10, as prefix | row part
    o1, lse1 = partial_attention(q, k[:, :, :split], v[:, :, :split], hidden[..., :split])
    o2, lse2 = partial_attention(q, k[:, :, split:], v[:, :, split:], hidden[..., split:])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=~hidden)
    torch.testing.assert_close(merge_attention(o1, lse1, o2, lse2), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse1, torch.logsumexp((q @ k[:, :, :split].transpose(-1, -2) / 8 ** 0.5)
                                                     .masked_fill(hidden[..., :split], -torch.inf), -1,
                                                     keepdim=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("cascade", [True, False])
def test_every_step_equals_the_oracle_while_rows_and_groups_finish(family, cascade):
    m = tiny(family)
    prompts, group = grouped_prompts()
    temps = [0.0, 0.8, 1.2, 1.0, 0.0, 1.5, 0.9, 0.7, 1.1, 1.3]
    # prompt 2's only row stops after 2 tokens and prompt 0's rows after 3 (whole groups leave the
    # batch); eos ends others at random steps
    budgets = [3 if g == 0 else 2 if g == 2 else 40 for g in group]
    eos, sizes = 5, []
    fast, slow = {}, {}
    seen = _count_rows(m, sizes)
    try:
        a = sample(m, prompts, temps, budgets, 20, eos, seed=3, on_step=record(fast), cascade=cascade)
    finally:
        seen.remove()
    b = sample_reforward(m, prompts, temps, budgets, 20, eos, seed=3, on_step=record(slow))
    assert a == b
    assert fast.keys() == slow.keys() and len(fast) > 10
    for step in fast:
        assert torch.equal(fast[step][0], slow[step][0]), step
        torch.testing.assert_close(fast[step][1], slow[step][1], rtol=0, atol=3e-5)
    assert sum(map(len, a)) > 60 and min(map(len, a)) < 3    # long rows and early-finished ones
    assert sizes[0] == 4 and sizes[1] == 10 and min(sizes) < 8  # one prefill of 4, then fewer rows


def _count_rows(model, sizes):
    emb = model.transformer.wte if isinstance(model, GPT) else model.model.embed_tokens
    return emb.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_prompt_is_read_once_per_group(family, monkeypatch):
    """With cascade each layer attends once over the (groups, P) prompt keys and once over the rows'
    own (rows, capacity) keys; without it only over rows that hold their prompt."""
    m = tiny(family, seed=1)
    prompts, _ = grouped_prompts(seed=1)
    shapes = []

    def spy(real):
        def attention(q, k, v, *args, **kwargs):
            shapes.append((q.shape[0], q.shape[2], k.shape[2]))
            return real(q, k, v, *args, **kwargs)
        return attention

    monkeypatch.setattr(decode_cache, "partial_attention", spy(partial_attention))   # both kernels the
    monkeypatch.setattr(decode_cache, "F", SimpleNamespace(                          # decode cache calls
        scaled_dot_product_attention=spy(F.scaled_dot_product_attention)))
    outs = []
    for cascade in (True, False):
        shapes.clear()
        outs.append(sample(m, prompts, 1.0, 4, None, None, seed=1, cascade=cascade))
        layers = m.config.n_layer
        if cascade:   # per step and layer: the prompt part, G=4 groups x (width 4 x rep) queries ...
            rep = m.config.n_head // getattr(m.config, "n_kv_head", m.config.n_head)
            prefix = [s for s in shapes[:2 * layers * 3] if s[0] == 4]
            assert prefix == [(4, 4 * rep, 30)] * (3 * layers)
            assert (10, rep, 32) in shapes           # ... and the rows' own part (one chunk)
        else:   # every row over its copy of the prompt (30) + its tokens, one or two chunks
            assert {s[0] for s in shapes} == {10} and {s[2] for s in shapes} == {32, 64}
    assert outs[0] == outs[1]


def test_auto_mode_shares_repeated_prompts_that_are_not_tiny():
    long, short = list(range(20)), [1, 2]
    assert use_cascade([long, long], None) and not use_cascade([long, long[:-1]], None)
    assert not use_cascade([short, short], None)
    assert use_cascade([short, short], True) and not use_cascade([long, long], False)


# --------------------------------------------------------------------------- the CUDA code path


@pytest.fixture
def cuda_path(monkeypatch):
    """The loop and the models behave as on CUDA: live flags read every CHECK_EVERY steps, the batch
    kept a multiple of ROW_BUCKET rows, positions checked on the device."""
    monkeypatch.setattr(sampler, "host_reads_are_free", lambda device: False)
    monkeypatch.setattr(kv_cache, "position_check_on_host", lambda device: False)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_cuda_loop_reads_the_host_every_check_not_every_token(family, cuda_path, monkeypatch):
    m = tiny(family, seed=2)
    prompts, _ = grouped_prompts(seed=2)
    every = sampler.CHECK_EVERY

    def syncs(steps, eos=None):
        with monkeypatch.context() as patch, HostSyncs(patch) as spy:
            out = sample(m, prompts, 1.0, steps, 20, eos, seed=2)
        return out, spy.calls

    _, short = syncs(every)
    _, long = syncs(4 * every)
    assert len(long) - len(short) == 3, long    # one read per CHECK_EVERY steps: 3 more checks
    assert len(short) <= 4, short               # setup (the rows' seeds, on the CPU) + results
    # rows ending at eos: dropped at the checks (to a multiple of ROW_BUCKET), same tokens as the
    # CPU path, which checks every step
    out, calls = syncs(4 * every, eos=7)
    assert len(calls) <= len(long)
    monkeypatch.undo()
    cpu = sample(m, prompts, 1.0, 4 * every, 20, 7, seed=2)
    assert out == cpu and min(map(len, cpu)) < every and max(map(len, cpu)) > 2 * every


def test_rows_to_keep_fill_up_a_bucket_with_finished_rows():
    live = [True, False, False, True, False, True, False, False, False, False]
    assert sampler._rows_to_keep(live, 1) == [0, 3, 5]
    assert sampler._rows_to_keep(live, 4) == [0, 1, 3, 5]
    assert sampler._rows_to_keep(live, 8) == list(range(8))
    assert sampler._rows_to_keep(live[:4], 8) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("cascade", [True, False])
def test_the_decode_step_traces_into_one_graph(family, cascade, cuda_path):
    """``torch.compile(fullgraph=True)`` fails on any graph break: a host read (``.item()``,
    ``nonzero``...) or Python control flow on a tensor's value inside the step."""
    m = tiny(family, seed=4)
    prompts, _ = grouped_prompts(seed=4)
    with torch.no_grad():
        eager, traced = DecodeBatch(m, prompts, cascade), DecodeBatch(m, prompts, cascade)
        traced.forward = torch.compile(traced.forward, fullgraph=True, backend="eager", dynamic=False)
        tok = eager.logits.argmax(-1)
        live = torch.ones(len(prompts), dtype=torch.bool)
        for _ in range(4):   # the flat row part grows at the third step: a new shape bucket
            want = eager.step(tok, live)
            torch.testing.assert_close(traced.step(tok, live), want, rtol=0, atol=1e-5)
            tok = want.argmax(-1)
        assert traced.caches[0].capacity == eager.caches[0].capacity


def test_a_decode_cache_takes_one_token_per_row():
    m = tiny("gpt")
    batch = DecodeBatch(m, [[1, 2, 3]], cascade=False)
    batch.state.mask_slots(batch.caches[0].capacity)
    with pytest.raises(ValueError, match="one token per row"):
        m(torch.tensor([[4, 5]]), pos=torch.tensor([[3, 4]]), kv_caches=batch.caches)



def test_the_shared_prefix_bench_times_every_side_on_the_same_work():
    from fastdpo.bench.shared_prefix import REPO, run_shared_prefix_bench

    in_git = (REPO / ".git").exists()
    threads = torch.get_num_threads()
    try:
        rows = run_shared_prefix_bench("tiny", n_prompts=2, k=3, prompt_len=20, max_new=5, dtype="float32",
                                       hf=False, baseline_rev="HEAD" if in_git else None, verbose=False)
    finally:
        torch.set_num_threads(threads)
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"cascade", "flat"} | ({"sampler@HEAD"} if in_git else set())
    assert all(r["rows"] == 6 and r["new_tokens"] == 30 and r["seconds"] > 0 for r in rows)
    assert by_impl["cascade"]["cascade_speedup"] == 1.0
    assert all(r["same_tokens_as_cascade"] is True for r in rows)   # float32: the very same tokens


def _attention_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2, 5, 16, generator=g).to(dtype)
    k, v = (torch.randn(3, 2, 37, 16, generator=g).to(dtype) for _ in range(2))
    hidden = torch.rand(3, 1, 5, 37, generator=g) < 0.4
    hidden[..., 3] = False                               # every query sees a key
    return q, k, v, hidden


def test_the_cpu_flash_kernel_computes_the_matmul_parts_in_half_precision(monkeypatch):
    """On CPUs with AMX, half-precision parts run torch's flash kernel (additive mask, its own
    log-sum-exp); forced on here (it runs on any CPU, only slower), both kernels must give the
    float32 oracle's output and log-sum-exp to bf16 accuracy, with the mask as built or passed."""
    q, k, v, hidden = _attention_inputs(torch.bfloat16)
    scores = (q.float() @ k.float().transpose(-1, -2) / 4).masked_fill(hidden, -torch.inf)
    want_lse = torch.logsumexp(scores, -1, keepdim=True)
    want = scores.softmax(-1) @ v.float()
    outs = {}
    for flash in (True, False):
        monkeypatch.setattr(decode_cache, "CPU_HALF_FLASH", flash)
        assert decode_cache._fused_is_faster(k) == flash
        out, lse = partial_attention(q, k, v, hidden)
        assert out.dtype == lse.dtype == torch.float32 and lse.shape == (3, 2, 5, 1)
        torch.testing.assert_close(out, want, rtol=0, atol=2e-2)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=2e-2)
        outs[flash] = out
        bias = decode_cache.additive(hidden, torch.bfloat16)
        assert torch.equal(partial_attention(q, k, v, hidden, bias)[0], out)
    assert not torch.equal(outs[True], outs[False])      # two kernels really ran
    q32, k32, v32, _ = _attention_inputs(torch.float32)
    assert not decode_cache._cpu_half_flash(k32)          # float32 keeps the matmuls


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("cascade", [True, False])
@pytest.mark.parametrize("capped", [False, True])
def test_half_precision_decoding_follows_the_oracle_on_either_cpu_kernel(family, cascade, capped,
                                                                        monkeypatch):
    """Teacher-forced bf16 decoding (autocast) over ragged shared prompts, rows leaving midway:
    each step's logits equal the float32 full forward's to bf16 accuracy, with the flash kernel
    (row part reserved once, read as a growing view; or, with the reservation capped below the
    steps, doubled when outgrown) and with the matmuls (buffer reallocated)."""
    from fastdpo.generation import decode_batch
    if capped:
        monkeypatch.setattr(decode_batch, "RESERVE_MAX", 8)
    m = tiny(family, seed=2)
    prompts, _ = grouped_prompts(seed=2)
    steps = 40
    forced = torch.randint(0, V, (len(prompts), steps), generator=torch.Generator().manual_seed(2))
    logits_by_kernel = {}
    for flash in (True, False):
        monkeypatch.setattr(decode_cache, "CPU_HALF_FLASH", flash)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            batch = DecodeBatch(m, prompts, cascade, max_steps=steps)
            buffers = {batch.caches[0].k.shape[2]}
            rows, got = list(range(len(prompts))), [batch.logits.clone()]
            for t in range(steps):
                if t == 25:                              # three rows finish; the batch compacts
                    rows = rows[3:]
                    batch.keep(list(range(3, len(prompts))))
                tok = forced[rows, t]
                got.append(batch.step(tok, torch.ones(len(rows), dtype=torch.bool)).clone())
                buffers.add(batch.caches[0].k.shape[2])
        assert batch.caches[0].reserved == flash
        sizes = sorted(buffers)
        if flash and capped:                              # outgrown: doubled, never 8 slots at a time
            assert len(sizes) > 1 and all(b == 2 * a for a, b in zip(sizes, sizes[1:])), sizes
        else:
            assert (len(sizes) == 1) == flash             # reserved: never reallocated
        logits_by_kernel[flash] = got
        # the oracle: a float32 full forward over each row's prompt and forced tokens
        for t, step_logits in list(enumerate(got))[::3]:
            live = list(range(len(prompts))) if t <= 25 else list(range(3, len(prompts)))
            for i, r in enumerate(live):
                seq = torch.tensor(prompts[r] + forced[r, :t].tolist())[None]
                with torch.no_grad():
                    want = m(seq)[0, -1].float()
                torch.testing.assert_close(step_logits[i].float(), want, rtol=0, atol=0.15,
                                           msg=f"step {t} row {r}")
    assert any(not torch.equal(a, b) for a, b in zip(*logits_by_kernel.values()))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_rows_that_already_form_the_query_grid_skip_the_scatter(family, monkeypatch):
    """K samples per prompt laid out prompt by prompt (the usual mining layout) are the query grid
    itself (no scatter into a zeroed grid); rows finishing unevenly turn it back into a scatter.
    Either way every step's logits and tokens equal the re-forward oracle's."""
    from fastdpo.generation import decode_batch
    from fastdpo.generation.decode_batch import _grid

    layouts = []

    def spy(groups, device):
        places, width = _grid(groups, device)
        layouts.append("grid" if places is None else "scatter")
        return places, width

    assert _grid([0, 0, 1, 1, 2, 2], "cpu") == (None, 2)
    assert _grid([0, 0, 1, 2, 2], "cpu")[0].tolist() == [0, 1, 2, 4, 5]       # group 1 is short
    assert _grid([0, 1, 0, 1], "cpu")[0].tolist() == [0, 2, 1, 3]             # interleaved
    m = tiny(family, seed=3)
    prompts, _ = grouped_prompts(seed=3)
    distinct = list(dict.fromkeys(map(tuple, prompts)))
    prompts = [list(p) for p in distinct for _ in range(3)]                   # 4 prompts x 3 rows
    # three rows end early, two of them in one group: after the compaction groups are uneven
    budgets = [40, 40, 40, 5, 40, 40, 5, 5, 40, 40, 40, 40]
    fast, slow = {}, {}
    monkeypatch.setattr(decode_batch, "_grid", spy)
    a = sample(m, prompts, 1.0, budgets, 20, None, seed=4, on_step=record(fast), cascade=True)
    assert layouts == ["grid", "scatter"]
    b = sample_reforward(m, prompts, 1.0, budgets, 20, None, seed=4, on_step=record(slow))
    assert a == b and [len(x) for x in a] == budgets
    assert fast.keys() == slow.keys()
    for step in fast:
        assert torch.equal(fast[step][0], slow[step][0]), step
        torch.testing.assert_close(fast[step][1], slow[step][1], rtol=0, atol=3e-5)


@pytest.mark.parametrize("cascade", [True, False])
def test_a_finished_row_near_block_size_stays_in_the_batch_without_moving(cascade):
    """A long prompt with a short budget (its last position at block_size - 1) finishes while the
    short prompts' rows go on; it stays in the batch (fewer than a quarter of rows done) and must
    not advance its position past block_size, as the server's batcher mixes such requests."""
    m = tiny("gpt")                                            # block_size 96
    g = torch.Generator().manual_seed(0)
    short, long_ = (torch.randint(0, V, (n,), generator=g).tolist() for n in (20, 90))
    prompts, budgets = [short] * 7 + [long_], [60] * 7 + [6]   # 20 + 60 and 90 + 6 fit in 96
    fast, slow = {}, {}
    a = sample(m, prompts, 1.0, budgets, 20, None, seed=1, cascade=cascade, on_step=record(fast))
    b = sample_reforward(m, prompts, 1.0, budgets, 20, None, seed=1, on_step=record(slow))
    assert a == b and [len(x) for x in a] == budgets
    for step in fast:
        torch.testing.assert_close(fast[step][1], slow[step][1], rtol=0, atol=3e-5)
