"""The ``vllm`` generation backend: ``vllm.LLM`` in this process, on the policy exported to a Hugging
Face directory (``fastdpo export --hf``; done on demand into a temporary directory unless
``generation.hf_dir`` names one).

Prompts go in as token ids (rendered with the policy's own template on fastdpo's side), one
``SamplingParams(n, temperature, top_k, seed, max_tokens)`` per distinct prompt and temperature
(greedy: n = 1, repeated), and the token ids come from the engine's outputs, with the end-of-turn
token vLLM keeps removed, as the built-in sampler leaves it out. The engine is created on first use
with ``gpu_memory_utilization`` of the GPU, so training can keep the rest; ``release()`` destroys
it (the online loop calls it before DPO trains) and ``reload(policy_dir)`` exports the new policy
for the next engine.

Needs the optional extra ``[vllm]`` and a CUDA device; without them the error says so.
"""
from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import torch

from fastdpo.errors import ConfigError
from fastdpo.generation.backends import (
    GenerationConfig,
    SamplerBackend,
    checkpoint_block_size,
    group_rows,
    row_seeds,
    strip_end,
)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise ConfigError("--sampler vllm needs the optional 'vllm' dependencies (the vllm package); "
                          "install them with: pip install 'fastdpo[vllm]'") from None
    if not cuda_available():
        raise ConfigError("--sampler vllm needs a CUDA GPU (none is visible here); use --sampler builtin, "
                          "or --sampler openai against a vLLM server on a GPU machine")
    return vllm


class VLLMSampler(SamplerBackend):
    name = "vllm"

    def __init__(self, config: GenerationConfig, ckpt: str | Path, tokenizer):
        from fastdpo.models.hf_import import is_hf_model_dir
        self.vllm = import_vllm()
        self.config, self.tokenizer = config, tokenizer
        self.policy = Path(ckpt)
        self.block_size = checkpoint_block_size(ckpt)
        if config.hf_dir:
            self.hf_dir: Path | None = Path(config.hf_dir)
        else:
            self.hf_dir = self.policy if is_hf_model_dir(self.policy) else None
        self._tmp: Path | None = None
        self._llm = None
        self.counts = {"engines": 0, "exports": 0, "reloads": 0}

    def describe(self) -> str:
        return f"vllm in-process on {self.hf_dir or self.policy}"

    def identity(self) -> str:
        return f"vllm:{self.policy.resolve()}"

    @property
    def stats(self) -> dict:
        return dict(self.counts)

    def _exported(self) -> Path:
        from fastdpo.models.hf_export import export_hf
        if self.hf_dir is not None and self.hf_dir.exists():
            self._check_export(self.hf_dir)
            return self.hf_dir
        if self.hf_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="fastdpo-vllm-"))
            self.hf_dir = self._tmp / "model"
        self.counts["exports"] += 1
        # merged: the engine serves the policy itself, not the base its LoRA adapter applies to
        return export_hf(self.policy, self.hf_dir, tokenizer=self.tokenizer, merge=True)

    def _check_export(self, d: Path) -> None:
        """An existing export must hold this policy's own weights: not the base of a LoRA export
        (its adapter beside it), not another checkpoint's."""
        import json

        from fastdpo.models.hf_export import ADAPTER_DIR, SOURCE_FILE
        source = json.loads((d / SOURCE_FILE).read_text()) if (d / SOURCE_FILE).is_file() else {}
        if (d / ADAPTER_DIR).is_dir() or source.get("weights") == "base":
            raise ConfigError(f"--sampler-hf-dir {d}: holds a base model and its LoRA adapter; vLLM would "
                              f"sample the base: export with --merge, or leave the option out")
        if source.get("checkpoint") not in (None, str(self.policy.resolve())):
            raise ConfigError(f"--sampler-hf-dir {d}: exported from {source['checkpoint']}, not from the "
                              f"policy {self.policy}; remove it or choose another directory")

    def engine(self):
        if self._llm is None:
            self._llm = self.vllm.LLM(model=str(self._exported()),
                                      gpu_memory_utilization=self.config.gpu_memory_utilization,
                                      dtype=self.config.dtype, max_model_len=self.block_size)
            self.counts["engines"] += 1
        return self._llm

    def sample(self, prompts, temperatures, max_new_tokens, top_k, eos_id, seed):
        seeds = row_seeds(seed, len(prompts))
        groups = group_rows(prompts, temperatures)
        params = [self.vllm.SamplingParams(n=n, temperature=t, top_k=top_k or -1, seed=seeds[rows[0]],
                                           max_tokens=max_new_tokens, stop_token_ids=[eos_id],
                                           detokenize=False)
                  for _, t, rows, n in groups]
        outputs = self.engine().generate([{"prompt_token_ids": list(p)} for p, _, _, _ in groups], params,
                                         use_tqdm=False)
        out: list = [None] * len(prompts)
        finish: list = [None] * len(prompts)
        for (_, _, rows, _), request in zip(groups, outputs):
            answers = request.outputs
            for j, r in enumerate(rows):
                c = answers[j % len(answers)]
                finish[r] = "stop" if c.finish_reason == "stop" else "length"
                out[r] = strip_end([int(t) for t in c.token_ids], finish[r], eos_id)
        return out, finish

    def release(self) -> None:
        if self._llm is None:
            return
        self._llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def reload(self, policy_dir) -> None:
        self.release()
        self.policy = Path(policy_dir)
        self._cleanup()
        self.hf_dir = None
        self.counts["reloads"] += 1

    def close(self) -> None:
        self.release()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
