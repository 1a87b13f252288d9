"""Runs the Triton kernels through the interpreter on CPU, unless the run is `pytest -m gpu`.

TRITON_INTERPRET must be set before triton is imported; nothing here imports triton or touches CUDA.
"""
import os


def pytest_configure(config):
    if (config.option.markexpr or "").strip() != "gpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.pop("FUSED_LORA_BACKEND", None)
