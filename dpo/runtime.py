"""Where the code runs: devices, precision, and several processes as launched by ``torchrun``.

``torchrun --nproc_per_node=N -m fastdpo.cli train ...`` (or ``fastdpo train --nproc N``) starts N copies
of the same command; each reads its place from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without those variables every function here is a no-op
for a world of one, so the single-process code path is the plain one.

What is split across ranks, and how:
- training: each optimizer step's global batch is the ``world_size * accumulation`` micro-batches
  the single-process loop would take for a batch ``world_size`` times larger; rank r takes the
  r-th run of ``accumulation`` of them. Loss normalizers are computed over the global step and
  divided by the world size, so DDP's (and FSDP2's) gradient averaging gives exactly the
  single-process gradient of the same global batch;
- the policy runs wrapped in DistributedDataParallel, or sharded with FSDP2, when it does not fit
  one device (``fastdpo.training.parallel``); checkpoints are always gathered into the one-file
  format a single process writes;
- reference log-probs and mining: whole batches are dealt round-robin to ranks and gathered.

Failure. A rank that dies or raises exits non-zero; torchrun's elastic agent then stops the
others (SIGTERM, SIGKILL after a grace period). Without an agent a gloo peer sees the closed
connection at its next collective, and every collective has a finite timeout
(``FASTDPO_DIST_TIMEOUT`` seconds, default 300) as the last resort, so no rank waits forever.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------- process group


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes in the environment. Returns whether this is a
    multi-process run. Idempotent; a no-op (False) without WORLD_SIZE or with WORLD_SIZE=1.

    Backend: gloo for CPU tensors, plus nccl for CUDA tensors on a CUDA machine (each process then
    owns ``cuda:LOCAL_RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                         f"(or fastdpo train --nproc {world})")
    if timeout_s is None:
        timeout_s = float(os.environ.get("FASTDPO_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # A failed NCCL collective tears the process down instead of leaving it blocked.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device | str) -> torch.device:
    """``cuda`` without an index means this process's own GPU (``cuda:LOCAL_RANK``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


# --------------------------------------------------------------------------- devices and precision


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a device this machine does not have is a
    ``ConfigError`` here, before anything is loaded onto it."""
    from fastdpo.errors import ConfigError
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = local_device(device)   # under torchrun, "cuda" is this process's GPU
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {str(device)!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {str(device)!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r}: CUDA is not available on this machine "
                              f"(use device auto or cpu)")
        if (resolved.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s)")
    return resolved


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware has it (CUDA bf16, or a CPU with AVX512-BF16/AMX)."""
    if mixed_precision != "auto":
        return mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if device.type == "cpu" and has_bf16 else "fp32"


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: to CUDA through pinned memory
    and a non-blocking copy (a copy from ordinary pageable memory first waits for every queued
    kernel, i.e. a host sync per batch). Torch keeps the pinned buffer until the copy is done."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- collectives


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(seq: Sequence) -> list:
    """This rank's share of ``seq``: items ``rank, rank + world, ...`` (round-robin, so items
    sorted by cost are spread evenly)."""
    return list(seq)[rank()::world_size()]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on some rank (e.g. a Ctrl-C seen by one process)."""
    if not is_distributed():
        return flag
    return any(all_gather_object(bool(flag)))


def any_rank_on_device(flag: torch.Tensor) -> torch.Tensor:
    """A bool tensor, True on every rank when it is True on some rank, as an all-reduce queued on
    the device (no host read: the training step's non-finite flag)."""
    if not is_distributed():
        return flag
    votes = flag.to(torch.int32)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return votes.bool()


def all_ranks(flag: bool) -> bool:
    if not is_distributed():
        return flag
    return all(all_gather_object(bool(flag)))


def run_on_main(fn: Callable, *args, **kwargs):
    """Run ``fn`` on rank 0 only (e.g. file-system decisions) and hand its result to every rank.
    A ValueError/OSError on rank 0 is raised on every rank, so none is left waiting for the others."""
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            error = e
    if not is_distributed():
        if error is not None:
            raise error
        return result
    result, message = broadcast_object((result, None if error is None else (type(error), str(error))))
    if error is not None:
        raise error
    if message is not None:
        raise message[0](message[1])
    return result


def gather_rows(out: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``out`` holds valid values only in ``rows`` (this rank's share); every rank gets them all."""
    if not is_distributed():
        return out
    rows = list(rows)
    full = out.clone()
    for got_rows, values in all_gather_object((rows, out[rows].cpu())):
        full[got_rows] = values.to(full.device)
    return full


def all_reduce_sums(sums: dict, keep: Sequence[str] = ()) -> dict:
    """Sum each value of a statistics dict over ranks (keys in ``keep`` are already global)."""
    if not is_distributed():
        return sums
    keys = sorted(k for k in sums if k not in keep)
    vec = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(vec)
    return {**sums, **{k: v for k, v in zip(keys, vec.tolist())}}


# --------------------------------------------------------------------------- launching


def relaunch(nproc: int, module: str, argv: Sequence[str]) -> int:
    """Run ``python -m <module> <argv>`` as ``nproc`` processes through torchrun's own module
    (``torch.distributed.run --standalone``: a private rendezvous on a free local port).
    Returns the launcher's exit code (non-zero when any rank failed)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--nproc given inside a torchrun launch; drop one of them")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    return subprocess.call(cmd)
