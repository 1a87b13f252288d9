"""LoRALinear: a drop-in nn.Linear with a trainable low-rank update, computed by lora_linear."""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ._lora_module import LoRAModuleMixin
from ..functional import lora_linear


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style, weight stored (in, out)); checked without importing transformers."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


class LoRALinear(LoRAModuleMixin, nn.Module):
    """y = x W^T + b + s * (dropout(x) A^T) B^T, with W and b frozen and A (r, in), B (out, r) trainable.

    s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. A is kaiming-uniform and B is zero
    at initialisation (as PEFT does), so a new layer computes exactly what the base layer does.
    The constructor, from_linear and set_scaling raise TypeError / ValueError for r outside
    1..MAX_RANK (256), a non-finite lora_alpha, lora_dropout outside [0, 1), a non-bool use_rslora, or
    a scaling beyond float32 (the kernels take it as a float32 scalar).

    fan_in_fan_out=True means ``weight`` is stored (in, out), as transformers' Conv1D (GPT-2) stores it;
    the layer then computes with ``weight.t()`` (a strided view, no copy).

    ``merge()`` folds s B A into W (computed in fp32); a merged layer computes x W^T + b only, until
    ``unmerge()`` subtracts it again. state_dict records ``merged`` (key ``_extra_state``) with W.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self._setup(base.weight, base.bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    use_rslora=use_rslora)

    def _setup(self, weight, bias, *, r, lora_alpha, lora_dropout, use_rslora, fan_in_fan_out=False):
        self._set_lora_config(r, lora_alpha, lora_dropout, use_rslora)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wrap an existing nn.Linear (or transformers Conv1D, as fan_in_fan_out); shares (and freezes) W and b.

        The new layer takes the wrapped module's training mode.
        """
        if isinstance(linear, nn.Linear):
            fan_in_fan_out = False
        elif is_conv1d(linear):
            fan_in_fan_out = True
        else:
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                     use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out)
        layer.train(linear.training)  # a layer injected into an eval-mode model must not apply dropout
        return layer

    def reset_lora_parameters(self) -> None:
        # PEFT's init_lora_weights=True: kaiming-uniform A (a = sqrt(5)), zero B.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def base_weight(self) -> torch.Tensor:
        """W as (out_features, in_features): a transposed view when fan_in_fan_out."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.base_weight(), self.bias)
        return lora_linear(x, self.base_weight(), self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training, seed=seed)

    # ---- merging -------------------------------------------------------------------------------

    def _delta_fp32(self) -> torch.Tensor:
        """s B A in fp32, in the layout of ``weight`` ((in, out) when fan_in_fan_out)."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    def to_base_layer(self) -> nn.Module:
        """A plain nn.Linear (or Conv1D when fan_in_fan_out) sharing this layer's W and b tensors."""
        if self.fan_in_fan_out:
            conv1d_cls = sys.modules["transformers.pytorch_utils"].Conv1D
            base = conv1d_cls.__new__(conv1d_cls)
            nn.Module.__init__(base)
            base.nf = self.out_features
            base.nx = self.in_features  # recent transformers keep nx; harmless otherwise
        else:
            base = nn.Linear.__new__(nn.Linear)
            nn.Module.__init__(base)
            base.in_features, base.out_features = self.in_features, self.out_features
        base.weight = self.weight
        base.bias = self.bias
        return base

    def _name(self) -> str:
        return f"LoRALinear(in_features={self.in_features}, out_features={self.out_features}, r={self.r})"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}" + (", use_rslora=True" if self.use_rslora else "")
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", merged=True" if self.merged else ""))
