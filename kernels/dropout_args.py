"""How the kernels take dropout: p as an integer threshold on 24 random bits and a keep scale, and the
seed as a 0-dim int64 tensor on the launch's device, which they load (a CUDA graph replays whatever value
the tensor holds). Pure torch: fused_lora.dropout draws its reference mask on the same threshold."""
from __future__ import annotations

import torch


def drop_threshold(p: float) -> int:
    """Integer threshold on 24 random bits: an element is dropped when its bits are < this."""
    return int(round(p * (1 << 24)))


def keep_scale(p: float) -> float:
    return 1.0 / (1.0 - p)


def seed_on(device, seed) -> torch.Tensor:
    """``seed`` as the 0-dim int64 tensor the kernels load: a tensor as it is, an int placed on ``device``."""
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.full((), seed, dtype=torch.int64, device=device)
