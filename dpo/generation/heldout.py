"""Held-out answers for the training health checks (``fastdpo.training.health``).

At step 0 and at each evaluation the trainer asks its ``HeldoutProbe`` for the model's answers to a
fixed set of held-out prompts (greedy by default, the same seeds every time); the monitor compares
their length and repetition with the reference model's answers and, when a judge is named, their
mean score. The probe lives here because sampling and judging belong to the generation room, which
training may not import; ``fastdpo train`` / ``fastdpo sft`` and the demo build it from the
config's ``health:`` section and pass it to ``run_dpo`` / ``run_sft``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastdpo.generation.evaluate import generate
from fastdpo.generation.judge import Judge, make_judge
from fastdpo.generation.mining import load_prompts
from fastdpo.training.config import HealthConfig


class HeldoutProbe:
    """``probe(model, tokenizer, default_prompts, dtype) -> {"answers": ids, "score": float | None}``
    (None when no prompt fits the model's context).

    ``prompts``: instructions (or a JSONL file of them); without them the trainer's default prompts
    (the val split's rendered prompts) are answered, and a judge reads their decoded text."""

    def __init__(self, prompts: str | Path | Sequence[str] | None = None, *, n_prompts: int = 32,
                 max_new_tokens: int = 64, temperature: float = 0.0, judge: Judge | None = None,
                 batch_size: int = 32, seed: int = 0):
        if isinstance(prompts, (str, Path)):
            prompts = load_prompts(prompts, n_prompts)
        self.instructions = list(prompts)[:n_prompts] if prompts is not None else None
        self.n_prompts, self.max_new_tokens, self.temperature = n_prompts, max_new_tokens, temperature
        self.judge, self.batch_size, self.seed = judge, batch_size, seed

    @classmethod
    def from_config(cls, cfg: HealthConfig | None) -> HeldoutProbe | None:
        """The probe a ``health:`` section asks for (None when it asks for none)."""
        if cfg is None or not cfg.enabled or cfg.n_prompts == 0:
            return None
        return cls(cfg.prompts, n_prompts=cfg.n_prompts, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, judge=make_judge(cfg.judge) if cfg.judge else None)

    def __call__(self, model, tokenizer, default_prompts: Sequence[Sequence[int]], dtype=None) -> dict:
        if self.instructions is not None:
            texts, rendered = self.instructions, [tokenizer.render_prompt(p) for p in self.instructions]
        else:
            rendered = [list(p) for p in default_prompts[:self.n_prompts]]
            texts = [tokenizer.decode(p, skip_special=True).strip() for p in rendered]
        # A small context shortens the answers rather than dropping every prompt; prompts that
        # leave no room at all are left out.
        block = model.config.block_size
        max_new = min(self.max_new_tokens, block - min(map(len, rendered), default=block))
        keep = [i for i, p in enumerate(rendered) if len(p) + max_new <= block]
        if max_new < 1 or not keep:
            return None
        texts, rendered = [texts[i] for i in keep], [rendered[i] for i in keep]
        answers = generate(model, tokenizer, rendered, temperature=self.temperature, max_new_tokens=max_new,
                           top_k=None, seed=self.seed, batch_size=self.batch_size, dtype=dtype)
        score = None
        if self.judge is not None:
            scores = self.judge.score_many([(t, tokenizer.decode(a)) for t, a in zip(texts, answers)])
            valid = [s for s in scores if s is not None]
            score = sum(valid) / len(valid) if valid else None
        return {"answers": answers, "score": score}
