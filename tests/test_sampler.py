"""The KV-cached sampler against the re-forward oracle (float32, tiny models)."""
import pytest
import torch

from fastdpo.generation.sampler import choose_tokens, sample, sample_reforward
from fastdpo.models.gpt import GPT, GPTConfig, KVCache

V = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, block_size=64, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=V, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **kw)
    return GPT(cfg).eval()


def ragged_prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (length,), generator=g).tolist() for length in range(1, n + 1)]


def record(store):
    def hook(step, rows, logits):
        store[step] = (rows.clone(), logits.clone())
    return hook


def greedy_alone(model, prompt, steps, eos_id=None):
    """Independent check: one row, full forward, argmax; no padding, no batching."""
    ids = list(prompt)
    for _ in range(steps):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        if nxt == eos_id:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def test_cached_forward_equals_full_forward():
    m = tiny_model()
    ids = torch.randint(0, V, (3, 10))
    full = m(ids)
    caches = [KVCache(3, 16) for _ in range(2)]
    pre = m(ids[:, :6], kv_caches=caches)
    torch.testing.assert_close(pre, full[:, :6], rtol=0, atol=1e-5)
    for t in range(6, 10):
        pos = torch.full((3, 1), t)
        mask = (torch.arange(t + 1) <= pos)[:, None, None, :]
        step = m(ids[:, t:t + 1], pos=pos, kv_caches=caches, attn_mask=mask)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(None, 1.0), (10, 1.0), (20, 0.8)])
def test_every_step_logits_and_tokens_match_oracle(top_k, top_p):
    m = tiny_model()
    prompts = ragged_prompts(12)
    temps = [0.0, 0.7, 1.3, 1.0] * 3
    eos = 7
    fast, slow = {}, {}
    a = sample(m, prompts, temps, 24, top_k, eos, seed=5, top_p=top_p, on_step=record(fast))
    b = sample_reforward(m, prompts, temps, 24, top_k, eos, seed=5, top_p=top_p, on_step=record(slow))
    assert a == b
    assert fast.keys() == slow.keys() and len(fast) > 1
    for step in fast:
        assert torch.equal(fast[step][0], slow[step][0]), step
        torch.testing.assert_close(fast[step][1], slow[step][1], rtol=0, atol=2e-5)
    assert sum(map(len, a)) > 50  # the comparison covered many generated tokens


def test_greedy_matches_independent_single_row_decoding():
    m = tiny_model(1)
    prompts = ragged_prompts(9, seed=1)
    out = sample(m, prompts, [0.0] * 9, 15, top_k=None, eos_id=None)
    assert out == sample_reforward(m, prompts, [0.0] * 9, 15, top_k=None, eos_id=None)
    assert out == [greedy_alone(m, p, 15) for p in prompts]


def test_rows_hitting_eos_early_do_not_disturb_others():
    m = tiny_model(6)
    prompts = ragged_prompts(8, seed=6)
    # make eos a token that some greedy rows emit early, others late or never
    firsts = [greedy_alone(m, p, 3) for p in prompts]
    r = next(i for i, f in enumerate(firsts) if f[0] != f[1] and i % 2 == 0)  # a greedy row
    eos = firsts[r][1]
    temps = [0.0, 1.0] * 4
    seeds = list(range(100, 108))
    batch = sample(m, prompts, temps, 20, 8, eos, seeds)
    alone = [sample(m, [p], [t], 20, 8, eos, [s])[0] for p, t, s in zip(prompts, temps, seeds)]
    assert batch == alone
    assert batch[r] == firsts[r][:1]  # stopped at eos, which is excluded
    assert max(map(len, batch)) == 20 and min(map(len, batch)) < 5
    assert all(eos not in row for row in batch)


def test_finished_rows_are_dropped_from_the_batch():
    m = tiny_model(2)
    prompts = ragged_prompts(8, seed=2)
    sizes = []
    handle = m.transformer.wte.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        out = sample(m, prompts, [0.0] * 8, [1, 1, 1, 2, 2, 30, 30, 30], None, None)
    finally:
        handle.remove()
    assert [len(r) for r in out] == [1, 1, 1, 2, 2, 30, 30, 30]
    assert sizes[0] == 8  # the prefill
    assert sizes[-1] == 3 and len(sizes) == 30  # prefill + 29 decode steps, only live rows at the end


