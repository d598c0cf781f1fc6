"""The policy across ranks: DDP replicas or FSDP2 shards, and checkpoints gathered into the
single-process format (see ``fastdpo.runtime`` for how a step's batch is split)."""
from __future__ import annotations

import contextlib

import torch

from fastdpo.runtime import is_main
from fastdpo.training.logprobs import PolicyForward

PARALLEL_MODES = ("ddp", "fsdp")


def parallelize(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """Wrap ``model`` (any model family) for multi-process training; returns the module to run forwards on.

    ``ddp``: every rank holds the whole model, gradients are all-reduced (averaged) in buckets
    during backward. ``fsdp``: FSDP2 shards parameters, gradients and optimizer state over the
    ranks; each block is gathered just before it runs. Parameters of ``model`` become DTensors,
    so build the optimizer after this call."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {list(PARALLEL_MODES)}, got {mode!r}")
    wrapper = PolicyForward(model)
    if mode == "ddp":
        # forward_sync_buffers=False: the models have no buffers that change, and a broadcast per forward
        # would force every rank to run the same number of forwards even in evaluation.
        return torch.nn.parallel.DistributedDataParallel(
            wrapper, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(wrapper)
    return wrapper


def is_fsdp(wrapped) -> bool:
    return wrapped is not None and not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)


def no_sync(wrapped, skip: bool):
    """DDP: skip the gradient all-reduce of a micro-batch that is not the step's last (gradients
    keep accumulating locally; the last backward reduces their sum)."""
    if skip and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's parameters, gradient norms) as an ordinary full tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class FullModel:
    """What ``fastdpo.models.checkpoint.save_checkpoint`` needs of a model (``config``, ``state_dict()``),
    over a gathered full state dict: an FSDP2 run writes the same single-file checkpoint."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_for_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, wrapped):
    """Collective: every rank calls it. Returns ``(model to save, optimizer state dict)`` on rank 0
    (``(None, None)`` elsewhere). The optimizer state is in the single-process format (parameters
    numbered in order), so any run, sharded or not, can resume from the checkpoint."""
    if not is_fsdp(wrapped):
        return (model, optimizer.state_dict()) if is_main() else (None, None)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    if not is_main():
        return None, None
    index = {name: i for i, name in enumerate(_fqns(model, optimizer))}
    optim = {"state": {index[k]: v for k, v in optim["state"].items()},
             "param_groups": [{**g, "params": [index[k] for k in g["params"]]}
                              for g in optim["param_groups"]]}
    return FullModel(model.config, state), optim


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, wrapped,
                    state: dict[str, torch.Tensor], optim_state: dict) -> None:
    """Every rank loads the same full checkpoint; FSDP2 keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state, options=opts)
    names = _fqns(model, optimizer)
    optim = {"state": {names[int(k)]: v for k, v in optim_state["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                              for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim, options=opts)
