"""The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
from __future__ import annotations

from ..kernels import launchers


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return launchers.lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, seed=seed)


def backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    dx, dA, dB = launchers.lora_bwd(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p=dropout_p, seed=seed,
                                    need_dx=need_dx, need_dA=need_dA)
    return dx, dA, (dB if need_dB else None)
