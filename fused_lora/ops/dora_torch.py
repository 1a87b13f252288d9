"""The DoRA op in torch ops (CPU and every device without the Triton kernels; CUDA with dropout on).

Same contract as the Triton path (fused_lora.kernels.lora_dora): ``weight_norm`` returns n (N,) fp32,
``forward`` returns (y, S, Z) and ``backward`` returns (dX, dA, dB, dm), each None when not needed.
Z is z' = x' W^T + s S' B^T (M, N) with dropout, which the magnitude's gradient needs and y no longer holds;
without dropout Z is empty and the backward reads z = (y - b) / g from the saved output y.
"""
from __future__ import annotations

import torch

from .torch_backend import add_expand, keep_scaled

# Rows of W + s B A formed at a time for the norm (fp32): 256 x K, never N x K.
NORM_ROWS = 256


def weight_norm(weight, lora_A, lora_B, scaling):
    """n = ||W_i + s (B A)_i||_2 (N,) fp32 (float64 for float64 W), over NORM_ROWS-row slices of W."""
    N = weight.shape[0]
    acc = norm_dtype(weight.dtype)
    a = lora_A.to(acc)
    out = torch.empty(N, device=weight.device, dtype=acc)
    for i in range(0, N, NORM_ROWS):
        rows = torch.addmm(weight[i:i + NORM_ROWS].to(acc), lora_B[i:i + NORM_ROWS].to(acc), a, alpha=scaling)
        out[i:i + NORM_ROWS] = torch.linalg.vector_norm(rows, dim=1)
    return out


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of n and g: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale(magnitude, norm):
    """g = m / n in n's dtype, 0 where n == 0 (fused_lora.reference.dora_scale)."""
    positive = norm > 0
    return torch.where(positive, magnitude.to(norm.dtype) / torch.where(positive, norm, 1.0), 0.0)


def forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed):
    g = scale(magnitude, norm).to(x.dtype)
    if dropout_p > 0.0:
        x_lora = x * keep_scaled(x, dropout_p, seed)
        s = torch.mm(x_lora, lora_A.t())
        base_lora = torch.mm(x_lora, weight.t())
        z = add_expand(base_lora.clone(), s, lora_B, scaling)
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        y.addcmul_(z, g).sub_(base_lora)  # x W^T + b + g z' - x' W^T = PEFT's x W^T + b + (g-1) x'W^T + g s S'B^T
        return y, s, z
    s = torch.mm(x, lora_A.t())
    y = add_expand(torch.mm(x, weight.t()), s, lora_B, scaling).mul_(g)
    if bias is not None:
        y.add_(bias)
    return y, s, x.new_empty((0,))


def _pre_scale_output(saved, x, weight, bias, lora_B, s, magnitude, norm, scaling):
    """z = x W^T + s S B^T (M, N) without dropout, from the saved output: (y - b) / g where m != 0, recomputed
    for the columns with m == 0 (there y = b holds no trace of z)."""
    u = saved.to(norm.dtype) - bias.to(norm.dtype) if bias is not None else saved.to(norm.dtype)
    g = scale(magnitude, norm)
    z = u / torch.where(g != 0, g, 1.0)
    lost = torch.nonzero((magnitude == 0) & (norm > 0)).flatten()
    if lost.numel():
        z[:, lost] = (x @ weight[lost].t() + scaling * (s @ lora_B[lost].t())).to(norm.dtype)
    return z


def backward(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, scaling, dropout_p, seed,
             need_dx, need_dA, need_dB, need_dm):
    g = scale(magnitude, norm)
    dz = dy * g.to(dy.dtype)
    ds = torch.mm(dz, lora_B).mul_(scaling)
    dB = torch.mm(dz.t(), s).mul_(scaling) if need_dB else None
    dx = dA = dm = None
    keep = keep_scaled(x, dropout_p, seed) if dropout_p > 0.0 and (need_dx or need_dA) else None
    if need_dx:
        if keep is None:
            dx = torch.mm(dz, weight).addmm_(ds, lora_A)
        else:  # dY W + dropout'((g - 1) dY W + dS A)
            lora_part = torch.mm(dy * (g - 1).to(dy.dtype), weight).addmm_(ds, lora_A).mul_(keep)
            dx = torch.mm(dy, weight).add_(lora_part)
    if need_dA:
        dA = torch.mm(ds.t(), x * keep if keep is not None else x)
    if need_dm:
        z = saved.to(norm.dtype) if dropout_p > 0.0 else _pre_scale_output(saved, x, weight, bias, lora_B, s, magnitude,
                                                                    norm, scaling)
        colsum = (dy.to(norm.dtype) * z).sum(0)
        dm = torch.where(norm > 0, colsum / torch.where(norm > 0, norm, 1.0), 0.0).to(magnitude.dtype)
    return dx, dA, dB, dm


def weight_grad(dy, x, magnitude, norm, dropout_p, seed):
    """dW of the frozen base when it requires grad: g dY^T x, or dY^T x + ((g - 1) dY)^T x' with dropout."""
    g = scale(magnitude, norm).to(dy.dtype)
    if dropout_p > 0.0:
        return torch.mm(dy.t(), x).add_(torch.mm((dy * (g - 1)).t(), x * keep_scaled(x, dropout_p, seed)))
    return torch.mm((dy * g).t(), x)
