"""fused_lora.lora_linear: backend choice and the autograd Function."""
from __future__ import annotations

import os

import torch

from . import reference
from ._validation import ALL_DTYPES, KERNEL_DTYPES, check_lora_inputs
from .dropout import draw_seed

BACKENDS = ("triton", "torch", "reference")


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter; parsed as triton's getenv_bool does."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def select_backend(x: torch.Tensor) -> str:
    """CUDA -> triton; CPU -> torch, or triton under TRITON_INTERPRET=1; FUSED_LORA_BACKEND overrides."""
    forced = os.environ.get("FUSED_LORA_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FUSED_LORA_BACKEND={forced!r}; expected one of {', '.join(BACKENDS)}")
        if forced == "triton" and not (x.is_cuda or (interpreting() and x.device.type == "cpu")):
            raise RuntimeError(f"FUSED_LORA_BACKEND=triton needs CUDA tensors, or CPU tensors with "
                               f"TRITON_INTERPRET=1; x is on {x.device}")
        return forced
    if x.is_cuda or (interpreting() and x.device.type == "cpu"):
        return "triton"
    return "torch"


def _backend_module(name: str):
    if name == "triton":
        from . import _triton_backend  # imports triton: only when the kernels are used
        return _triton_backend
    from . import _torch_backend
    return _torch_backend


class LoRALinearFunction(torch.autograd.Function):
    """Saves x (as a 2-D view) and S = dropout(x) A^T; the dropout mask is redrawn from the seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
        K = x.shape[-1]
        N = weight.shape[0]
        x2 = x.reshape(-1, K)
        y2, s = backend.forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, s)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y2.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, s = ctx.saved_tensors
        need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dA = dB = dW = db = None
        if need_dx or need_dA or need_dB:
            dx, dA, dB = ctx.backend.backward(dy2, x2, weight, lora_A, lora_B, s, ctx.scaling,
                                              ctx.dropout_p, ctx.seed, need_dx, need_dA, need_dB)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        if dA is not None:
            dA = dA.to(lora_A.dtype)
        if dB is not None:
            dB = dB.to(lora_B.dtype)
        if need_dW:
            dW = torch.mm(dy2.t(), x2)
        if need_db and ctx.has_bias:
            db = dy2.sum(0)
        return dx, dW, db, dA, dB, None, None, None, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, training=False, seed=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, with fused kernels on CUDA.

    x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); 1 <= r <= 256.
    Dropout applies to the LoRA branch only, and only when ``training`` and ``dropout_p > 0``; its
    keep-mask is a deterministic function of ``seed`` (drawn from torch's default CPU generator
    when None). Differentiable in x, lora_A, lora_B, and weight / bias when they require grad.
    """
    check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, dtypes=ALL_DTYPES)
    backend = select_backend(x)
    if backend == "triton" and x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the Triton kernels support float16, bfloat16 and float32 "
                        f"(float64 runs with FUSED_LORA_BACKEND=torch)")
    scaling = float(scaling)
    dropout_p = float(dropout_p) if training else 0.0
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed()
    if backend == "reference":
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling,
                                     dropout_p=dropout_p, training=training, seed=seed)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                    0 if seed is None else seed, _backend_module(backend))
