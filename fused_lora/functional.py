"""fused_lora.lora_linear: input checks and backend choice; the op itself is in ops/linear.py."""
from __future__ import annotations

import math
import os

import torch

from . import reference
from .ops.dispatch import BACKENDS, select_backend  # noqa: F401 (public here)
from .ops.linear import lora_linear_2d
from .kernels._interpreter import interpreting  # noqa: F401 (public here: the tests and the report use it)
from ._validation import ALL_DTYPES, KERNEL_DTYPES, check_lora_inputs

def _autocasting(device_type: str) -> bool:
    # is_autocast_enabled raises for device types without autocast (meta tensors).
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_inputs(device_type: str, *tensors):
    """The tensors cast to the autocast dtype, as autocast casts F.linear's (float64 is left alone)."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def forced_backend_for(t: torch.Tensor, name: str) -> str | None:
    """The backend when FUSED_LORA_BACKEND forces one or ``t`` is float64 (select_backend), else None (the op's
    kernels choose); a TypeError for float64 on the Triton kernels. The op's kernels choose triton or torch
    themselves, so only these cases matter here: one environment read on the common path."""
    backend = select_backend(t) if os.environ.get("FUSED_LORA_BACKEND") or t.dtype not in KERNEL_DTYPES else None
    if backend == "triton" and t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels support float16, bfloat16 and float32 "
                        f"(float64 runs with FUSED_LORA_BACKEND=torch)")
    return backend


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, training=False, seed=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, with fused kernels on CUDA.

    x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); 1 <= r <= 256.
    Dropout applies to the LoRA branch only, and only when ``training`` and ``dropout_p > 0``; its
    keep-mask is a deterministic function of ``seed``: an int, a 0-dim int64 tensor on x's device, or
    None (drawn from the default generator of x's device). Differentiable in x, lora_A, lora_B, and
    weight / bias when they require grad.

    Under ``torch.autocast`` it computes in the autocast dtype, as nn.Linear does: floating-point
    tensors other than float64 are cast to it, and grads flow back to each tensor in its own dtype.
    """
    if isinstance(x, torch.Tensor) and _autocasting(x.device.type):
        x, weight, bias, lora_A, lora_B = _autocast_inputs(x.device.type, x, weight, bias, lora_A, lora_B)
    check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, dtypes=ALL_DTYPES)
    backend = forced_backend_for(x, "x")
    scaling = float(scaling)
    dropout_p = float(dropout_p) if training else 0.0
    if backend == "reference":
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling,
                                     dropout_p=dropout_p, training=training, seed=seed)
    if x.dim() == 2:
        return lora_linear_2d(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    K, N = x.shape[-1], weight.shape[0]
    # Rows as a product, not -1: reshape(-1, 0) is ambiguous and raises for K = 0.
    x2 = x.reshape(math.prod(x.shape[:-1]), K)
    y2 = lora_linear_2d(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return y2.reshape(*x.shape[:-1], N)
