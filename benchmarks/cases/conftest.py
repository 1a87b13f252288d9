"""pytest-benchmark cases: tiny CPU sizes by default (CI), real sizes under `pytest -m gpu` on a GPU.

As tests/conftest.py (which does not apply here): TRITON_INTERPRET=1 unless the run is `-m gpu`,
set before triton is imported, so the kernel cases run the real kernels in the interpreter on CPU.
The provider cases time fused_lora's CPU path (torch backend) whatever TRITON_INTERPRET says.
"""
import os

import pytest


def pytest_configure(config):
    if (config.option.markexpr or "").strip() != "gpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
