"""Runs the Triton kernels through the interpreter on CPU, unless the run is `pytest -m gpu`.

TRITON_INTERPRET must be set before triton is imported; nothing here imports triton or touches CUDA.
"""
import os

from shared_conftest import cuda, interpret_unless_gpu  # noqa: F401  (pytest finds the fixture here)


def pytest_configure(config):
    interpret_unless_gpu(config)
    os.environ.pop("FUSED_LORA_BACKEND", None)
