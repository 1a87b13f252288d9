"""What LoRALinear and LoRAEmbedding share: the scaling, merging into the frozen weight, and the ``merged``
flag in state_dict. A module using it defines ``weight``, ``r``, ``lora_alpha``, ``lora_dropout``,
``use_rslora``, ``scaling``, ``merged``, ``_delta_fp32()`` (s B A in ``weight``'s layout, fp32) and ``_name()``.
"""
from __future__ import annotations

import torch

from .._validation import check_lora_config


class LoRAModuleMixin:
    """For nn.Module subclasses (listed before nn.Module in the bases)."""

    def _set_lora_config(self, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool) -> None:
        """Checks the hyper-parameters (raising before anything is set) and records them, unmerged."""
        self.scaling = check_lora_config(r, lora_alpha, lora_dropout, use_rslora)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.merged = False

    def set_scaling(self, *, lora_alpha: float | None = None, use_rslora: bool | None = None) -> None:
        """Change lora_alpha and/or use_rslora; the scaling follows. Invalid values raise, the layer unchanged."""
        lora_alpha = self.lora_alpha if lora_alpha is None else lora_alpha
        use_rslora = self.use_rslora if use_rslora is None else use_rslora
        self.scaling = check_lora_config(self.r, lora_alpha, self.lora_dropout, use_rslora)
        self.lora_alpha, self.use_rslora = lora_alpha, use_rslora

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """weight + s B A computed in fp32 and cast to the weight's dtype; raises if it has NaN or inf."""
        if self.merged:
            raise RuntimeError(f"{self._name()} is already merged; call unmerge() first")
        merged = (self.weight.float() + self._delta_fp32()).to(self.weight.dtype)
        self._check_finite(merged, "merging")
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """weight += s B A (computed in fp32, cast back to the weight's dtype, written in place).

        Refuses (ValueError, layer unchanged) a result containing NaN or inf, including an overflow of the
        weight's dtype. Merging a merged layer raises RuntimeError. A merged layer computes the base layer.
        """
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """weight -= s B A (fp32, cast back). Not bit-exact for fp16/bf16 weights: they are rounded twice."""
        if not self.merged:
            raise RuntimeError(f"{self._name()} is not merged; nothing to unmerge")
        unmerged = (self.weight.float() - self._delta_fp32()).to(self.weight.dtype)
        self._check_finite(unmerged, "unmerging")
        self.weight.copy_(unmerged)
        self.merged = False

    def _check_finite(self, weight: torch.Tensor, action: str) -> None:
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{action} {self._name()} gives a weight with NaN or inf (lora_A, lora_B or scaling "
                             f"{self.scaling} out of range for {self.weight.dtype}); the layer is unchanged")

    # ``merged`` in state_dict (as a tensor, which safetensors can store): a merged layer's weight already
    # holds s B A, so loading its state into an unmerged layer must mark that layer merged too.
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.merged)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.merged = bool(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state_dict without the flag (saved before it existed, or built by other tools) holds an unmerged
        # weight: it loads, strict or not, and marks the layer unmerged when it brings the weight.
        flag = prefix + "_extra_state"
        has_flag = flag in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not has_flag:
            if flag in missing_keys:
                missing_keys.remove(flag)
            if prefix + "weight" in state_dict:
                self.merged = False
