"""LoRA for Embedding in torch ops (CPU, and any device the Triton kernels do not serve).

Same contract as the Triton launchers (fused_lora.kernels.lora_embedding): forward (y, S), backward
(dA, dB); ids is (M,), dY (M, D).
"""
from __future__ import annotations

import torch


def forward(ids, weight, lora_A, lora_B, scaling: float):
    s = lora_A.t()[ids]  # (M, r), a gather of A's columns
    y = weight[ids]
    if scaling == 0.0:
        # addmm_(alpha=0) skips the product (BLAS), hiding NaN / inf of S B^T that the reference's
        # (S B^T) * 0 keeps.
        y.add_(torch.mm(s, lora_B.t()).mul_(0.0))
    else:
        y.addmm_(s, lora_B.t(), alpha=scaling)
    return y, s


def backward(dy, ids, lora_B, s, scaling: float, num_embeddings: int, padding_idx: int, scale_grad_by_freq: bool,
             need_dA: bool, need_dB: bool):
    dA = dB = None
    if need_dA:
        ds = torch.mm(dy, lora_B).mul_(scaling)
        # torch's embedding backward: what autograd of PEFT's F.embedding(ids, A^T) computes.
        dA = torch.ops.aten.embedding_dense_backward(ds, ids, num_embeddings, padding_idx, scale_grad_by_freq).t()
    if need_dB:
        dB = torch.mm(dy.t(), s).mul_(scaling)
    return dA, dB
