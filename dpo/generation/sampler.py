"""Batched sampling of ragged prompts: the KV-cached fast path and the slow re-forward oracle.

``sample`` prefills every *distinct* prompt once (identical prompts anywhere in the batch share one
prefill), then decodes one token per row per step (``fastdpo.generation.decode_batch``). The rows
of one prompt read that prompt's keys/values once per step (shared-prefix, "cascade" attention)
instead of each reading its own copy. Each row has its own position, its own temperature and its
own token budget; rows stop independently at ``eos_id`` and finished rows are dropped from the
batch so late steps cost less. Off the CPU the loop reads nothing on the host per token (see
``CHECK_EVERY``).

``sample_reforward`` has the same signature and re-runs the full forward over the whole padded
batch every step. It is the oracle ``sample`` is tested against.

Randomness: each row gets its own random stream, drawn up front from its own ``torch.Generator``,
one uniform number per generated token. A token is chosen by inverse-CDF sampling with that number,
so the choice depends only on (row seed, step, logits): the fast path and the oracle pick the same
tokens whenever their logits agree, and a row's sample does not depend on which other rows share its
batch or when they finish. Temperature 0 means greedy (argmax) for that row.
"""
from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fastdpo.generation.decode_batch import DecodeBatch, use_cascade

# Called as on_step(step, rows, logits) before each token is drawn: ``rows`` are the original row
# indices still generating, ``logits`` their float32 next-token logits. For tests and diagnostics.
StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]
# Called as on_token(step, rows, tokens, logits) after each step's tokens are drawn, with the rows
# that appended a token (original indices; a row that drew eos is not among them), those tokens and
# the float32 logits they were drawn from. It may return a bool tensor, one per row given: True ends
# that row now, keeping its token, with finish reason "stop" (how the server ends an answer at a
# stop string). Streaming and log-probs read the tokens and logits here.
TokenHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


# -- input checking -----------------------------------------------------------------------------
def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, numbers.Real):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name}: expected one value per row ({n}), got {len(value)}")
    return value


def _prepare(model: torch.nn.Module, prompts, temperatures, max_new_tokens, top_k, top_p, truncate):
    """Validate the request; return (prompts as lists, temps, per-row token budgets)."""
    cfg = model.config
    prompts = [list(map(int, p)) for p in prompts]
    n = len(prompts)
    temps = _per_row(temperatures, n, "temperatures")
    budgets = _per_row(max_new_tokens, n, "max_new_tokens")
    for i, t in enumerate(temps):
        if not t >= 0:  # also catches NaN
            raise ValueError(f"temperatures[{i}] = {t}: must be >= 0 (0 = greedy)")
    for i, m in enumerate(budgets):
        if int(m) != m or m < 0:
            raise ValueError(f"max_new_tokens[{i}] = {m}: must be a non-negative integer")
        if m >= cfg.block_size:
            raise ValueError(f"max_new_tokens[{i}] = {m} leaves no room for a prompt in "
                             f"block_size {cfg.block_size}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k = {top_k}: must be >= 0 (0 or None = no top-k cut)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p = {top_p}: must be in (0, 1]")
    if truncate not in (None, "left"):
        raise ValueError(f"truncate = {truncate!r}: must be None (error) or 'left'")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{i}] is empty: a row needs at least one prompt token")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompts[{i}] has a token id outside [0, {cfg.vocab_size})")
        room = cfg.block_size - budgets[i]
        if len(p) > room:
            if truncate is None:
                raise ValueError(
                    f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens {budgets[i]} exceed "
                    f"block_size {cfg.block_size}; shorten the prompt, lower max_new_tokens, or pass "
                    f"truncate='left' to keep only the last {room} prompt tokens")
            prompts[i] = p[-room:]
    return prompts, [float(t) for t in temps], [int(m) for m in budgets]


