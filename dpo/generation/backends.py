"""Generation backends: what samples the answers of ``pairs``, ``eval``, ``label`` and the online loop.

- ``builtin``: fastdpo's KV-cached ragged sampler (``generation.sampler.sample``) on the policy in
  this process;
- ``openai``: an OpenAI-compatible server serving the policy (``vllm serve <exported dir>``, or
  ``fastdpo serve``), through ``/v1/completions`` (``generation.openai_sampler``);
- ``vllm``: ``vllm.LLM`` in this process on the exported Hugging Face directory
  (``generation.vllm_sampler``).

Every backend takes prompts already rendered with the policy's own chat template (token ids, on
fastdpo's side, so sampling and training see the same template) and returns what ``sample`` returns
with ``return_finish=True``: per row the new token ids, the end-of-turn token excluded, and the
finish reason, ``"stop"`` (the turn ended) or ``"length"`` (ran out of ``max_new_tokens``). A row
whose token ids a server could not return, and whose text did not survive re-encoding, comes back
as ``None`` ids with finish ``"unverified"``: callers count it and never train on it.

``reload(policy_dir)`` makes the backend sample from a new policy (the online loop calls it after
each round's training); ``release()`` frees accelerator memory while training runs.
"""
from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdpo.errors import ConfigError

BACKENDS = ("builtin", "openai", "vllm")
TOKEN_ID_MODES = ("auto", "token_ids", "logprobs", "text")
RELOAD_MODES = ("none", "lora", "command")
UNVERIFIED = "unverified"


@dataclass
class GenerationConfig:
    """The ``generation`` section of a config, or the ``--sampler*`` flags."""
    backend: str = "builtin"                # builtin | openai | vllm
    url: str | None = None                  # openai: base URL, e.g. http://localhost:8000/v1
    model: str | None = None                # openai: the served model's name (default: the server's first)
    api_key: str | None = None              # openai: default $FASTDPO_SAMPLER_API_KEY (vLLM ignores it)
    concurrency: int = 8                    # openai: requests in flight
    prompts_per_request: int = 16           # openai: prompts in one /v1/completions request (x n <= 64)
    timeout: float = 600.0                  # openai: seconds per request
    max_retries: int = 3                    # openai: retries of a failed request (backoff, jitter)
    token_ids: str = "auto"                 # openai: how token ids come back (auto: what the server offers)
    reload: str = "none"                    # openai: how a new policy reaches the server: none|lora|command
    reload_command: str | None = None       # openai, reload=command: run with {policy} and {hf_dir} filled in
    hf_dir: str | None = None               # vllm: the exported model directory (default: exported on demand)
    gpu_memory_utilization: float = 0.5     # vllm: the engine's share of GPU memory (training keeps the rest)
    dtype: str = "auto"                     # vllm: weights' dtype in the engine

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"generation.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.token_ids not in TOKEN_ID_MODES:
            raise ConfigError(f"generation.token_ids must be one of {list(TOKEN_ID_MODES)}, "
                              f"got {self.token_ids!r}")
        if self.reload not in RELOAD_MODES:
            raise ConfigError(f"generation.reload must be one of {list(RELOAD_MODES)}, got {self.reload!r}")
        if self.reload == "command" and not self.reload_command:
            raise ConfigError("generation.reload: command needs generation.reload_command")
        if self.backend == "openai" and not self.url:
            raise ConfigError("generation.backend openai needs generation.url (--sampler-url), "
                              "e.g. http://localhost:8000/v1")
        if self.concurrency < 1 or self.prompts_per_request < 1 or self.max_retries < 0:
            raise ConfigError("generation.concurrency and prompts_per_request must be >= 1, max_retries >= 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"generation.gpu_memory_utilization must be in (0, 1], "
                              f"got {self.gpu_memory_utilization}")


class SamplerBackend(abc.ABC):
    """The interface every backend implements (see the module docstring)."""
    name = "backend"
    block_size: int                          # the policy's context: prompt + answer tokens

    @abc.abstractmethod
    def sample(self, prompts: Sequence[Sequence[int]], temperatures: float | Sequence[float],
               max_new_tokens: int, top_k: int | None, eos_id: int, seed: int | Sequence[int],
               ) -> tuple[list[list[int] | None], list[str]]:
        """Per row: new token ids (end of turn excluded; ``None`` if unverified) and finish reason.
        ``seed`` is one int for the call or one per row; the same seed gives the same answers
        wherever the engine itself is reproducible. ``top_k`` None or 0: no top-k cut."""

    @abc.abstractmethod
    def identity(self) -> str:
        """What a resumed run must sample from (part of the mining fingerprint)."""

    def describe(self) -> str:
        return self.name

    @abc.abstractmethod
    def reload(self, policy_dir: str | Path) -> None:
        """Sample from the policy in ``policy_dir`` from now on."""

    def release(self) -> None:
        """Free accelerator memory until the next ``sample`` (while DPO trains); by default there is
        nothing to free."""
        return None

    def close(self) -> None:
        self.release()

    @property
    def stats(self) -> dict:
        return {}


