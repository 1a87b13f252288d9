"""LoRAEmbedding: a drop-in nn.Embedding with a trainable low-rank update, computed by lora_embedding."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._lora_module import LoRAModuleMixin
from .._validation import check_embedding_options
from ..functional_embedding import lora_embedding


def is_plain_embedding(module: nn.Module) -> bool:
    """nn.Embedding, or a subclass that keeps its forward (a subclass computing something else, such as a
    scaled embedding, is not one the fused op can stand in for)."""
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward


class LoRAEmbedding(LoRAModuleMixin, nn.Module):
    """y = E[ids] + s * (A^T[ids]) B^T, with E frozen, A = lora_embedding_A (r, num_embeddings) and
    B = lora_embedding_B (embedding_dim, r) trainable: PEFT's lora.Embedding.

    s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. A is zero and B standard normal at
    initialisation (PEFT's init for embeddings), so a new layer computes exactly what the base layer does.
    padding_idx and scale_grad_by_freq act as in nn.Embedding, on E and on A^T alike (PEFT passes them
    to both gathers). max_norm and sparse=True are refused (ValueError) at construction. lora_dropout is
    recorded but never applied: PEFT's lora.Embedding creates its dropout module and does not call it.

    ``merge()`` folds s (B A)^T into E (computed in fp32, in place, so a table shared with a tied output
    head changes for the head too, as in PEFT); ``unmerge()`` subtracts it again. state_dict records
    ``merged`` (key ``_extra_state``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 max_norm: float | None = None, scale_grad_by_freq: bool = False, sparse: bool = False,
                 device=None, dtype=None):
        super().__init__()
        check_embedding_options(max_norm, sparse, where="LoRAEmbedding")
        base = nn.Embedding(num_embeddings, embedding_dim, padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                            device=device, dtype=dtype)
        self._setup(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)

    def _setup(self, base: nn.Embedding, *, r, lora_alpha, lora_dropout, use_rslora):
        self._set_lora_config(r, lora_alpha, lora_dropout, use_rslora)
        self.num_embeddings, self.embedding_dim = base.weight.shape
        self.padding_idx = base.padding_idx
        self.max_norm, self.norm_type = None, base.norm_type
        self.scale_grad_by_freq = bool(base.scale_grad_by_freq)
        self.sparse = False
        self.weight = base.weight
        self.weight.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, **factory))
        self.reset_lora_parameters()

    @classmethod
    def from_embedding(cls, embedding: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                       use_rslora: bool = False) -> "LoRAEmbedding":
        """Wrap an existing nn.Embedding; shares (and freezes) its weight, so a tied output head keeps
        reading the same parameter. The new layer takes the wrapped module's training mode."""
        if not is_plain_embedding(embedding):
            what = type(embedding).__name__
            if isinstance(embedding, nn.Embedding):
                raise TypeError(f"from_embedding expects an nn.Embedding; {what} overrides forward, which the "
                                f"fused op would bypass")
            raise TypeError(f"from_embedding expects an nn.Embedding, got {what}")
        check_embedding_options(embedding.max_norm, embedding.sparse, where="LoRAEmbedding.from_embedding")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(embedding, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
        layer.train(embedding.training)
        return layer

    # PEFT's names are lora_embedding_A / _B; the package's generic code (inject's freezing) reads lora_A / lora_B.
    @property
    def lora_A(self) -> nn.Parameter:
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.lora_embedding_B

    @property
    def fan_in_fan_out(self) -> bool:
        return False

    def reset_lora_parameters(self) -> None:
        # PEFT's init_lora_weights=True for embeddings: zero A, normal B.
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.embedding(ids, self.weight, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        return lora_embedding(ids, self.weight, self.lora_embedding_A, self.lora_embedding_B, self.scaling,
                              padding_idx=self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)

    # ---- merging -------------------------------------------------------------------------------

    def _delta_fp32(self) -> torch.Tensor:
        """s (B A)^T in fp32, (num_embeddings, embedding_dim)."""
        return (self.lora_embedding_B.detach().float() @ self.lora_embedding_A.detach().float()).t() * self.scaling

    def to_base_layer(self) -> nn.Embedding:
        """A plain nn.Embedding sharing this layer's weight tensor."""
        base = nn.Embedding.__new__(nn.Embedding)
        nn.Module.__init__(base)
        base.num_embeddings, base.embedding_dim = self.num_embeddings, self.embedding_dim
        base.padding_idx, base.max_norm, base.norm_type = self.padding_idx, None, self.norm_type
        base.scale_grad_by_freq, base.sparse = self.scale_grad_by_freq, False
        base.weight = self.weight
        base.train(self.training)
        return base

    def _name(self) -> str:
        return f"LoRAEmbedding({self.num_embeddings}, {self.embedding_dim}, r={self.r})"

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + (", scale_grad_by_freq=True" if self.scale_grad_by_freq else "")
                + f", r={self.r}, lora_alpha={self.lora_alpha}" + (", use_rslora=True" if self.use_rslora else "")
                + (", merged=True" if self.merged else ""))
