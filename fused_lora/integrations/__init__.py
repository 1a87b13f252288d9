"""Interop with PEFT: patch_peft (PEFT's LoRA layers computing with the fused op) and PEFT's adapter files.
Neither peft nor safetensors is imported until a function here needs it."""
from .adapter_files import AdapterFormatError, load_adapter, save_adapter
from .peft_patch import FusedFallbackWarning, patch_peft, unpatch_peft

__all__ = ["patch_peft", "unpatch_peft", "FusedFallbackWarning", "save_adapter", "load_adapter", "AdapterFormatError"]
