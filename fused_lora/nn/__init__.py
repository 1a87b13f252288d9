"""Modules: LoRALinear (an nn.Linear drop-in) and inject / merge_and_unload for any torch model."""
from .inject import inject, merge_and_unload
from .linear import LoRALinear

__all__ = ["LoRALinear", "inject", "merge_and_unload"]