def _row_uniforms(seed, n: int, steps: int) -> torch.Tensor:
    """(n, steps) uniforms on the CPU, row i from its own generator (see the module docstring).
    ``seed`` is an int (row seeds are derived from it) or one int per row."""
    if isinstance(seed, numbers.Integral):
        g = torch.Generator().manual_seed(int(seed))
        seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
    else:
        seeds = [int(s) for s in _per_row(seed, n, "seed")]
    out = torch.empty(n, steps)
    for i, s in enumerate(seeds):  # once per call, not per step
        out[i] = torch.rand(steps, generator=torch.Generator().manual_seed(s))
    return out


def _precision(model: torch.nn.Module, dtype: torch.dtype | None):
    """None: the caller's precision (their autocast, if any). Otherwise autocast to ``dtype`` (e.g.
    torch.bfloat16, ~2x faster on AVX512-BF16 CPUs), or, for the weights' own dtype, no autocast."""
    param = next(model.parameters())
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == param.dtype:
        return torch.autocast(param.device.type, enabled=False)
    return torch.autocast(param.device.type, dtype=dtype)


def _no_grad(fn):
    """``torch.no_grad`` and explicitly *not* inference mode (even inside a caller's): under
    inference mode autocast re-casts every weight on every call, since its weight-cast cache is
    bypassed there, which made bf16 sampling ~2x slower per matmul."""
    return torch.inference_mode(False)(torch.no_grad()(fn))


# -- token choice (shared by both paths, so equal logits give equal tokens) -------------------------
def choose_tokens(logits: torch.Tensor, temps: torch.Tensor, u: torch.Tensor, top_k: int | None,
                  top_p: float = 1.0) -> torch.Tensor:
    """Next token per row from ``logits`` (B, V), temperatures (B,) and uniforms (B,).

    Inverse-CDF sampling over the top-k (then top-p) candidates; rows with temperature 0 take the
    argmax. The candidates are chosen in the logits' dtype and weighed in float32 (a bf16 value is
    exact in float32, so the choice equals that from float32 logits of the same values)."""
    V = logits.shape[-1]
    if top_k and top_k < V:
        vals, idx = logits.topk(top_k, dim=-1)  # sorted, largest first
    elif top_p < 1.0:
        vals, idx = logits.sort(dim=-1, descending=True)
    else:
        vals, idx = logits, None
    vals = vals.float()
    probs = torch.softmax(vals / temps.clamp_min(1e-6)[:, None], dim=-1)
    if top_p < 1.0:  # keep the smallest prefix of the sorted candidates holding top_p of the mass
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(vals.shape[-1] - 1)
    if idx is None:
        return torch.where(temps == 0, logits.argmax(-1), choice.squeeze(-1))
    # greedy rows: the candidates are sorted, so the argmax is among those equal to the first; the
    # smallest such index is ``argmax``'s answer (unless more than top_k logits tie at the top) at
    # the cost of a (B, k) reduction instead of another pass over the vocabulary (a NaN first
    # candidate equals nothing: then the first candidate, a valid token, as argmax gives one)
    first = idx[:, :1]
    greedy = torch.where(vals == vals[:, :1], idx, first).amin(-1)
    return torch.where(temps == 0, greedy, idx.gather(-1, choice).squeeze(-1))


# -- the fast path --------------------------------------------------------------------------------
# Off the CPU, reading a device value on the host waits for the device. There the loop reads the
# rows' live flags once every CHECK_EVERY steps (to stop, or to drop finished rows), never per token,
# and keeps the batch a multiple of ROW_BUCKET rows (fewer shapes for CUDA graphs / torch.compile).
CHECK_EVERY = 16
ROW_BUCKET = 8


def host_reads_are_free(device: torch.device) -> bool:
    """Whether the sampler may read device values every step (the CPU: it costs nothing there)."""
    return device.type == "cpu"


