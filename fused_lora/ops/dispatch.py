"""Which implementation computes a fused call: the Triton kernels, the C++ CPU kernels or the torch path, by
x's device and the environment. One decision (``select_backend``), used by fused_lora.lora_linear and by the
per-device kernels of the op (fused_lora.ops.linear)."""
from __future__ import annotations

import contextlib
import os

import torch

from ..kernels._interpreter import interpreting

BACKENDS = ("triton", "cpp", "torch", "reference")
_MODULES: dict = {}


def select_backend(x: torch.Tensor) -> str:
    """CUDA -> triton; CPU -> triton under TRITON_INTERPRET=1, else cpp (the C++ kernels, built on first use)
    or torch when they cannot be built; FUSED_LORA_BACKEND overrides."""
    forced = os.environ.get("FUSED_LORA_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FUSED_LORA_BACKEND={forced!r}; expected one of {', '.join(BACKENDS)}")
        if forced == "triton" and not (x.is_cuda or (interpreting() and x.device.type == "cpu")):
            raise RuntimeError(f"FUSED_LORA_BACKEND=triton needs CUDA tensors, or CPU tensors with "
                               f"TRITON_INTERPRET=1; x is on {x.device}")
        if forced == "cpp":
            if x.device.type != "cpu":
                raise RuntimeError(f"FUSED_LORA_BACKEND=cpp needs CPU tensors; x is on {x.device}")
            _module("cpp").load()  # raises, naming why the C++ kernels cannot be built
        return forced
    if x.is_cuda or (interpreting() and x.device.type == "cpu"):
        return "triton"
    if x.device.type == "cpu" and _module("cpp").available():
        return "cpp"
    return "torch"


@contextlib.contextmanager
def forced_backend(name: str):
    """FUSED_LORA_BACKEND=name inside the block (read on every eager call), restored after."""
    saved = os.environ.get("FUSED_LORA_BACKEND")
    os.environ["FUSED_LORA_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FUSED_LORA_BACKEND", None)
        else:
            os.environ["FUSED_LORA_BACKEND"] = saved


def _module(name: str):
    module = _MODULES.get(name)
    if module is None:
        if name == "triton":
            from . import triton_backend as module  # imports triton: only when the kernels are used
        elif name == "cpp":
            from . import cpp_backend as module  # builds nothing until used
        else:
            from . import torch_backend as module
        _MODULES[name] = module
    return module


def op_backend(x: torch.Tensor):
    """The module (forward, backward) that computes the op for x: triton_backend, cpp_backend or
    torch_backend ("reference" never reaches the op: fused_lora.lora_linear answers it; the op computes it
    in torch)."""
    name = select_backend(x)
    return _module(name if name != "reference" else "torch")
