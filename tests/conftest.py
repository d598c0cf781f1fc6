import os

# Triton fixes interpreted-vs-compiled when it is first imported, so this must precede any test
# module's imports. It only matters to backend="triton" on CPU tensors (tests/test_kernels*.py):
# backend="auto" still picks the torch path on CPU, and GPU compilation checks run in a clean
# subprocess (kernels/aot.py).
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one thread is as fast, and two stall each other when other processes keep the
    cores busy. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter):
    """Say plainly when the browser test did not run (pytest -q hides skip reasons)."""
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if "browser test skipped" in reason:
            terminalreporter.write_line(f"NOTE: {reason.removeprefix('Skipped: ')}")
            break