def test_identical_prompts_share_one_prefill_with_same_logits():
    m = tiny_model(3)
    p, q = ragged_prompts(9, seed=3)[7:9]
    prompts = [p, q, p, p, q, p]  # identical prompts, not only adjacent ones
    temps = [0.7, 0.9, 1.1, 1.3, 0.0, 0.5]
    seeds = [11, 12, 13, 14, 15, 16]
    prefill_rows = []
    handle = m.transformer.wte.register_forward_pre_hook(lambda mod, args: prefill_rows.append(args[0].shape))
    shared = {}
    try:
        out = sample(m, prompts, temps, 12, None, None, seeds, on_step=record(shared))
    finally:
        handle.remove()
    assert prefill_rows[0] == (2, len(q))  # two distinct prompts prefilled, not six
    for i, (prompt, t, s) in enumerate(zip(prompts, temps, seeds)):
        alone = {}
        assert sample(m, [prompt], [t], 12, None, None, [s], on_step=record(alone))[0] == out[i]
        for step in alone:
            torch.testing.assert_close(shared[step][1][i], alone[step][1][0], rtol=0, atol=1e-5)


def test_seed_makes_sampling_reproducible():
    m = tiny_model(4)
    prompts = ragged_prompts(6, seed=4)
    run = lambda seed: sample(m, prompts, [1.5] * 6, 16, None, None, seed)  # noqa: E731
    assert run(0) == run(0)
    assert run(0) != run(1)
    assert sample(m, prompts, [1.5] * 6, 16, None, None, 0, progress=True) == run(0)  # tqdm bar on


def test_choose_tokens_follows_the_top_k_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(40000, 1)
    temps = torch.full((40000,), 0.8)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    tok = choose_tokens(logits, temps, u, top_k=3)
    freq = torch.bincount(tok, minlength=6).float() / 40000
    expect = torch.softmax(logits[0, :3] / 0.8, -1)
    torch.testing.assert_close(freq[:3], expect, rtol=0, atol=0.01)
    assert freq[3:].sum() == 0
    # top-p: 0.6 of the mass is reached by the first token (p=0.63) alone
    assert (choose_tokens(logits, temps, u, top_k=None, top_p=0.6) == 0).all()
    # temperature 0 is greedy whatever the uniform
    assert (choose_tokens(logits, torch.zeros(40000), u, top_k=None) == 0).all()


def test_over_long_prompts_raise_or_truncate_left_when_asked():
    m = tiny_model(5, block_size=32)
    long = ragged_prompts(30, seed=5)[-1]
    msg = r"prompts\[1\]: 30 prompt tokens \+ max_new_tokens 8 exceed block_size 32"
    with pytest.raises(ValueError, match=msg):
        sample(m, [[1, 2], long], [0.0, 0.0], 8, None, None)
    with pytest.raises(ValueError, match="block_size"):
        sample_reforward(m, [long], [0.0], 8, None, None)
    cut = sample(m, [long], [0.0], 8, None, None, truncate="left")
    assert cut == sample(m, [long[-24:]], [0.0], 8, None, None)
    assert cut == sample_reforward(m, [long], [0.0], 8, None, None, truncate="left")


def test_bad_arguments_are_clear_errors():
    m = tiny_model()
    with pytest.raises(ValueError, match="one value per row"):
        sample(m, [[1], [2]], [0.5], 4)
    with pytest.raises(ValueError, match="empty"):
        sample(m, [[]], [0.5], 4)
    with pytest.raises(ValueError, match=r"temperatures\[0\]"):
        sample(m, [[1]], [-1.0], 4)
    with pytest.raises(ValueError, match="outside"):
        sample(m, [[V]], [0.5], 4)
    with pytest.raises(ValueError, match="top_p"):
        sample(m, [[1]], [0.5], 4, top_p=0.0)
    assert sample(m, [[1], [2]], [0.5, 0.5], 0) == [[], []]
    assert sample(m, [], [], 4) == []


def test_bf16_autocast_runs_and_stays_close():
    m = tiny_model(6)
    prompts = ragged_prompts(5, seed=6)
    f32, bf16 = {}, {}
    sample(m, prompts, [0.0] * 5, 4, None, None, on_step=record(f32))
    out = sample(m, prompts, [0.0] * 5, 4, None, None, dtype=torch.bfloat16, on_step=record(bf16))
    assert [len(r) for r in out] == [4] * 5
    torch.testing.assert_close(bf16[0][1], f32[0][1], rtol=0, atol=0.05)  # documented bf16 tolerance
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast is used ...
        inside = {}
        sample(m, prompts, [0.0] * 5, 4, None, None, on_step=record(inside))
        torch.testing.assert_close(inside[0][1], bf16[0][1], rtol=0, atol=1e-4)
        forced = {}  # ... unless a dtype is given
        sample(m, prompts, [0.0] * 5, 4, None, None, dtype=torch.float32, on_step=record(forced))
        torch.testing.assert_close(forced[0][1], f32[0][1], rtol=0, atol=1e-6)


