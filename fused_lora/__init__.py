"""fused_lora: LoRA linear and embedding layers whose base GEMM and rank-r projections run as fused Triton kernels.

Importing it imports neither triton, peft, transformers nor safetensors, and does not touch CUDA.
"""
from . import reference
from .integrations.adapter_files import AdapterFormatError, load_adapter, save_adapter
from .functional import lora_linear
from .functional_embedding import lora_embedding
from .functional_dora import dora_linear, dora_weight_norm
from .nn.inject import inject, merge_and_unload
from .nn.linear import LoRALinear
from .nn.embedding import LoRAEmbedding
from .integrations.peft_patch import FusedFallbackWarning, patch_peft, unpatch_peft

__all__ = ["lora_linear", "dora_linear", "dora_weight_norm", "lora_embedding", "LoRAEmbedding", "LoRALinear", "reference", "patch_peft", "unpatch_peft", "inject", "merge_and_unload",
           "save_adapter", "load_adapter", "AdapterFormatError", "FusedFallbackWarning"]
__version__ = "0.1.0"
