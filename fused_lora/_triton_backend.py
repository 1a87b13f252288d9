"""The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
from __future__ import annotations

from .kernels import ops


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return ops.lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, seed=seed)


def backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    ds, dB = ops.lora_bwd_dy(dy, lora_B, s, scaling)
    dx = ops.lora_bwd_dx(dy, weight, ds, lora_A, dropout_p=dropout_p, seed=seed) if need_dx else None
    dA = ops.lora_bwd_da(ds, x, dropout_p=dropout_p, seed=seed) if need_dA else None
    return dx, dA, (dB if need_dB else None)
