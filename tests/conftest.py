import os

# Triton fixes interpreted-vs-compiled when it is first imported, so this must precede any test
# module's imports. It only matters to backend="triton" on CPU tensors (tests/test_kernels*.py):
# backend="auto" still picks the torch path on CPU, and GPU compilation checks run in a clean
# subprocess (kernels/aot.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
