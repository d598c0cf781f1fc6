"""Reference log-probs computed once, in one no-grad pass, and cached on disk.

DPO's reference model is frozen, so its log-probs of every (prompt, answer) never change: computing
them once removes a forward pass per training step and the reference model from memory. The cache
key hashes what determines the numbers: the reference weights and architecture (its config: the same
weights under another ``n_head`` are another function), the tokenized pairs (hence data, tokenizer
and truncation), the tokenizer's own hash, and the settings the caller passes (precision, kernel,
resolved backend, device type, batch layout). A β sweep
over the same data and reference therefore computes them once. A LoRA run's reference is its base
(adapters off), which hashes as the base alone: it shares the cache of a full fine-tune of that base.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastdpo import runtime
from fastdpo.files import atomic_write
from fastdpo.models.lora import function_state_dict
from fastdpo.training.batches import TokenizedPair, eval_batches


def model_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, t in function_state_dict(model).items():   # LoRA adapters switched off are not part of it
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def pairs_hash(pairs: Sequence[TokenizedPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        for seq in (p.prompt, p.chosen, p.rejected):
            h.update(len(seq).to_bytes(4, "little"))
            h.update(b"".join(i.to_bytes(4, "little") for i in seq))
    return h.hexdigest()[:20]


def cache_key(model: torch.nn.Module, pairs: Sequence[TokenizedPair], tokenizer_hash: str,
              settings: str) -> str:
    return hashlib.sha256("|".join([model_hash(model), pairs_hash(pairs), tokenizer_hash, settings])
                          .encode()).hexdigest()[:24]


@torch.no_grad()
def compute_reference_logprobs(model: torch.nn.Module, pairs: Sequence[TokenizedPair], *, batch_size: int,
                               pair_logprobs_fn, autocast_ctx, progress: bool = True) -> torch.Tensor:
    """``(N, 2)`` float32: column 0 the chosen answers' summed log-probs, column 1 the rejected.
    ``pair_logprobs_fn(model, pairs) -> (chosen (B,), rejected (B,))`` is the trainer's own.
    Under torchrun each rank computes a share of the batches and every rank gets all rows."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    out = torch.empty(len(pairs), 2, dtype=torch.float32)
    batches = runtime.shard(eval_batches([p.length for p in pairs], batch_size))
    rows = [i for idx in batches for i in idx]
    done = []   # kept on the device: one copy to the host at the end, not a wait per batch
    for idx in tqdm(batches, desc="reference log-probs", disable=not progress, leave=False):
        with autocast_ctx():
            chosen, rejected = pair_logprobs_fn(model, [pairs[i] for i in idx])
        done.append(torch.stack([chosen.float(), rejected.float()], 1))
    if done:
        out[rows] = torch.cat(done).cpu()
    model.train(was_training)
    return runtime.gather_rows(out, rows)


def cache_file(model: torch.nn.Module, pairs: Sequence[TokenizedPair], cache_dir: Path, tokenizer_hash: str,
               settings: str) -> Path:
    """Where these pairs' reference log-probs are (or will be) cached."""
    return Path(cache_dir) / f"ref-logps-{cache_key(model, pairs, tokenizer_hash, settings)}.safetensors"


def cached_reference_logprobs(model: torch.nn.Module, pairs: Sequence[TokenizedPair], *, cache_dir: Path,
                              tokenizer_hash: str, settings: str, path: Path | None = None,
                              **compute_kwargs) -> tuple[torch.Tensor, Path, bool]:
    """Load ``(N, 2)`` reference log-probs from ``cache_dir`` or compute and store them
    (``path``: the ``cache_file`` when the caller already knows it). Returns ``(logps, cache
    file, hit)``."""
    path = path or cache_file(model, pairs, cache_dir, tokenizer_hash, settings)
    logps = None
    if path.is_file():
        try:
            logps = load_file(path)["logps"]
            if logps.shape != (len(pairs), 2):
                logps = None
        except Exception:  # a damaged cache file is recomputed, never trusted
            logps = None
    if runtime.all_ranks(logps is not None):   # ranks compute together or not at all
        return logps, path, True
    logps = compute_reference_logprobs(model, pairs, **compute_kwargs)
    if runtime.is_main():
        atomic_write(path, lambda tmp: save_file({"logps": logps}, tmp))
    runtime.barrier()
    return logps, path, False