class BuiltinSampler(SamplerBackend):
    """The KV-cached sampler on a model in this process."""
    name = "builtin"

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None, device=None):
        self.model, self.dtype, self.device = model, dtype, device
        self.block_size = model.config.block_size
        self._fingerprint: str | None = None

    def sample(self, prompts, temperatures, max_new_tokens, top_k, eos_id, seed):
        from fastdpo.generation.sampler import sample
        with torch.inference_mode():
            return sample(self.model, prompts, temperatures, max_new_tokens, top_k, eos_id, seed,
                          dtype=self.dtype, return_finish=True)

    def identity(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def reload(self, policy_dir) -> None:
        from fastdpo.models.checkpoint import load_checkpoint
        device = self.device or next(self.model.parameters()).device
        self.model = load_checkpoint(policy_dir, map_location=device)[0].eval()
        self.block_size, self._fingerprint = self.model.config.block_size, None


def model_fingerprint(model: torch.nn.Module) -> str:
    # Per-tensor sums: cheap (no 500 MB hash for 124M) and different for any trained change.
    sums = [f"{n}:{p.detach().double().sum().item():.17g}" for n, p in model.named_parameters()]
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()[:16]


def as_backend(model_or_backend, dtype: torch.dtype | None = None) -> SamplerBackend:
    """A backend as is; a model becomes the built-in sampler on it."""
    if isinstance(model_or_backend, SamplerBackend):
        return model_or_backend
    return BuiltinSampler(model_or_backend, dtype)


def block_size_of(model_or_backend) -> int:
    if isinstance(model_or_backend, SamplerBackend):
        return model_or_backend.block_size
    return model_or_backend.config.block_size


def make_backend(config: GenerationConfig, ckpt: str | Path, tokenizer, *, device="cpu",
                 dtype: torch.dtype | None = None, model: torch.nn.Module | None = None) -> SamplerBackend:
    """The backend ``config`` names for the policy checkpoint ``ckpt`` (whose ``tokenizer`` renders
    the prompts). ``builtin`` loads the checkpoint unless ``model`` is given; ``openai`` reads only
    its config (the server holds the weights); ``vllm`` exports it for the engine when needed."""
    if config.backend == "builtin":
        if model is None:
            from fastdpo.models.checkpoint import load_checkpoint
            model = load_checkpoint(ckpt, tokenizer=tokenizer, map_location=device)[0].eval()
        return BuiltinSampler(model, dtype, device)
    if config.backend == "openai":
        from fastdpo.generation.openai_sampler import OpenAISampler
        return OpenAISampler(config, tokenizer, block_size=checkpoint_block_size(ckpt), policy=ckpt)
    from fastdpo.generation.vllm_sampler import VLLMSampler
    return VLLMSampler(config, ckpt, tokenizer)


def checkpoint_block_size(ckpt: str | Path) -> int | None:
    """The context length a checkpoint (fastdpo or Hugging Face) declares, without its weights."""
    from fastdpo.models.hf_import import is_hf_model_dir, read_hf_config
    if ckpt is None or not Path(ckpt).is_dir():
        return None
    if is_hf_model_dir(ckpt):
        from fastdpo.models.hf_config import config_from_hf
        return config_from_hf(read_hf_config(ckpt), Path(ckpt) / "config.json")[1].block_size
    from fastdpo.models.checkpoint import read_config
    return read_config(ckpt)["model"].get("block_size")


def row_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per row: the given ones, or derived from one int the way ``sample`` does."""
    if isinstance(seed, int):
        g = torch.Generator().manual_seed(int(seed))
        return torch.randint(0, 2**62, (n,), generator=g).tolist()
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed: expected one per row ({n}), got {len(seeds)}")
    return seeds


def group_rows(prompts: Sequence[Sequence[int]], temperatures: float | Sequence[float]
               ) -> list[tuple[tuple[int, ...], float, list[int], int]]:
    """Rows sharing a prompt and a temperature, as ``(prompt, temperature, rows, n)``: one prompt
    with ``n`` samples for an engine (``n`` is 1 for greedy rows, whose one answer is repeated)."""
    n_rows = len(prompts)
    temps = [float(temperatures)] * n_rows if isinstance(temperatures, (int, float)) \
        else [float(t) for t in temperatures]
    if len(temps) != n_rows:
        raise ValueError(f"temperatures: expected one per row ({n_rows}), got {len(temps)}")
    groups: dict[tuple, list[int]] = {}
    for i, (p, t) in enumerate(zip(prompts, temps)):
        groups.setdefault((tuple(int(x) for x in p), t), []).append(i)
    return [(p, t, rows, 1 if t == 0 else len(rows)) for (p, t), rows in groups.items()]


def strip_end(ids: list[int], finish: str, eos_id: int) -> list[int]:
    """Engines that keep the end-of-turn token in their output (vLLM does) -> ``sample``'s form."""
    if finish == "stop" and ids and ids[-1] == eos_id:
        return ids[:-1]
    return ids
