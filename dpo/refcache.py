"""Reference log-probs computed once, in one no-grad pass, and cached on disk.

DPO's reference model is frozen, so its log-probs of every (prompt, answer) never change: computing
them once removes a forward pass per training step and the reference model from memory. The cache
key hashes what determines the numbers: the reference weights, the tokenized pairs (hence data,
tokenizer and truncation), the tokenizer's own hash, and the precision and kernel used. A β sweep
over the same data and reference therefore computes them once.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpo.data import TokenizedPair, collate_pairs, eval_batches


def model_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
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


@torch.no_grad()
def compute_reference_logprobs(model: torch.nn.Module, pairs: Sequence[TokenizedPair], *, pad_id: int,
                               batch_size: int, device: torch.device, logprob_fn, autocast_ctx,
                               progress: bool = True) -> torch.Tensor:
    """``(N, 2)`` float32: column 0 the chosen answers' summed log-probs, column 1 the rejected."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    out = torch.empty(len(pairs), 2, dtype=torch.float32)
    batches = eval_batches([p.length for p in pairs], batch_size)
    for idx in tqdm(batches, desc="reference log-probs", disable=not progress, leave=False):
        ids, mask = collate_pairs([pairs[i] for i in idx], pad_id)
        with autocast_ctx():
            lp = logprob_fn(model, ids.to(device), mask.to(device)).float().cpu()
        out[idx, 0], out[idx, 1] = lp[:len(idx)], lp[len(idx):]
    model.train(was_training)
    return out


def cached_reference_logprobs(model: torch.nn.Module, pairs: Sequence[TokenizedPair], *, cache_dir: Path,
                              tokenizer_hash: str, settings: str,
                              **compute_kwargs) -> tuple[torch.Tensor, Path, bool]:
    """Load ``(N, 2)`` reference log-probs from ``cache_dir`` or compute and store them.
    Returns ``(logps, cache file, hit)``."""
    key = hashlib.sha256("|".join([model_hash(model), pairs_hash(pairs), tokenizer_hash, settings])
                         .encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"ref-logps-{key}.safetensors"
    if path.is_file():
        try:
            logps = load_file(path)["logps"]
            if logps.shape == (len(pairs), 2):
                return logps, path, True
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
    logps = compute_reference_logprobs(model, pairs, **compute_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    save_file({"logps": logps}, tmp)
    os.replace(tmp, path)
    return logps, path, False
