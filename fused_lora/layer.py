"""LoRALinear: a drop-in nn.Linear with a trainable low-rank update, computed by lora_linear."""
from __future__ import annotations

import math

import torch
from torch import nn

from .functional import lora_linear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """y = x W^T + b + s * (dropout(x) A^T) B^T, with W and b frozen and A (r, in), B (out, r) trainable.

    s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. A is kaiming-uniform and B is zero
    at initialisation (as PEFT does), so a new layer computes exactly what the base layer does.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self._setup(base.weight, base.bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    use_rslora=use_rslora)

    def _setup(self, weight, bias, *, r, lora_alpha, lora_dropout, use_rslora):
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wrap an existing nn.Linear; the new layer shares (and freezes) its weight and bias tensors."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                     use_rslora=use_rslora)
        return layer

    def reset_lora_parameters(self) -> None:
        # PEFT's init_lora_weights=True: kaiming-uniform A (a = sqrt(5)), zero B.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training, seed=seed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}" + (", use_rslora=True" if self.use_rslora else ""))
