"""Examples to training rows: tokenize once (chat template, length limits), hold out a validation
split, and batch: length-bucketed epochs that are a pure function of (seed, epoch), padded rows,
and the packed shared-prompt layout (prompt, chosen and rejected in one row).

A preference example becomes a ``TokenizedPair``: prompt ids (the rendered history ending in the
assistant marker) and the two answers as ``render_answer`` ids (text + end-of-turn). A mined pair
(``fastdpo pairs``) is trained on the token ids it was sampled as, when they belong to this
tokenizer (same hash); otherwise its text is encoded again (counted), and an answer that was cut
off (finish ``length``) is never closed with an end-of-turn it did not have.

Lengths (``answer_room``), the same in SFT and DPO, as TRL names them: ``max_length`` is prompt +
answer (each answer, in DPO; the model's context caps it too), ``max_prompt_length`` drops longer
prompts (never left-truncated), ``max_completion_length`` caps the answer; an answer is cut on the
right to fit, losing its end-of-turn token. Dropped examples and cut answers are counted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fastdpo.models.tokenizer import ChatTokenizer
from fastdpo.training.data import DataError, DataStats, PreferenceExample, SFTExample, load_examples
from fastdpo.training.pair_weights import pair_margin

# the row fields a pair's preference margin is read from (fastdpo.training.pair_weights)
MARGIN_FIELDS = ("weighted_margin", "dimensions", "score_chosen", "score_rejected")


@dataclass
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    # the row's MARGIN_FIELDS, when it has any: metadata, not part of what the pair is
    margin_fields: dict | None = field(default=None, compare=False, repr=False)

    @property
    def n_tokens(self) -> int:            # real (unpadded) tokens in the pair's two sequences
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def length(self) -> int:              # padded length of the pair's rows in a batch
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    @property
    def packed_length(self) -> int:       # its one row in a prompt-sharing batch
        return len(self.prompt) + len(self.chosen) + 1 + len(self.rejected)


@dataclass
class TokenizedSFT:
    prompt: list[int]
    response: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + len(self.response)

    length = n_tokens


def answer_room(prompt_len: int, max_length: int, max_prompt_length: int, block_size: int,
                max_completion_length: int | None = None) -> int:
    """How many answer tokens an example keeps after a prompt of ``prompt_len`` tokens; below 1
    the example is dropped (its prompt is longer than ``max_prompt_length``, or leaves no room in
    ``max_length`` / the model's context)."""
    if prompt_len > max_prompt_length:
        return 0
    room = min(max_length, block_size) - prompt_len
    return room if max_completion_length is None else min(room, max_completion_length)


def tokenize_pairs(examples: Sequence[PreferenceExample], tok: ChatTokenizer, max_length: int,
                   max_prompt_length: int, block_size: int, stats: DataStats,
                   max_completion_length: int | None = None) -> list[TokenizedPair]:
    """Prompt and answer ids (the sampled ones when they belong to ``tok``); drop over-long
    prompts; cut answers to fit (see the module docstring)."""
    out = []
    for ex in examples:
        prompt, chosen, rejected = _pair_ids(ex, tok, stats)
        room = answer_room(len(prompt), max_length, max_prompt_length, block_size, max_completion_length)
        if room < 1:
            stats.dropped_long_prompt += 1
            continue
        if len(chosen) > room or len(rejected) > room:
            if chosen[:room] == rejected[:room]:   # no preference left to learn: a wasted gradient
                stats.identical_after_cut += 1
                continue
            stats.truncated += 1
        fields = {k: ex.meta[k] for k in MARGIN_FIELDS if k in ex.meta}
        if fields:   # a malformed margin field fails here, where the row's file and line are known
            try:
                pair_margin(fields)
            except DataError as e:
                raise DataError(f"{ex.source}: {e}") from None
        out.append(TokenizedPair(prompt, chosen[:room], rejected[:room], fields or None))
    return out


def _pair_ids(ex: PreferenceExample, tok: ChatTokenizer, stats: DataStats):
    ids = ex.ids
    if ids is not None and ids.tokenizer_hash == tok.hash:
        prompt = ids.prompt if ids.prompt is not None else tok.render_conversation(ex.turns)
        bad = max((max(seq) for seq in (prompt, ids.chosen, ids.rejected)), default=0)
        if bad >= tok.vocab_size:
            raise DataError(f"{ex.source}: token id {bad} is outside the tokenizer's vocabulary "
                            f"({tok.vocab_size}) although 'tokenizer_hash' matches")
        stats.sampled_ids += 1
        return prompt, ids.chosen, ids.rejected
    if ids is not None:
        stats.retokenized += 1

    def answer(text: str, finish: str) -> list[int]:   # a cut-off answer stays open
        ids = tok.render_answer(text)
        return ids[:-1] if finish == "length" and ids[-1:] == [tok.eos_id] else ids

    return (tok.render_conversation(ex.turns), answer(ex.chosen, ex.finish[0]),
            answer(ex.rejected, ex.finish[1]))


def tokenize_sft(examples: Sequence[SFTExample], tok: ChatTokenizer, max_length: int, max_prompt_length: int,
                 block_size: int, stats: DataStats,
                 max_completion_length: int | None = None) -> list[TokenizedSFT]:
    """Prompt and answer ids; drop over-long prompts; cut answers to fit (see the module docstring)."""
    out = []
    for ex in examples:
        prompt = tok.render_conversation(ex.turns)
        room = answer_room(len(prompt), max_length, max_prompt_length, block_size, max_completion_length)
        if room < 1:
            stats.dropped_long_prompt += 1
            continue
        response = tok.render_answer(ex.response)
        if len(response) > room:
            stats.truncated += 1
        out.append(TokenizedSFT(prompt, response[:room]))
    return out


def split_val(items: list, val_size: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split: ``val_size`` < 1 is a fraction, otherwise a count."""
    if not val_size:
        return items, []
    n_val = int(val_size) if val_size >= 1 else max(1, round(len(items) * val_size))
    if n_val >= len(items):
        raise ValueError(f"val_size {val_size} leaves no training data ({len(items)} examples)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(items), generator=g).tolist()
    val_idx = set(perm[:n_val])
    return ([x for i, x in enumerate(items) if i not in val_idx],
            [x for i, x in enumerate(items) if i in val_idx])


# --------------------------------------------------------------------------- batching


def epoch_batches(lengths: Sequence[int], micro_batch_size: int, seed: int, epoch: int,
                  bucket: int = 64) -> list[list[int]]:
    """One epoch of length-bucketed micro-batches, a pure function of (seed, epoch).

    Shuffle, sort by length within windows of ``bucket`` micro-batches (so rows in a batch have
    similar lengths and little padding), then shuffle the batch order. Being a function of the
    epoch alone is what lets ``--resume`` restart mid-epoch from the step number.
    """
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    window = micro_batch_size * bucket
    batches = []
    for s in range(0, n, window):
        part = sorted(perm[s:s + window], key=lambda i: lengths[i])
        batches += [part[j:j + micro_batch_size] for j in range(0, len(part), micro_batch_size)]
    batches = [b for b in batches if len(b) == micro_batch_size]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def eval_batches(lengths: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Every example once, sorted by length (least padding); the last batch may be short."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[j:j + micro_batch_size] for j in range(0, len(order), micro_batch_size)]


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one length, in ONE (2B, T) batch so the
    policy runs a single forward per micro-batch. ``mask`` is 1 on answer tokens."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    return _collate(rows, pad_id)


@dataclass
class PackedPairs:
    ids: torch.Tensor          # (B, T) prompt | chosen | copy of the prompt's last token | rejected | pad
    pos: torch.Tensor          # (B, T) positions: the rejected branch restarts where the prompt ends
    attn_mask: torch.Tensor    # (B, 1, T, T) bool: causal, and neither answer sees the other
    chosen_mask: torch.Tensor  # (B, T) bool, 1 on chosen-answer tokens
    rejected_mask: torch.Tensor

    def to(self, device) -> PackedPairs:
        return PackedPairs(*(t.to(device) for t in (self.ids, self.pos, self.attn_mask, self.chosen_mask,
                                                     self.rejected_mask)))


def collate_packed_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> PackedPairs:
    """Each pair as ONE row whose prompt is computed once for both answers.

    Row: ``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected``. The chosen branch sees the
    shared prompt and itself; the rejected branch sees ``prompt[:-1]``, a copy of the prompt's last
    token at that token's position, and itself. Every token therefore has exactly the context and
    position it has in the separate ``prompt + answer`` row, so the log-probs are the same (up to
    float rounding) while the prompt's tokens are run once instead of twice. The copy is needed
    because the prompt's last position predicts the first token of *each* answer."""
    rows = []
    for p in pairs:
        P, C, R = len(p.prompt), len(p.chosen), len(p.rejected)
        seq = p.prompt + p.chosen + p.prompt[-1:] + p.rejected
        pos = [*range(P + C), P - 1, *range(P, P + R)]
        # segment of each token: 0 shared prompt, 1 chosen branch, 2 rejected branch
        seg = [0] * (P - 1) + [1] * (C + 1) + [2] * (R + 1)
        rows.append((seq, pos, seg, P, C, R))
    B, T = len(rows), max(len(r[0]) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), 3, dtype=torch.long)      # padding: its own segment
    chosen = torch.zeros(B, T, dtype=torch.bool)
    rejected = torch.zeros(B, T, dtype=torch.bool)
    for i, (s, ps, sg, P, C, _) in enumerate(rows):
        n = len(s)
        ids[i, :n], pos[i, :n], seg[i, :n] = torch.tensor(s), torch.tensor(ps), torch.tensor(sg)
        chosen[i, P:P + C] = True
        rejected[i, P + C + 1:n] = True
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    return PackedPairs(ids, pos, (causal & visible).unsqueeze(1), chosen, rejected)


def collate_sft(items: Sequence[TokenizedSFT], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _collate([(x.prompt, x.response) for x in items], pad_id)


def _collate(rows, pad_id):
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        mask[i, len(p):n] = True
    return ids, mask


def _load(kind: str, tokenize, cfg, tok: ChatTokenizer, max_length: int, max_prompt_length: int,
          block_size: int, seed: int, max_completion_length: int | None):
    stats = DataStats()
    examples = load_examples(cfg.paths, cfg.format, cfg.on_error, kind, cfg.max_rows, stats)
    items = tokenize(examples, tok, max_length, max_prompt_length, block_size, stats, max_completion_length)
    if not items:
        raise DataError(f"every example was dropped ({stats.summary()}); raise max_prompt_length "
                        f"or max_length?")
    train, val = split_val(items, cfg.val_size, seed)
    return train, val, stats


def load_preference_data(cfg, tok: ChatTokenizer, max_length: int, max_prompt_length: int, block_size: int,
                         seed: int, max_completion_length: int | None = None
                         ) -> tuple[list[TokenizedPair], list[TokenizedPair], DataStats]:
    """``PreferenceDatasetConfig`` -> (train pairs, val pairs, stats)."""
    return _load("preference", tokenize_pairs, cfg, tok, max_length, max_prompt_length, block_size, seed,
                 max_completion_length)


def load_sft_data(cfg, tok: ChatTokenizer, max_length: int, max_prompt_length: int, block_size: int,
                  seed: int, max_completion_length: int | None = None
                  ) -> tuple[list[TokenizedSFT], list[TokenizedSFT], DataStats]:
    """``SFTDatasetConfig`` -> (train examples, val examples, stats)."""
    return _load("sft", tokenize_sft, cfg, tok, max_length, max_prompt_length, block_size, seed,
                 max_completion_length)