def _rows_to_keep(live: list[bool], bucket: int) -> list[int]:
    """The live rows, topped up with finished ones to a multiple of ``bucket`` (at most all rows)."""
    keep = [i for i, a in enumerate(live) if a]
    size = min(len(live), -(-len(keep) // bucket) * bucket)
    keep += [i for i, a in enumerate(live) if not a][: size - len(keep)]
    return sorted(keep)


@_no_grad
def sample(model: torch.nn.Module, prompts: Sequence[Sequence[int]], temperatures, max_new_tokens,
           top_k: int | None = 50, eos_id: int | None = None, seed=0, *, top_p: float = 1.0,
           dtype: torch.dtype | None = None, truncate: str | None = None, progress: bool = False,
           on_step: StepHook | None = None, on_token: TokenHook | None = None, return_finish: bool = False,
           cascade: bool | None = None):
    """Sample a continuation for every row; returns the new token ids per row (eos excluded), and
    with ``return_finish`` also each row's finish reason: ``"stop"`` (it emitted ``eos_id``) or
    ``"length"`` (it used its whole budget without one: a truncated answer).

    prompts: ragged token-id lists, one per row. Identical prompts share one prefill.
    temperatures: one per row (or one for all); 0 = greedy.
    max_new_tokens: an int, or one per row. A row stops at ``eos_id`` or at its budget.
    top_k: keep the k most likely tokens (None/0 = all); top_p: nucleus cut after top-k.
    seed: int, or one int per row (a row's sample then depends only on its seed and prompt).
    dtype: autocast dtype for the forward (e.g. torch.bfloat16); logits are sampled in float32.
    truncate: None raises if a prompt plus its budget exceeds block_size; 'left' keeps the last
        ``block_size - max_new_tokens`` prompt tokens (drops the oldest).
    on_step / on_token: hooks before and after each step's tokens are drawn (see their types);
        they read the rows on the host every step.
    cascade: the rows of one prompt read its keys/values once per step (shared-prefix attention)
        instead of each reading a copy; None = when some prompt has several rows and prompts are
        not very short (``fastdpo.generation.decode_batch.use_cascade``). Same tokens either way.
    """
    prompts, temps_l, budgets_l = _prepare(model, prompts, temperatures, max_new_tokens, top_k, top_p,
                                           truncate)
    n, steps = len(prompts), max(budgets_l, default=0)
    if n == 0 or steps == 0:
        return _result([[] for _ in range(n)], [False] * n, return_finish)
    device = next(model.parameters()).device
    uniforms = _row_uniforms(seed, n, steps).to(device)
    temps = torch.tensor(temps_l, device=device)
    budgets = torch.tensor(budgets_l, device=device)
    tokens = torch.zeros(n, steps, dtype=torch.long, device=device)  # generated ids, by original row
    n_new = torch.zeros(n, dtype=torch.long, device=device)  # how many of them a row keeps
    stopped = torch.zeros(n, dtype=torch.bool, device=device)  # ended at eos or by on_token
    every, bucket = (1, 1) if host_reads_are_free(device) else (CHECK_EVERY, ROW_BUCKET)

    with _precision(model, dtype):
        batch = DecodeBatch(model, prompts, use_cascade(prompts, cascade), steps)
        logits = batch.logits
        rows = torch.arange(n, device=device)  # original index of each batch row
        live = budgets > 0  # finished rows linger in the batch until the next compaction
        bar = _progress_bar(steps, progress)
        for step in range(steps):
            if on_step is not None:
                on_step(step, rows[live], logits[live].float())
            tok = choose_tokens(logits, temps[rows], uniforms[rows, step], top_k, top_p)
            tokens[rows, step] = tok  # past a row's count for finished rows: ignored
            stop = live & (tok == eos_id) if eos_id is not None else torch.zeros_like(live)
            kept = live & ~stop
            n_new[rows] += kept
            halt = _halted(on_token, step, rows, kept, tok, logits)
            if halt is not None:
                stop = stop | halt
            stopped[rows] |= stop
            live = kept & ~stop & (n_new[rows] < budgets[rows])
            if bar is not None:
                bar.update(1)
            if step + 1 == steps:
                break
            if (step + 1) % every == 0:  # the only host read of the loop
                flags = live.tolist()
                n_live = sum(flags)
                if bar is not None:
                    bar.set_postfix(rows=n_live)
                if n_live == 0:
                    break
                if (len(flags) - n_live) * 4 >= len(flags):  # drop rows once a quarter are done
                    keep = _rows_to_keep(flags, bucket)
                    if len(keep) < len(flags):
                        idx = batch.keep(keep)
                        rows, tok, live = rows[idx], tok[idx], live[idx]
            logits = batch.step(tok, live)
        if bar is not None:
            bar.close()
    counts = n_new.tolist()
    return _result([row[:c] for row, c in zip(tokens.tolist(), counts)], stopped.tolist(), return_finish)


def _halted(on_token: TokenHook | None, step: int, rows, kept, tok, logits) -> torch.Tensor | None:
    """The rows ``on_token`` ends now, as a mask over the batch (None: no hook, or it ended none)."""
    if on_token is None:
        return None
    halt = on_token(step, rows[kept], tok[kept], logits[kept].float())
    if halt is None:
        return None
    extra = torch.zeros_like(kept)
    extra[kept] = halt.to(device=kept.device, dtype=torch.bool)
    return extra


def _result(tokens: list[list[int]], stopped: list[bool], return_finish: bool):
    if not return_finish:
        return tokens
    return tokens, ["stop" if e else "length" for e in stopped]


def _progress_bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)


# -- the oracle -----------------------------------------------------------------------------------
def _pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, device=device)
    return ids, lens


