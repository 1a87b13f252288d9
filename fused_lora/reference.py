"""Plain-PyTorch LoRA linear, written to be obviously right. The tests compare the kernels to it.

With the same seed it applies exactly the keep-mask the kernels draw (fused_lora.dropout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import ALL_DTYPES, check_lora_inputs
from .dropout import draw_seed, dropout_keep_mask


def dropout(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """x * keep / (1 - p), with keep drawn from (seed, row, column) of x flattened to 2-D; NaN / inf at a
    dropped position give NaN, as nn.Dropout's x * mask does."""
    K = x.shape[-1]
    keep = dropout_keep_mask(seed, x.numel() // max(K, 1), K, p, device=x.device).reshape(x.shape)
    return x * keep / (1.0 - p)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, training=False, seed=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T."""
    check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                      dtypes=ALL_DTYPES, max_rank=None)
    x_lora = x
    if training and dropout_p > 0.0:
        x_lora = dropout(x, dropout_p, draw_seed(x.device) if seed is None else seed)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)
