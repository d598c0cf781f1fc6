"""Answers for the labeling page from one or two checkpoints, with the KV sampler or a generation
backend (``generation.backends``: a server serving the checkpoint, in-process vLLM).

Each item is answered with a seed drawn from (seed, item id), so a restart regenerates exactly the
answers the page showed before. With one checkpoint, both answers come from it with two different
seeds (use a temperature above 0, or they are the same answer). Prompts too long for a model keep
their last tokens (``truncate='left'``); an answer that used its whole token budget is flagged.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import torch

from fastdpo.generation.backends import BuiltinSampler, GenerationConfig, make_backend
from fastdpo.generation.label.sources import Item


def _side(ckpt, tokenizer, device, dtype, generation: GenerationConfig | None):
    """(sampler, tokenizer) for one checkpoint."""
    from fastdpo.models.checkpoint import load_policy, load_tokenizer
    from fastdpo.models.tokenizer import open_tokenizer
    if generation is None or generation.backend == "builtin":
        model, tok = load_policy(ckpt, tokenizer, device)
        return BuiltinSampler(model, dtype, device), tok
    tok = open_tokenizer(tokenizer) if tokenizer else load_tokenizer(ckpt)
    return make_backend(generation, ckpt, tok, device=device, dtype=dtype), tok


class Answerer:
    """Generates an item's two answers; one generation at a time (the models are shared)."""

    def __init__(self, model_a: str | Path, model_b: str | Path | None = None, *, device="cpu",
                 tokenizer: str | Path | None = None, max_new_tokens: int = 128, temperature: float = 0.7,
                 top_k: int | None = 50, seed: int = 0, dtype: torch.dtype | None = None,
                 generation: GenerationConfig | None = None, generation_b: GenerationConfig | None = None):
        self.sides = [_side(model_a, tokenizer, device, dtype, generation)]
        self.sides.append(_side(model_b, tokenizer, device, dtype, generation_b or generation)
                          if model_b else self.sides[0])
        self.names = ("model-a", "model-b") if model_b else ("model-a", "model-a (another sample)")
        self.models = {"model-a": str(model_a), **({"model-b": str(model_b)} if model_b else {})}
        self.settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                         "seed": seed, "dtype": str(dtype)}
        self.max_new_tokens, self.temperature, self.top_k, self.seed, self.dtype = (
            max_new_tokens, temperature, top_k, seed, dtype)
        self._lock = threading.Lock()

    def _seed(self, iid: str, side: int) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.seed}:{iid}:{side}".encode()).digest()[:7], "little")

    def answer(self, item: Item) -> None:
        """Fill ``item.answers`` (and ``truncated``) unless already there."""
        with self._lock:
            if item.answers is not None:
                return
            texts, cut = [], []
            for side, (sampler, tok) in enumerate(self.sides):
                budget = min(self.max_new_tokens, sampler.block_size - 1)
                ids = tok.render_conversation(item.turns)[-(sampler.block_size - budget):]   # keep the end
                out, finish = sampler.sample([ids], self.temperature, budget, self.top_k, tok.eos_id,
                                             [self._seed(item.id, side)])
                texts.append(tok.decode(out[0] or []))
                cut.append(finish[0] == "length")
            item.answers, item.truncated = (texts[0], texts[1]), (cut[0], cut[1])