@_no_grad
def sample_reforward(model: torch.nn.Module, prompts: Sequence[Sequence[int]], temperatures, max_new_tokens,
                     top_k: int | None = 50, eos_id: int | None = None, seed=0, *, top_p: float = 1.0,
                     dtype: torch.dtype | None = None, truncate: str | None = None,
                     progress: bool = False, on_step: StepHook | None = None,
                     on_token: TokenHook | None = None, return_finish: bool = False):
    """Same contract as ``sample``, but every step re-runs the full forward over the whole
    right-padded batch (no cache, no prefix sharing, no row dropping). Slow on purpose."""
    prompts, temps_l, budgets_l = _prepare(model, prompts, temperatures, max_new_tokens, top_k, top_p,
                                           truncate)
    n, steps = len(prompts), max(budgets_l, default=0)
    if n == 0 or steps == 0:
        return _result([[] for _ in range(n)], [False] * n, return_finish)
    device = next(model.parameters()).device
    uniforms = _row_uniforms(seed, n, steps).to(device)
    temps = torch.tensor(temps_l, device=device)
    budgets = torch.tensor(budgets_l, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    ids, lens = _pad(prompts, device)
    ids = F.pad(ids, (0, steps))
    cur = lens.clone()  # next write position per row
    live = budgets > 0
    rows = torch.arange(n, device=device)
    bar = _progress_bar(steps, progress)
    with _precision(model, dtype):
        for step in range(steps):
            # Full forward over every position; only the lm_head is limited to the rows' last
            # tokens (the seed's full (B, T, V) logits would not fit in memory at 124M scale).
            h = model.hidden_states(ids[:, : int(cur.max())])
            # the forward's dtype, as the fast path's: both pick candidates with the same top-k
            logits = F.linear(h[rows, cur - 1], model.lm_head_weight)
            if on_step is not None:
                on_step(step, rows[live], logits[live].float())
            tok = choose_tokens(logits, temps, uniforms[:, step], top_k, top_p)
            stop = live & (tok == eos_id) if eos_id is not None else torch.zeros_like(live)
            keep = live & ~stop
            ids[rows[keep], cur[keep]] = tok[keep]
            cur = torch.where(keep, cur + 1, cur)
            halt = _halted(on_token, step, rows, keep, tok, logits)
            if halt is not None:
                stop = stop | halt
            stopped |= stop
            live = keep & ~stop & (cur - lens < budgets)
            if bar is not None:
                bar.update(1)
            if not live.any():
                break
    if bar is not None:
        bar.close()
    return _result([ids[i, lens[i]: cur[i]].tolist() for i in range(n)], stopped.tolist(), return_finish)
