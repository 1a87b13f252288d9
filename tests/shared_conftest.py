"""What tests/conftest.py and benchmarks/cases/conftest.py both define: the interpreter switch and the
`cuda` fixture. A conftest applies only below its folder and the two trees are siblings, so each
conftest imports this module (on sys.path through `pythonpath` in pyproject.toml's pytest section).

Nothing here imports triton, torch or fused_lora at import: TRITON_INTERPRET must be set before
triton is imported.
"""
import os

import pytest


def interpret_unless_gpu(config):
    """TRITON_INTERPRET=1 unless the run is `pytest -m gpu`, so the kernels run in triton's interpreter
    on CPU tensors; an explicit TRITON_INTERPRET in the environment wins."""
    if (config.option.markexpr or "").strip() != "gpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


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
