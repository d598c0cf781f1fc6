"""A host-sync spy for CPU tests of code meant for CUDA.

On a CUDA tensor these make the host wait for the device: reading a value (``item``, ``bool``,
``int``, ``float``, ``tolist``, ``numpy``) and ops whose output shape depends on the data
(``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave`` without
``output_size``). On CPU tensors they are free, so a CPU test counts them instead: ``HostSyncs``
sees every torch op (a ``TorchDispatchMode``) and the two Python-level reads. Triton kernel
launches are not counted: under the interpreter a launch reads its arguments on the host, on a GPU
it is an asynchronous launch.
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
          aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
          aten._unique2.default, aten._unique.default, aten.unique_dim.default}


def _is_sync(func, args, kwargs) -> bool:
    if func in _READS:
        return True
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if "fastdpo" in f.filename or "/dpo/" in f.filename
              or "/kernels/" in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames[-4:]))


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs(monkeypatch) as spy: ...``; ``spy.calls``: (what, where) per sync."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self._paused = 0
        for name in ("tolist", "numpy"):
            real = getattr(torch.Tensor, name)

            def read(t, *a, _real=real, _name=name, **k):
                self._record(_name)
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, read)
        from fastdpo.kernels import HAS_TRITON
        if HAS_TRITON:
            from fastdpo.kernels import linear_logprob
            launcher = type(linear_logprob._logits_kernel)   # JITFunction, or the interpreter's
            real_run = launcher.run

            def run(kernel, *a, **k):
                self._paused += 1
                try:
                    return real_run(kernel, *a, **k)
                finally:
                    self._paused -= 1

            monkeypatch.setattr(launcher, "run", run)

    def _record(self, what: str) -> None:
        if not self._paused:
            self.calls.append((what, _where()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self._record(str(func))
        return func(*args, **kwargs)
