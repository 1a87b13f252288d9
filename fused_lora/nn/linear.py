"""LoRALinear: a drop-in nn.Linear with a trainable low-rank update, computed by lora_linear."""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ._lora_module import LoRAModuleMixin
from ..functional import lora_linear
from ..functional_dora import dora_linear, dora_weight_norm
from ..reference import dora_scale


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

    use_dora=True (PEFT's ``LoraConfig(use_dora=True)``): a trainable magnitude ``lora_magnitude_vector`` m
    (out_features,), in W's dtype, initialised to n = ||W + s B A|| per output row (= ||W|| rows, B being
    0), as PEFT does; forward computes fused_lora.dora_linear: y = x W^T + b + (g - 1) (x' W^T)
    + g s (x' A^T) B^T with g = m / n (0 where n = 0), x' = dropout(x). n is cached while W, lora_A, lora_B
    (tensor, dtype, device and in-place version) and scaling stay the same, i.e. across eval calls and
    gradient-accumulation micro-batches; under torch.compile it is computed on every call. Edits through
    ``.data`` do not bump a tensor's version: call ``clear_weight_norm_cache()`` after them.
    A DoRA merge writes W' = g (W + s B A) (PEFT's DoraLinearVariant.merge), keeping n for unmerge; a
    merged DoRA layer's ``_extra_state`` is that n ((out_features,) float32, float64 for float64 W).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False, device=None, dtype=None):
        super().__init__()
        check_use_dora(use_dora)
        factory = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self._setup(base.weight, base.bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    use_rslora=use_rslora, use_dora=use_dora)

    def _setup(self, weight, bias, *, r, lora_alpha, lora_dropout, use_rslora, fan_in_fan_out=False,
               use_dora=False):
        check_use_dora(use_dora)
        self._set_lora_config(r, lora_alpha, lora_dropout, use_rslora)
        self.use_dora = use_dora
        self._norm_cache = None  # (key, n) of the last weight norm; see _weight_norm
        self._merge_norm = None  # n of the unmerged weights while a DoRA layer is merged
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
        self.register_parameter("lora_magnitude_vector",
                                nn.Parameter(torch.empty(self.out_features, **factory)) if use_dora else None)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False) -> "LoRALinear":
        """Wrap an existing nn.Linear (or transformers Conv1D, as fan_in_fan_out); shares (and freezes) W and b.

        The new layer takes the wrapped module's training mode.
        """
        check_use_dora(use_dora)
        if isinstance(linear, nn.Linear):
            fan_in_fan_out = False
        elif is_conv1d(linear):
            fan_in_fan_out = True
        else:
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                     use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out, use_dora=use_dora)
        layer.train(linear.training)  # a layer injected into an eval-mode model must not apply dropout
        return layer

    def reset_lora_parameters(self) -> None:
        # PEFT's init_lora_weights=True: kaiming-uniform A (a = sqrt(5)), zero B.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora:  # PEFT's DoraLinearLayer.update_layer: m = ||W + s B A|| per row
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm())

    def base_weight(self) -> torch.Tensor:
        """W as (out_features, in_features): a transposed view when fan_in_fan_out."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    # ---- DoRA's weight norm ---------------------------------------------------------------------------

    def _norm_key(self) -> tuple:
        key = [self.scaling]
        for t in (self.weight, self.lora_A, self.lora_B):
            key += [t.data_ptr(), t._version, t.dtype, t.device]
        return tuple(key)

    def weight_norm(self) -> torch.Tensor:
        """n = ||W + s B A||_2 per output row ((out_features,) float32, float64 for float64 W), no gradient.

        Outside torch.compile the last n is reused while its key (scaling, and W, lora_A, lora_B's storage
        pointer, in-place version, dtype and device) is unchanged; torch.compile computes it on every call
        (the key reads tensor attributes that do not trace).
        """
        if torch.compiler.is_compiling():
            return dora_weight_norm(self.base_weight(), self.lora_A, self.lora_B, self.scaling)
        key = self._norm_key()
        if self._norm_cache is None or self._norm_cache[0] != key:
            n = dora_weight_norm(self.base_weight(), self.lora_A, self.lora_B, self.scaling)
            self._norm_cache = (key, n)
        return self._norm_cache[1]

    def clear_weight_norm_cache(self) -> None:
        """Drop the cached n (needed only after edits through ``.data``, which bump no version)."""
        self._norm_cache = None

    def set_scaling(self, *, lora_alpha: float | None = None, use_rslora: bool | None = None) -> None:
        super().set_scaling(lora_alpha=lora_alpha, use_rslora=use_rslora)
        self._norm_cache = None

    def forward(self, x: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.base_weight(), self.bias)
        if self.use_dora:
            return dora_linear(x, self.base_weight(), self.bias, self.lora_A, self.lora_B, self.scaling,
                               self.lora_magnitude_vector, dropout_p=self.lora_dropout, training=self.training,
                               seed=seed, weight_norm=self.weight_norm())
        return lora_linear(x, self.base_weight(), self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training, seed=seed)

    # ---- merging -------------------------------------------------------------------------------

    def _delta_fp32(self) -> torch.Tensor:
        """s B A in fp32, in the layout of ``weight`` ((in, out) when fan_in_fan_out)."""
        return self._delta(torch.float32)

    # DoRA: W' = g (W + s B A), g = m / n with n from the unmerged weights (PEFT's DoraLinearVariant.merge_*),
    # computed in fp32 (fp64 for fp64 W). Unmerge divides by g, so rows with g = 0 (m = 0, or n = 0) are
    # invertible only when their W row is 0; merge refuses any other g = 0 row, before changing anything.

    def _dora_merge(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', n) for a DoRA merge, W' in weight's dtype and layout; ValueError when it cannot be unmerged."""
        n = dora_weight_norm(self.base_weight(), self.lora_A, self.lora_B, self.scaling)
        compute = n.dtype
        g = dora_scale(self.lora_magnitude_vector.detach().to(compute), n)
        w = self.base_weight().detach().to(compute)
        lost = (g == 0) & (w != 0).any(dim=1)
        if bool(lost.any()):
            rows = lost.nonzero().flatten().tolist()
            raise ValueError(f"merging {self._name()}: DoRA rows {rows[:8]}{' ...' if len(rows) > 8 else ''} have "
                             f"scale m / n = 0 (lora_magnitude_vector 0, or W + s B A = 0) and a nonzero weight "
                             f"row, which the merged weight zeroes and unmerge could not restore; the layer is "
                             f"unchanged")
        merged = g[:, None] * (w + self._delta(compute, transposed=False))
        merged = (merged.t() if self.fan_in_fan_out else merged).to(self.weight.dtype)
        self._check_finite(merged, "merging")
        return merged, n

    def _delta(self, dtype: torch.dtype, *, transposed: bool = True) -> torch.Tensor:
        """s B A in ``dtype``: in weight's layout, or (out, in) with transposed=False."""
        delta = (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling
        return delta.t() if transposed and self.fan_in_fan_out else delta

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        if not self.use_dora:
            return super().merged_weight()
        if self.merged:
            raise RuntimeError(f"{self._name()} is already merged; call unmerge() first")
        return self._dora_merge()[0]

    @torch.no_grad()
    def merge(self) -> None:
        """weight += s B A (DoRA: weight = g (weight + s B A)), computed in fp32 and written in place.

        Refuses (ValueError, layer unchanged) a result containing NaN or inf, including an overflow of the
        weight's dtype, and a DoRA merge with a g = 0 row whose weight row is nonzero. Merging a merged
        layer raises RuntimeError. A merged layer computes the base layer.
        """
        if not self.use_dora:
            return super().merge()
        if self.merged:
            raise RuntimeError(f"{self._name()} is already merged; call unmerge() first")
        merged, n = self._dora_merge()
        self.weight.copy_(merged)
        self._merge_norm = n
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """weight -= s B A (DoRA: weight = weight / g - s B A, g from the n kept at merge; rows with g = 0 back
        to 0). Not bit-exact for fp16/bf16 weights: they are rounded twice."""
        if not self.use_dora:
            return super().unmerge()
        if not self.merged:
            raise RuntimeError(f"{self._name()} is not merged; nothing to unmerge")
        if self._merge_norm is None:
            raise RuntimeError(f"{self._name()} is marked merged but has no DoRA norm from its merge (its state "
                               f"came from a layer without DoRA); it cannot be unmerged")
        n = self._merge_norm.to(self.weight.device)
        compute = n.dtype
        g = dora_scale(self.lora_magnitude_vector.detach().to(compute), n)
        w = self.base_weight().detach().to(compute)
        unmerged = torch.where((g > 0)[:, None], w / torch.where(g > 0, g, 1.0)[:, None]
                               - self._delta(compute, transposed=False), 0.0)
        unmerged = (unmerged.t() if self.fan_in_fan_out else unmerged).to(self.weight.dtype)
        self._check_finite(unmerged, "unmerging")
        self.weight.copy_(unmerged)
        self._merge_norm = None
        self.merged = False

    # A merged DoRA layer's state carries n, which its unmerge divides by; otherwise the flag alone.
    def get_extra_state(self) -> torch.Tensor:
        if self.use_dora and self.merged and self._merge_norm is not None:
            return self._merge_norm.detach().clone()
        return super().get_extra_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        if state.dim() == 1:
            self.merged, self._merge_norm = True, state.detach().clone()
        else:
            super().set_extra_state(state)
            self._merge_norm = None

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
                + (", use_dora=True" if self.use_dora else "")
                + (", merged=True" if self.merged else ""))


def check_use_dora(use_dora) -> None:
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
