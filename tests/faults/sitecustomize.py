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
