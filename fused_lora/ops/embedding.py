"""LoRA for Embedding as two torch.library custom ops (torch.compile sees one op per direction), and the
eager autograd.Function calling the same implementations without the dispatcher.

    fused_lora::lora_embedding_fwd(ids, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq)
        -> (y2, S)
    fused_lora::lora_embedding_bwd(dy2, ids, lora_B, S, scaling, num_embeddings, padding_idx,
        scale_grad_by_freq, need_dE, need_dA, need_dB) -> (dE, dA, dB)

ids is 1-D (M,), y2 / dy2 are (M, D); S = A^T[ids] (M, r) is the saved activation. padding_idx is -1 for
none, else in [0, V). The forward raises IndexError for an id outside [0, V) (fused_lora._validation.
check_ids_in_range; inside the op, so it also runs under torch.compile). A gradient that is not needed comes
back as an empty (0,) tensor: custom ops cannot return None.

Implementation per call: the Triton kernels when ``dispatch.select_backend`` says "triton" (CUDA, or CPU
under TRITON_INTERPRET=1), else the torch path (fused_lora.ops.embedding_torch; "cpp" and "torch" both:
there is no C++ kernel for embedding). The CUDA slot of the custom ops is registered; every other device
runs their default implementation, which makes the same choice.
"""
from __future__ import annotations

import torch

from .._validation import check_ids_in_range
from . import embedding_torch
from .dispatch import select_backend


def _uses_triton(weight: torch.Tensor) -> bool:
    return select_backend(weight) == "triton"


def _kernels():
    from ..kernels import lora_embedding  # imports triton: only when the kernels are used
    return lora_embedding


def _forward(ids, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq):
    check_ids_in_range(ids, weight.shape[0])
    if _uses_triton(weight):
        return _kernels().lora_embedding_fwd(ids, weight, lora_A, lora_B, scaling)
    return embedding_torch.forward(ids, weight, lora_A, lora_B, scaling)


def _grads(dy, ids, lora_B, s, scaling, num_embeddings, padding_idx, scale_grad_by_freq, need_dE, need_dA, need_dB,
           *, triton: bool):
    """(dE or None, dA or None, dB or None); dA and dB in B's dtype (A shares it), dE in dY's."""
    dE = dA = dB = None
    if need_dA or need_dB:
        if triton:
            dA, dB = _kernels().lora_embedding_bwd(dy, ids, lora_B, s, scaling, num_embeddings,
                                                   padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                                                   need_dA=need_dA, need_dB=need_dB)
        else:
            dA, dB = embedding_torch.backward(dy, ids, lora_B, s, scaling, num_embeddings, padding_idx,
                                              scale_grad_by_freq, need_dA, need_dB)
    if need_dE:
        dE = torch.ops.aten.embedding_dense_backward(dy, ids, num_embeddings, padding_idx, scale_grad_by_freq)
    return dE, dA, dB


def _backward_op_outputs(dy, ids, lora_B, s, scaling, num_embeddings, padding_idx, scale_grad_by_freq,
                         need_dE, need_dA, need_dB):
    grads = _grads(dy, ids, lora_B, s, scaling, num_embeddings, padding_idx, scale_grad_by_freq, need_dE, need_dA,
                   need_dB, triton=_uses_triton(dy))
    return tuple(dy.new_empty((0,)) if g is None else g for g in grads)  # one per output: no aliasing


@torch.library.custom_op("fused_lora::lora_embedding_fwd", mutates_args=())
def lora_embedding_fwd(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                       scaling: float, padding_idx: int, scale_grad_by_freq: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(ids, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq)


@lora_embedding_fwd.register_fake
def _(ids, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq):
    M, D, r = ids.shape[0], weight.shape[1], lora_A.shape[0]
    return weight.new_empty((M, D)), weight.new_empty((M, r))


@torch.library.custom_op("fused_lora::lora_embedding_bwd", mutates_args=())
def lora_embedding_bwd(dy: torch.Tensor, ids: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float,
                       num_embeddings: int, padding_idx: int, scale_grad_by_freq: bool, need_dE: bool, need_dA: bool,
                       need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_op_outputs(dy, ids, lora_B, s, scaling, num_embeddings, padding_idx, scale_grad_by_freq,
                                need_dE, need_dA, need_dB)


@lora_embedding_bwd.register_fake
def _(dy, ids, lora_B, s, scaling, num_embeddings, padding_idx, scale_grad_by_freq, need_dE, need_dA, need_dB):
    D, r = lora_B.shape
    empty = lambda: dy.new_empty((0,))
    return (dy.new_empty((num_embeddings, D)) if need_dE else empty(),
            lora_B.new_empty((r, num_embeddings)) if need_dA else empty(),
            lora_B.new_empty((D, r)) if need_dB else empty())


lora_embedding_fwd.register_kernel("cuda")(_forward)
lora_embedding_bwd.register_kernel("cuda")(_backward_op_outputs)


def _setup_context(ctx, inputs, output):
    ids, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq = inputs
    _, s = output
    ctx.save_for_backward(ids, lora_B, s)  # ids and S: the activations; B is the parameter, not a copy
    ctx.scaling, ctx.padding_idx, ctx.scale_grad_by_freq = scaling, padding_idx, scale_grad_by_freq
    ctx.num_embeddings = weight.shape[0]


def _backward(ctx, dy, _ds):
    ids, lora_B, s = ctx.saved_tensors
    need_dE, need_dA, need_dB = ctx.needs_input_grad[1:4]
    dE, dA, dB = lora_embedding_bwd(dy, ids, lora_B, s, ctx.scaling, ctx.num_embeddings, ctx.padding_idx,
                                    ctx.scale_grad_by_freq, need_dE, need_dA, need_dB)
    return (None, dE if need_dE else None, dA if need_dA else None, dB if need_dB else None, None, None, None)


lora_embedding_fwd.register_autograd(_backward, setup_context=_setup_context)


class LoRAEmbeddingFunction(torch.autograd.Function):
    """The eager path: saves ids (1-D) and S = A^T[ids]; the implementation is chosen once in forward."""

    @staticmethod
    def forward(ctx, ids, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq):
        check_ids_in_range(ids, weight.shape[0])
        ctx.triton = _uses_triton(weight)
        if ctx.triton:
            y, s = _kernels().lora_embedding_fwd(ids, weight, lora_A, lora_B, scaling)
        else:
            y, s = embedding_torch.forward(ids, weight, lora_A, lora_B, scaling)
        ctx.save_for_backward(ids, lora_B, s)
        ctx.scaling, ctx.padding_idx, ctx.scale_grad_by_freq = scaling, padding_idx, scale_grad_by_freq
        ctx.num_embeddings = weight.shape[0]
        return y

    @staticmethod
    def backward(ctx, dy):
        ids, lora_B, s = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing refuses a second unpack
        need_dE, need_dA, need_dB = ctx.needs_input_grad[1:4]
        dE, dA, dB = _grads(dy.contiguous(), ids, lora_B, s, ctx.scaling, ctx.num_embeddings, ctx.padding_idx,
                            ctx.scale_grad_by_freq, need_dE, need_dA, need_dB, triton=ctx.triton)
        return None, dE, dA, dB, None, None, None


def lora_embedding_1d(ids, weight, lora_A, lora_B, scaling: float, padding_idx: int,
                      scale_grad_by_freq: bool) -> torch.Tensor:
    """y (M, D) for 1-D contiguous ids, inputs validated; padding_idx -1 for none."""
    if torch.compiler.is_compiling():
        y, _ = lora_embedding_fwd(ids, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq)
        return y
    return LoRAEmbeddingFunction.apply(ids, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq)
