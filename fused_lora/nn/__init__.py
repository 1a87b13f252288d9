"""Modules: LoRALinear (an nn.Linear drop-in), LoRAEmbedding (an nn.Embedding drop-in) and inject / merge_and_unload for any torch model."""
from .inject import inject, merge_and_unload
from .embedding import LoRAEmbedding
from .linear import LoRALinear

__all__ = ["LoRALinear", "LoRAEmbedding", "inject", "merge_and_unload"]
