"""Shared by every test below tests/ (tests/benchmarks/cases included): the interpreter switch and the
`cuda` fixture. The kernel spy is in tests/spies.py and the tiny models in tests/peft_parity.py (helper
modules on sys.path through `pythonpath` in pyproject.toml's pytest section).

Runs the Triton kernels through the interpreter on CPU, unless the run is `pytest -m gpu`.
TRITON_INTERPRET must be set before triton is imported; nothing here imports triton, torch or fused_lora
at import, or touches CUDA.
"""
import os

import pytest


def pytest_configure(config):
    """TRITON_INTERPRET=1 unless the run is `pytest -m gpu`, so the kernels run in triton's interpreter
    on CPU tensors; an explicit TRITON_INTERPRET in the environment wins."""
    if (config.option.markexpr or "").strip() != "gpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.pop("FUSED_LORA_BACKEND", None)


@pytest.fixture
def cuda():
    """The CUDA device, or a skip at run time (collection must work on a machine without CUDA)."""
    import torch

    from fused_lora.functional import interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET=1: run `pytest -m gpu` to test the compiled kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")
