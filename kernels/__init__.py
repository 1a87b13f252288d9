"""Triton kernels of fused_lora (installed as fused_lora.kernels). Importing this imports triton."""
from .ops import lora_bwd_da, lora_bwd_dx, lora_bwd_dy, lora_fwd, lora_shrink

__all__ = ["lora_shrink", "lora_fwd", "lora_bwd_dy", "lora_bwd_dx", "lora_bwd_da"]
