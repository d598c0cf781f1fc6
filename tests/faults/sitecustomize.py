"""Test-only fault injection for child processes (never imported by fastdpo itself).

A test puts this directory on the child's PYTHONPATH; Python imports ``sitecustomize`` at start-up.
``FASTDPO_FAULT=kill-mining:B:STAGE`` then SIGKILLs the process at mining batch B, at the moment the
real run would be: mid-write of the batch's pairs (``partial``: the pairs file holds half of them),
after the pairs are durable but before the progress record (``pairs``), or just after the record
(``commit``). It wraps ``ProgressLog.commit``, the call that ends every batch.
"""
import os
import signal

_SPEC = os.environ.get("FASTDPO_FAULT", "")

if _SPEC.startswith("kill-mining:"):
    from fastdpo.generation.mining_progress import ProgressLog

    _, _batch, _stage = _SPEC.split(":")
    _real_commit = ProgressLog.commit
    _prev_end = {}

    def _commit(self, batch, out_bytes, stats):
        start = _prev_end.get(self.path, 0)
        _prev_end[self.path] = out_bytes
        if batch != int(_batch):
            return _real_commit(self, batch, out_bytes, stats)
        if _stage == "partial":
            with open(self.out_path, "r+b") as f:
                f.truncate(start + (out_bytes - start) // 2)
                os.fsync(f.fileno())
        if _stage == "commit":
            _real_commit(self, batch, out_bytes, stats)
        os.kill(os.getpid(), signal.SIGKILL)

    ProgressLog.commit = _commit

# ``FASTDPO_FAULT=kill-call:MODULE:ATTR:N:WHEN`` SIGKILLs the process at the N-th call (1-based,
# counted over the process) of ``MODULE.ATTR`` (``ATTR`` may be ``Class.method``), ``before`` it
# runs or ``after`` it returned: a kill at a chosen point of a long run (the online loop's tests).
if _SPEC.startswith("kill-call:"):
    import functools
    import importlib

    _, _module, _attr, _n, _when = _SPEC.split(":")
    _owner = importlib.import_module(_module)
    *_path, _name = _attr.split(".")
    for _part in _path:
        _owner = getattr(_owner, _part)
    _real = getattr(_owner, _name)
    _calls = [0]

    @functools.wraps(_real)
    def _wrapped(*args, **kwargs):
        _calls[0] += 1
        hit = _calls[0] == int(_n)
        if hit and _when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = _real(*args, **kwargs)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(_owner, _name, _wrapped)
