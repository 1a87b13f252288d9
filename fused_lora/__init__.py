"""fused_lora: LoRA linear layers whose base GEMM and rank-r projections run as fused Triton kernels."""
from . import reference
from .functional import lora_linear
from .layer import LoRALinear

__all__ = ["lora_linear", "LoRALinear", "reference"]
__version__ = "0.1.0"
