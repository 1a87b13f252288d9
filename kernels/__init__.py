"""Triton kernels of fused_lora (installed as fused_lora.kernels).

The launchers (lora_fwd, ...) import triton on first use; fused_lora.kernels.plans and .configs
import torch only, so the benchmark's modeled table runs without triton.
"""
_LAUNCHERS = ("lora_shrink", "lora_fwd", "lora_bwd_dy", "lora_bwd_dx", "lora_bwd_da")
__all__ = list(_LAUNCHERS)


def __getattr__(name):
    if name in _LAUNCHERS:
        from . import launchers
        return getattr(launchers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
