"""The DoRA op through the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

Same contract as fused_lora.ops.dora_torch: weight_norm -> n; forward -> (y, S, Z); backward -> (dX, dA, dB, dm).
"""
from __future__ import annotations

from ..kernels import launchers


def weight_norm(weight, lora_A, lora_B, scaling):
    return launchers.dora_weight_norm(weight, lora_A, lora_B, scaling)


def forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed):
    return launchers.dora_fwd(x, weight, bias, lora_A, lora_B, scaling, magnitude, norm, dropout_p=dropout_p, seed=seed)


def backward(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, scaling, dropout_p, seed,
             need_dx, need_dA, need_dB, need_dm):
    dx, dA, dB, dm = launchers.dora_bwd(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, scaling,
                                        dropout_p=dropout_p, seed=seed, need_dx=need_dx, need_dA=need_dA,
                                        need_dm=need_dm)
    return dx, dA, (dB if need_dB else None), dm
