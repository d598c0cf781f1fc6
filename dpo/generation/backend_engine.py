"""The online loop's generation through a backend (``generation.backends``): a server serving the
policy (``openai``) or in-process vLLM (``vllm``).

The loop asks an engine for four things: ``mine`` from the current policy, ``evaluate`` two
checkpoints, ``policy_changed`` when a round's policy is promoted, and ``load``. Here mining goes
through the backend, which is reloaded with each promoted policy (a LoRA adapter loaded into the
server, a restart command, or a fresh export for in-process vLLM) and released after mining, so
DPO trains with the GPU to itself. Evaluation compares a candidate that was never promoted with the
previous policy and the SFT model: it runs with the built-in sampler in this process, on
checkpoints the trainer loads anyway, instead of swapping three policies through the server.
"""
from __future__ import annotations

from pathlib import Path

from fastdpo.generation.backends import SamplerBackend


class BackendEngine:
    def __init__(self, backend: SamplerBackend, tokenizer, policy: str | Path, *, device="cpu", dtype=None,
                 tokenizer_path: str | Path | None = None):
        """``backend`` samples from ``policy`` now (it was made for it); ``tokenizer`` renders the
        prompts. ``device`` / ``dtype`` / ``tokenizer_path``: the built-in sampler's, for evaluation."""
        from fastdpo.runtime import resolve_device
        self.backend, self.tokenizer = backend, tokenizer
        self.policy = Path(policy).resolve()
        self.device, self.dtype, self.tokenizer_path = resolve_device(device), dtype, tokenizer_path
        self._models: dict[str, tuple] = {}
        self.reloads: list[str] = []

    def load(self, ckpt: str | Path):
        """``(model, tokenizer)`` in this process, for evaluation (cached while in use)."""
        from fastdpo.models.checkpoint import load_policy
        key = str(Path(ckpt).resolve())
        if key not in self._models:
            self._models[key] = load_policy(ckpt, self.tokenizer_path, self.device)
        return self._models[key]

    def policy_changed(self, ckpt: str | Path, keep=()) -> None:
        """The generating policy is now ``ckpt``: the backend is pointed at it (once per change)."""
        wanted = {str(Path(p).resolve()) for p in (ckpt, *keep)}
        self._models = {k: v for k, v in self._models.items() if k in wanted}
        self._sample_from(ckpt)

    def _sample_from(self, ckpt) -> None:
        ckpt = Path(ckpt).resolve()
        if ckpt != self.policy:
            self.backend.reload(ckpt)
            self.policy = ckpt
            self.reloads.append(str(ckpt))

    def mine(self, ckpt, prompts, judge, out_path, *, settings: dict, progress: bool):
        from fastdpo.generation.mining import mine_pairs
        self._sample_from(ckpt)
        try:
            return mine_pairs(self.backend, self.tokenizer, prompts, judge, out_path, dtype=self.dtype,
                              progress=progress, **settings)
        finally:
            self.backend.release()      # training comes next: the engine's GPU memory goes back

    def evaluate(self, ckpt_a, ckpt_b, prompts, judge, *, settings: dict, progress: bool,
                 names: tuple[str, str]) -> dict:
        from fastdpo.generation.evaluate import evaluate
        model_a, tok = self.load(ckpt_a)
        model_b, _ = self.load(ckpt_b)
        return evaluate(model_a, model_b, tok, prompts, judge, mode="both", dtype=self.dtype,
                        progress=progress, names=names, **settings)

    def close(self) -> None:
        self.backend.close()
