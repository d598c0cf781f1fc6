"""Answers for the labeling page from one or two checkpoints, with the KV sampler.

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

from fastdpo.generation.label.sources import Item


class Answerer:
    """Generates an item's two answers; one generation at a time (the models are shared)."""

    def __init__(self, model_a: str | Path, model_b: str | Path | None = None, *, device="cpu",
                 tokenizer: str | Path | None = None, max_new_tokens: int = 128, temperature: float = 0.7,
                 top_k: int | None = 50, seed: int = 0, dtype: torch.dtype | None = None):
        from fastdpo.models.checkpoint import load_policy
        self.sides = [load_policy(model_a, tokenizer, device)]
        self.sides.append(load_policy(model_b, tokenizer, device) if model_b else self.sides[0])
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
        from fastdpo.generation.sampler import sample
        with self._lock:
            if item.answers is not None:
                return
            texts, cut = [], []
            for side, (model, tok) in enumerate(self.sides):
                budget = min(self.max_new_tokens, model.config.block_size - 1)
                ids = tok.render_conversation(item.turns)
                out, finish = sample(model, [ids], self.temperature, budget, self.top_k, tok.eos_id,
                                     [self._seed(item.id, side)], dtype=self.dtype, truncate="left",
                                     return_finish=True)
                texts.append(tok.decode(out[0]))
                cut.append(finish[0] == "length")
            item.answers, item.truncated = (texts[0], texts[1]), (cut[0], cut[1])
