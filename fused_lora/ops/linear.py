"""The fused LoRA linear as two torch.library custom ops with a kernel per device, so torch.compile
(fullgraph=True) sees one op per direction instead of tracing into the Triton launchers; and the eager
autograd.Function, which calls the same per-device kernels without the dispatcher.

Eager calls skip the dispatcher: a whole eager `lora_linear` forward on tiny CPU tensors (4x8 -> 6, r=2,
torch backend, 1000 calls, torch 2.13, a 2-core x86_64 machine) measured 146 us per call through the op
with its registered autograd and 68 us through the Function; on a GPU that difference is host overhead on
every layer. Both paths run the same kernels (``DEVICE_KERNELS``) and the same backward (`_lora_backward`).

    fused_lora::lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y2, S)
    fused_lora::lora_linear_bwd(dy2, x2, weight, lora_A, lora_B, S, scaling, dropout_p, seed,
                                need_dx, need_dA, need_dB) -> (dx2, dA, dB)

Per device: the CUDA and CPU kernels run the Triton kernels or the torch path as ``select_backend``
decides (FUSED_LORA_BACKEND, TRITON_INTERPRET); any other device runs the torch path. A C++ kernel
registered with TORCH_LIBRARY_IMPL(fused_lora, CPU, m) takes the CPU slot of the dispatcher.

x2 / y2 / dy2 are 2-D. ``seed`` is a 0-dim int64 tensor on x's device (a shared CPU zero without
dropout): a seed drawn inside a compiled region stays in the graph (a Python int from ``.item()``
would break it), and the kernels load it, so a CUDA graph replays with the value the tensor holds.
A gradient that is not needed comes back as an empty (0,) tensor: custom ops cannot return None.
"""
from __future__ import annotations

import torch

from .dispatch import op_backend
from ..dropout import seed_tensor


# The implementation of each device: a function of x giving the module (forward, backward) that computes
# the op for it. The dispatcher's kernels of the custom ops below and the eager Function both look here.
# Devices not listed run the custom ops' default: the same choice (the torch path off CUDA and CPU).
DEVICE_KERNELS = {"cuda": op_backend, "cpu": op_backend}


def _implementation(x):
    return DEVICE_KERNELS.get(x.device.type, op_backend)(x)


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return _implementation(x).forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _backward_op_outputs(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    dx, dA, dB = _implementation(x).backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed,
                                             need_dx, need_dA, need_dB)
    empty = lambda: x.new_empty((0,))  # one per output: outputs may not alias each other
    return (empty() if dx is None else dx,
            empty() if dA is None else dA.to(lora_A.dtype),
            empty() if dB is None else dB.to(lora_B.dtype))


@torch.library.custom_op("fused_lora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, r))


@torch.library.custom_op("fused_lora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, s: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor,
                    need_dx: bool, need_dA: bool, need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_op_outputs(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, need_dx, need_dA, need_dB)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    empty = lambda: x.new_empty((0,))
    return (x.new_empty(x.shape) if need_dx else empty(),
            lora_A.new_empty(lora_A.shape) if need_dA else empty(),
            lora_B.new_empty(lora_B.shape) if need_dB else empty())


# The CUDA slot of the dispatcher runs the Triton path (or the torch path when forced). The CPU slot is
# left to the C++ kernels (TORCH_LIBRARY_IMPL(fused_lora, CPU, m), registered when they load): until then,
# and on every other device, the custom ops' default implementation above runs, which looks up
# DEVICE_KERNELS as the eager path does.
lora_linear_fwd.register_kernel("cuda")(_forward)
lora_linear_bwd.register_kernel("cuda")(_backward_op_outputs)


def _lora_backward(ctx, dy, x, weight, lora_A, lora_B, s, seed, bwd):
    """(dx, dW, db, dA, dB) for the needed inputs; ``bwd`` computes dx, dA, dB as lora_linear_bwd does."""
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    dx = dA = dB = dW = db = None
    if need_dx or need_dA or need_dB:
        dx, dA, dB = bwd(dy, x, weight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, seed,
                         need_dx, need_dA, need_dB)
        dx, dA, dB = (g if need else None for g, need in ((dx, need_dx), (dA, need_dA), (dB, need_dB)))
    if need_dW:
        dW = torch.mm(dy.t(), x)
    if need_db and ctx.has_bias:
        db = dy.sum(0)
    return dx, dW, db, dA, dB


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, s = output
    # Saved: x and S (activations) plus the parameters, which are not copies.
    ctx.save_for_backward(x, weight, lora_A, lora_B, s, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _ds):
    return *_lora_backward(ctx, dy, *ctx.saved_tensors, bwd=lora_linear_bwd), None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class LoRALinearFunction(torch.autograd.Function):
    """The eager path: saves x (2-D) and S = dropout(x) A^T; the dropout mask is redrawn from the seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        ctx.implementation = _implementation(x)  # chosen once: backward reads no environment variable
        y, s = ctx.implementation.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_A, lora_B, s)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing refuses a second unpack
        dx, dW, db, dA, dB = _lora_backward(ctx, dy, *saved, ctx.seed, bwd=ctx.implementation.backward)
        dA = dA if dA is None or dA.dtype is saved[2].dtype else dA.to(saved[2].dtype)
        dB = dB if dB is None or dB.dtype is saved[3].dtype else dB.to(saved[3].dtype)
        return dx, dW, db, dA, dB, None, None, None


def lora_linear_2d(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed) -> torch.Tensor:
    """y = x W^T + b + s (dropout(x) A^T) B^T for 2-D x, by x's device's kernel; inputs validated.

    Under torch.compile this is one custom op per direction; in eager, the autograd.Function. ``seed``:
    an int, a 0-dim int64 tensor on x's device, or None (drawn from x's device's generator).
    """
    seed = seed_tensor(seed, dropout_p, x.device)
    if torch.compiler.is_compiling():
        y, _ = lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        return y
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
