"""fused_lora.dora_linear and dora_weight_norm: input checks and backend choice; the op is in ops/dora.py."""
from __future__ import annotations

import math

import torch

from . import reference
from ._validation import ALL_DTYPES, check_dora_inputs, check_lora_inputs
from .functional import _autocast_inputs, _autocasting, forced_backend_for
from .ops.dora import dora_linear_2d, weight_norm as _weight_norm


def dora_weight_norm(weight, lora_A, lora_B, scaling) -> torch.Tensor:
    """n = ||W + scaling B A||_2 per output row: (N,) float32 (float64 for float64 weight), no gradient (DoRA
    detaches it).

    Never forms the N x K matrix: the Triton kernel builds W + s B A tile by tile in registers, the torch path
    256 rows at a time; both accumulate in fp32. weight (N, K), lora_A (r, K), lora_B (N, r), one dtype.
    """
    check_lora_inputs(weight[:0], weight, None, lora_A, lora_B, scaling, 0.0, None, dtypes=ALL_DTYPES)
    forced_backend_for(weight, "weight")
    return _weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), float(scaling))


def dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, *, dropout_p=0.0, training=False, seed=None,
                weight_norm=None):
    """PEFT's DoRA layer: y = x W^T + b + (g - 1) (x' W^T) + g * scaling * (x' A^T) B^T with g = m / n,
    n = ||W + scaling B A||_2 per output row (detached: no gradient flows through it, as in PEFT), x' = dropout(x).
    Without dropout (eval, or dropout_p = 0) this is y = g * (x W^T + scaling (x A^T) B^T) + b.

    magnitude m: (N,), any floating dtype (PEFT's lora_magnitude_vector); its gradient comes back in its dtype.
    weight_norm: n from ``dora_weight_norm`` when the caller caches it (it must belong to these W, A, B and
    scaling); None computes it. Where n = 0 the scale g is 0 (that row's output is the bias, its pre-scale
    output being 0), never NaN. Other arguments as ``lora_linear``; differentiable in x, lora_A, lora_B,
    magnitude, and weight / bias when they require grad.
    """
    if isinstance(x, torch.Tensor) and _autocasting(x.device.type):
        x, weight, bias, lora_A, lora_B = _autocast_inputs(x.device.type, x, weight, bias, lora_A, lora_B)
    check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, dtypes=ALL_DTYPES)
    check_dora_inputs(x, weight, magnitude, weight_norm)
    backend = forced_backend_for(x, "x")
    scaling = float(scaling)
    dropout_p = float(dropout_p) if training else 0.0
    if backend == "reference":
        return reference.dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, dropout_p=dropout_p,
                                     training=training, seed=seed)
    if weight_norm is None:
        weight_norm = _weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)
    K, N = x.shape[-1], weight.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), K)
    y2 = dora_linear_2d(x2, weight, bias, lora_A, lora_B, magnitude, weight_norm.detach(), scaling, dropout_p, seed)
    return y2 if x.dim() == 2 else y2.reshape(*x.shape[:-1], N)
