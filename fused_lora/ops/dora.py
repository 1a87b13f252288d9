"""DoRA as torch.library custom ops (torch.compile sees one op per direction), and the eager
autograd.Function calling the same implementations without the dispatcher.

    fused_lora::dora_weight_norm(weight, lora_A, lora_B, scaling) -> n (N,) fp32, ||W + s B A|| per row
    fused_lora::dora_linear_fwd(x2, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed)
        -> (y2, S, Z)
    fused_lora::dora_linear_bwd(dy2, x2, weight, bias, lora_A, lora_B, magnitude, norm, S, saved, scaling,
        dropout_p, seed, need_dx, need_dA, need_dB, need_dm) -> (dx2, dA, dB, dm)

The norm is an input of the forward, computed outside it and never differentiated (PEFT and the DoRA paper
detach it). The activations saved for the backward: x and S, and one (M, N) tensor, which the magnitude's
gradient needs (dm_j = sum_i dY_ij z_ij / n_j, z the pre-scale output): without dropout it is the op's own
output y (z = (y - b) / g; autograd keeps y alive for the next layer anyway, so it costs no memory), with
dropout it is Z = z' = x' W^T + s S' B^T, which y no longer holds. A gradient that is not needed comes back as
an empty (0,) tensor: custom ops cannot return None.

Implementation per call: the Triton kernels (fused_lora.ops.dora_triton) when ``dispatch.select_backend``
says "triton", else the torch path (fused_lora.ops.dora_torch; "cpp" too: there is no C++ DoRA kernel). DoRA
with dropout needs a second base product, x' W^T beside x W^T, which PEFT's semantics require (the base
layer sees x, the DoRA term x'): the kernels compute both from the same W tiles in one loop, forward and dX.
"""
from __future__ import annotations

import torch

from . import dora_torch
from .dispatch import select_backend
from ..dropout import seed_tensor


def _uses_triton(x: torch.Tensor) -> bool:
    return select_backend(x) == "triton"


def _kernels():
    from . import dora_triton  # imports triton: only when the kernels are used
    return dora_triton


def _implementation(x):
    return _kernels() if _uses_triton(x) else dora_torch


def _weight_norm(weight, lora_A, lora_B, scaling):
    return (_kernels() if _uses_triton(weight) else dora_torch).weight_norm(weight, lora_A, lora_B, scaling)


@torch.library.custom_op("fused_lora::dora_weight_norm", mutates_args=())
def dora_weight_norm_op(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
                        ) -> torch.Tensor:
    return _weight_norm(weight, lora_A, lora_B, scaling)


@dora_weight_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling):
    return weight.new_empty((weight.shape[0],), dtype=dora_torch.norm_dtype(weight.dtype))


def weight_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """n (N,) fp32 (float64 for float64 W), detached; inputs validated."""
    if torch.compiler.is_compiling():
        return dora_weight_norm_op(weight, lora_A, lora_B, scaling)
    with torch.no_grad():
        return _weight_norm(weight, lora_A, lora_B, scaling)


def _forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed):
    return _implementation(x).forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling,
                                                 dropout_p, seed)


def _backward_op_outputs(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, scaling, dropout_p, seed,
                         need_dx, need_dA, need_dB, need_dm):
    grads = _implementation(x).backward(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved,
                                                   scaling, dropout_p, seed, need_dx, need_dA, need_dB, need_dm)
    return _as_outputs(grads, x, lora_A, lora_B, magnitude)


def _as_outputs(grads, x, lora_A, lora_B, magnitude):
    dx, dA, dB, dm = grads
    empty = lambda: x.new_empty((0,))  # one per output: outputs may not alias each other
    return (empty() if dx is None else dx,
            empty() if dA is None else dA.to(lora_A.dtype),
            empty() if dB is None else dB.to(lora_B.dtype),
            empty() if dm is None else dm.to(magnitude.dtype))


@torch.library.custom_op("fused_lora::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
                    dropout_p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed)


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed):
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, r)), (x.new_empty((M, N)) if dropout_p > 0.0 else x.new_empty((0,)))


@torch.library.custom_op("fused_lora::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                    s: torch.Tensor, saved: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor,
                    need_dx: bool, need_dA: bool, need_dB: bool, need_dm: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_op_outputs(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, scaling, dropout_p,
                                seed, need_dx, need_dA, need_dB, need_dm)


@dora_linear_bwd.register_fake
def _(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, scaling, dropout_p, seed,
      need_dx, need_dA, need_dB, need_dm):
    empty = lambda: x.new_empty((0,))
    return (x.new_empty(x.shape) if need_dx else empty(),
            lora_A.new_empty(lora_A.shape) if need_dA else empty(),
            lora_B.new_empty(lora_B.shape) if need_dB else empty(),
            magnitude.new_empty(magnitude.shape) if need_dm else empty())


dora_weight_norm_op.register_kernel("cuda")(_weight_norm)
dora_linear_fwd.register_kernel("cuda")(_forward)
dora_linear_bwd.register_kernel("cuda")(_backward_op_outputs)


def _dora_backward(ctx, dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, seed, bwd):
    """(dx, dW, db, dA, dB, dm) for the needed inputs; ``bwd`` computes dx, dA, dB, dm as dora_linear_bwd does."""
    need_dx, need_dW, need_db, need_dA, need_dB, need_dm = ctx.needs_input_grad[:6]
    dx = dA = dB = dm = dW = db = None
    if need_dx or need_dA or need_dB or need_dm:
        grads = bwd(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, ctx.scaling, ctx.dropout_p, seed,
                    need_dx, need_dA, need_dB, need_dm)
        dx, dA, dB, dm = (g if need else None for g, need in zip(grads, (need_dx, need_dA, need_dB, need_dm)))
    if need_dW:
        dW = dora_torch.weight_grad(dy, x, magnitude, norm, ctx.dropout_p, seed)
    if need_db and bias is not None:
        db = dy.sum(0)
    return dx, dW, db, dA, dB, dm


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed = inputs
    y, s, z = output
    # Saved: x, S and y (the output) or Z (with dropout), plus the parameters, which are not copies.
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, norm, s, z if dropout_p > 0.0 else y, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _backward(ctx, dy, _ds, _dz):
    return (*_dora_backward(ctx, dy, *ctx.saved_tensors, bwd=dora_linear_bwd), None, None, None, None)


dora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class DoRALinearFunction(torch.autograd.Function):
    """The eager path; the implementation is chosen once in forward (backward reads no environment)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed):
        impl = _implementation(x)
        y, s, z = impl.forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed)
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, norm, s, z if dropout_p > 0.0 else y)
        ctx.implementation = impl
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing refuses a second unpack
        x, lora_A, lora_B, magnitude = saved[0], saved[3], saved[4], saved[5]
        bwd = lambda *args: _as_outputs(ctx.implementation.backward(*args), x, lora_A, lora_B, magnitude)
        grads = _dora_backward(ctx, dy.contiguous(), *saved, ctx.seed, bwd=bwd)
        return (*grads, None, None, None, None)


def dora_linear_2d(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling: float, dropout_p: float, seed):
    """y (M, N) for 2-D x, inputs validated, norm = weight_norm(...) (N,) fp32."""
    seed = seed_tensor(seed, dropout_p, x.device)
    if torch.compiler.is_compiling():
        y, _, _ = dora_linear_fwd(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed)
        return y
    return DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed)