def test_per_row_budgets_including_zero():
    m = tiny_model(7)
    prompts = ragged_prompts(4, seed=7)
    out = sample(m, prompts, [0.0, 0.9, 0.0, 1.2], [0, 3, 5, 1], None, None, seed=2)
    assert [len(r) for r in out] == [0, 3, 5, 1]
    assert out == sample_reforward(m, prompts, [0.0, 0.9, 0.0, 1.2], [0, 3, 5, 1], None, None, seed=2)




def test_finish_reason_says_whether_a_row_stopped_or_ran_out_of_budget():
    torch.manual_seed(3)
    m = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    free, _ = sample(m, prompts, 0.0, 6, None, None, return_finish=True)
    eos = free[0][2]   # the greedy 3rd token of row 0: with it as eos, row 0 stops there
    budgets = [6, 6, 1, 0]
    for fn in (sample, sample_reforward):
        toks, finish = fn(m, prompts, 0.0, budgets, None, eos, return_finish=True)
        assert toks == fn(m, prompts, 0.0, budgets, None, eos)
        for row, reason, b in zip(toks, finish, budgets):
            assert reason == ("length" if len(row) == b and eos not in row else "stop"), (row, reason, b)
        assert finish[0] == "stop" and toks[0] == free[0][:free[0].index(eos)]
        assert finish[3] == "length" and toks[3] == []


def test_on_token_sees_each_kept_token_and_can_end_a_row_on_it():
    """The hook gets exactly the tokens a row keeps (eos excluded) with the logits they were drawn
    from; a row it ends keeps that token and finishes 'stop'. Fast path and oracle agree."""
    m = tiny_model(11)
    prompts = ragged_prompts(5, seed=11)
    temps, budgets = [0.0, 1.0, 0.7, 1.3, 0.0], [9, 9, 4, 9, 9]
    free = sample(m, prompts, temps, budgets, None, None, seed=4)
    eos = free[4][5]
    halt_on = free[1][2]   # a token row 1 draws at step 2: rows that draw it end there

    def run(fn):
        seen: dict[int, list[int]] = {}
        logit_rows: dict[tuple[int, int], torch.Tensor] = {}

        def hook(step, rows, tokens, logits):
            assert rows.shape == tokens.shape and logits.shape == (len(rows), V)
            for r, t, lg in zip(rows.tolist(), tokens.tolist(), logits):
                seen.setdefault(r, []).append(t)
                logit_rows[(r, step)] = lg.clone()
            return tokens == halt_on

        toks, finish = fn(m, prompts, temps, budgets, None, eos, seed=4, on_token=hook, return_finish=True)
        return toks, finish, seen, logit_rows

    fast, slow = run(sample), run(sample_reforward)
    assert fast[0] == slow[0] and fast[1] == slow[1]
    toks, finish, seen, _ = fast
    for i, row in enumerate(toks):
        assert seen.get(i, []) == row               # every kept token, nothing else (no eos)
        expect = free[i][:budgets[i]]
        if eos in expect:
            expect = expect[:expect.index(eos)]
        if halt_on in expect:                        # ended on the halting token, which it keeps
            expect = expect[:expect.index(halt_on) + 1]
        assert row == expect
        ended = (row and row[-1] == halt_on) or len(row) < budgets[i]
        assert finish[i] == ("stop" if ended else "length")
    assert halt_on in toks[1] and finish[1] == "stop"
    for key, lg in fast[3].items():
        torch.testing.assert_close(lg, slow[3][key], rtol=1e-4, atol=1e-4)


def test_greedy_rows_take_the_first_of_tied_maxima_as_argmax_does():
    """Greedy rows read the argmax off the sorted candidates; ties (common in bf16 logits) must
    still resolve to the smallest index, as ``argmax`` and the oracle do."""
    logits = torch.tensor([[1.0, 3.0, 0.5, 3.0, 2.0], [4.0, 4.0, 4.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 5.0]])
    temps, u = torch.zeros(3), torch.rand(3)
    for top_k, top_p in ((3, 1.0), (4, 1.0), (None, 0.5), (None, 1.0)):
        chosen = choose_tokens(logits, temps, u, top_k, top_p)
        assert chosen.tolist() == logits.argmax(-1).tolist() == [1, 0, 4]
    # sampled rows beside greedy ones are untouched
    mixed = choose_tokens(logits, torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.5, 0.0, 0.5]), 3)
    assert mixed[0] == 1 and mixed[2] == 4 and mixed[1] in (0, 1, 2)
    # bf16 logits pick the same candidates; a NaN logit still gives a token of the vocabulary
    assert choose_tokens(logits.bfloat16(), temps, u, 3).tolist() == [1, 0, 4]
    broken = logits.clone()
    broken[0, 2] = float("nan")
    assert 0 <= int(choose_tokens(broken, temps, u, 3)[0]) < logits.shape[1]
