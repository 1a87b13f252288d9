"""The CPU path: cuBLAS/MKL-style GEMMs written into the output buffer, no M x N temporaries.

Same contract as fused_lora.ops.triton_backend: forward returns (y, S), backward returns (dX, dA, dB).
"""
from __future__ import annotations

import torch

from ..dropout import dropout_keep_mask, keep_scale


def keep_scaled(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device)
    return keep.to(x.dtype).mul_(keep_scale(dropout_p))


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    # x * mask, not a masked select: NaN / inf at a dropped position give NaN, as in the reference.
    x_lora = x * keep_scaled(x, dropout_p, seed) if dropout_p > 0.0 else x  # transient, not saved
    s = torch.mm(x_lora, lora_A.t())
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    return add_expand(y, s, lora_B, scaling), s


def add_expand(y, s, lora_B, scaling):
    """y + scaling * S B^T, in place."""
    if scaling == 0.0:
        # addmm_(alpha=0) skips the product (BLAS), hiding NaN / inf of S B^T that the reference's
        # 0 * (S B^T) keeps: a rare case, paid with an M x N temporary.
        return y.add_(torch.mm(s, lora_B.t()).mul_(0.0))
    return y.addmm_(s, lora_B.t(), alpha=scaling)


def backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    ds = torch.mm(dy, lora_B).mul_(scaling)
    dB = torch.mm(dy.t(), s).mul_(scaling) if need_dB else None
    dx = dA = None
    keep = keep_scaled(x, dropout_p, seed) if dropout_p > 0.0 and (need_dx or need_dA) else None
    if need_dx:
        dx = torch.mm(dy, weight)
        if keep is not None:
            dx.add_(torch.mm(ds, lora_A).mul_(keep))
        else:
            dx.addmm_(ds, lora_A)
    if need_dA:
        dA = torch.mm(ds.t(), x * keep if keep is not None else x)
    return dx, dA, dB
