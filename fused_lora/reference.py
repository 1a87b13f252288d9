"""Plain-PyTorch LoRA, written to be obviously right. The tests compare the op and the kernels to it.

lora_linear is the whole layer; lora_shrink, lora_fwd, lora_bwd_dy, lora_bwd_dx and lora_bwd_da are the
formulas of the launchers of the same names in fused_lora.kernels (2-D inputs, as the launchers take).
Each of those computes with torch ops in its inputs' dtype, the plain-torch baseline the tests' error
rule measures against, or with ``upcast=True`` in float64, returning float64: the reference itself.

With the same seed they apply exactly the keep-mask the kernels draw (fused_lora.dropout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import ALL_DTYPES, check_lora_inputs
from .dropout import draw_seed, dropout_keep_mask


def apply_dropout(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """x * keep / (1 - p), with keep drawn from (seed, row, column) of x flattened to 2-D; NaN / inf at a
    dropped position give NaN, as nn.Dropout's x * mask does."""
    K = x.shape[-1]
    keep = dropout_keep_mask(seed, x.numel() // max(K, 1), K, p, device=x.device).reshape(x.shape)
    return x * keep / (1.0 - p)


def _dropout_if(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    # p == 0 is the identity, as in the kernels (APPLY_DROPOUT off): no mask drawn, no 1 / (1 - p) rounding.
    return apply_dropout(x, p, seed) if p > 0.0 else x


def _operands(upcast: bool, *tensors):
    return tuple(t.double() if upcast and t is not None else t for t in tensors)


def lora_shrink(x, lora_A, *, dropout_p=0.0, seed=0, upcast=False):
    """S = dropout(x) A^T, (M, r)."""
    x, lora_A = _operands(upcast, x, lora_A)
    return F.linear(_dropout_if(x, dropout_p, seed), lora_A)


def lora_fwd(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, seed=0, upcast=False, s=None):
    """(y, S): y = x W^T + b + scaling * S B^T with S = dropout(x) A^T.

    s: an S to expand instead of computing it (returned as given, upcast too), which checks the base GEMM
    and the expand alone on a kernel's own S.
    """
    x, weight, bias, lora_B, s = _operands(upcast, x, weight, bias, lora_B, s)
    if s is None:
        s = lora_shrink(x, lora_A, dropout_p=dropout_p, seed=seed, upcast=upcast)
    return F.linear(x, weight, bias) + scaling * F.linear(s, lora_B), s


def lora_bwd_dy(dy, lora_B, s, scaling, *, upcast=False):
    """(dS, dB): dS = scaling * dY B, (M, r); dB = scaling * dY^T S, (N, r)."""
    dy, lora_B, s = _operands(upcast, dy, lora_B, s)
    # Scaled before the product: scaling * (dY B) rounds the product twice in a 16-bit dtype, while the
    # kernels scale the fp32 accumulator and round once; that baseline made test_kernels' dS / dB bounds
    # up to 2.2x looser (fp16 / bf16).
    dy = scaling * dy
    return dy @ lora_B, dy.t() @ s


def lora_bwd_dx(dy, weight, ds, lora_A, *, dropout_p=0.0, seed=0, upcast=False):
    """dX = dY W + dropout'(dS A), (M, K); dropout' multiplies by the forward's keep-mask for this seed and
    1 / (1 - p) (as x * mask: NaN / inf of dS A at a dropped position give NaN)."""
    dy, weight, ds, lora_A = _operands(upcast, dy, weight, ds, lora_A)
    return dy @ weight + _dropout_if(ds @ lora_A, dropout_p, seed)


def lora_bwd_da(ds, x, *, dropout_p=0.0, seed=0, upcast=False):
    """dA = dS^T dropout(x), (r, K)."""
    ds, x = _operands(upcast, ds, x)
    return ds.t() @ _dropout_if(x, dropout_p, seed)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, training=False, seed=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T."""
    check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                      dtypes=ALL_DTYPES, max_rank=None)
    if not (training and dropout_p > 0.0):
        return lora_fwd(x, weight, bias, lora_A, lora_B, scaling)[0]
    # The seed is drawn only when dropout applies: a draw advances the device's generator.
    seed = draw_seed(x.device) if seed is None else seed
    return lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, seed=seed)[0]


# ---- LoRA for Embedding -------------------------------------------------------------------------

def lora_embedding(ids, weight, lora_A, lora_B, scaling, *, padding_idx=None, scale_grad_by_freq=False):
    """y = E[ids] + scaling * (A^T[ids]) B^T as PEFT's lora.Embedding computes it: two F.embedding gathers
    (padding_idx and scale_grad_by_freq apply to both) and (A^T[ids] @ B^T) * scaling."""
    from ._validation import check_embedding_inputs

    check_embedding_inputs(ids, weight, lora_A, lora_B, scaling, padding_idx, dtypes=ALL_DTYPES, max_rank=None)
    after_A = F.embedding(ids, lora_A.t(), padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    base = F.embedding(ids, weight, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    return base + (after_A @ lora_B.t()) * scaling


def lora_embedding_fwd(ids, weight, lora_A, lora_B, scaling, *, upcast=False):
    """(y, S) of the forward launcher: S = A^T[ids] (M, r), y = E[ids] + scaling * S B^T (M, D); ids (M,)."""
    weight, lora_A, lora_B = _operands(upcast, weight, lora_A, lora_B)
    s = lora_A.t()[ids]
    return weight[ids] + scaling * (s @ lora_B.t()), s


def lora_embedding_bwd_da(ids, ds, num_embeddings, *, padding_idx=-1, scale_grad_by_freq=False, upcast=False):
    """dA (r, V) of the dA launcher: column v = sum of dS's rows over the tokens with id v (divided by
    their count with scale_grad_by_freq), the padding_idx column 0; torch's embedding backward."""
    ds, = _operands(upcast, ds)
    return torch.ops.aten.embedding_dense_backward(ds, ids, num_embeddings, padding_idx, scale_grad_by_freq).t()


# ---- DoRA (weight-decomposed LoRA) --------------------------------------------------------------

def dora_weight_norm(weight, lora_A, lora_B, scaling, *, upcast=False):
    """n = ||W + scaling B A||_2 per output row, (N,), as PEFT's DoraLinearLayer.get_weight_norm: it forms the
    N x K matrix (a reference; the kernels never do)."""
    weight, lora_A, lora_B = _operands(upcast, weight, lora_A, lora_B)
    return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_scale(magnitude, weight_norm):
    """m / n per output row, and 0 where n == 0: such a row has W_i + s (B A)_i = 0, so its pre-scale output
    is 0 and the row's output is the bias whatever the scale; PEFT's m / 0 gives inf or NaN there."""
    positive = weight_norm > 0
    return torch.where(positive, magnitude / torch.where(positive, weight_norm, 1.0), 0.0)


def dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, *, dropout_p=0.0, training=False, seed=None,
                upcast=False):
    """PEFT's DoRA layer (DoraLinearLayer.forward on top of the base layer):

        y = x W^T + b + (g - 1) * (x' W^T) + g * scaling * (x' A^T) B^T,   g = m / n,  n = ||W + s B A|| detached,

    x' = dropout(x) (x itself when dropout is off, and then y = g * (x W^T + s (x A^T) B^T) + b). Autograd
    gives every gradient, with no gradient through n, as PEFT. g = 0 where n = 0 (``dora_scale``).
    upcast=True computes in float64 and returns float64.
    """
    check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, dtypes=ALL_DTYPES, max_rank=None)
    x, weight, bias, lora_A, lora_B, magnitude = _operands(upcast, x, weight, bias, lora_A, lora_B, magnitude)
    n = dora_weight_norm(weight, lora_A, lora_B, scaling).detach()
    g = dora_scale(magnitude.to(n.dtype) if upcast else magnitude, n).to(x.dtype)
    if training and dropout_p > 0.0:
        seed = draw_seed(x.device) if seed is None else seed
        x_lora = apply_dropout(x, dropout_p, seed)
        base = F.linear(x_lora, weight)
        return F.linear(x, weight, bias) + (g - 1) * base + g * (scaling * F.linear(F.linear(x_lora, lora_A), lora_B))
    z = F.linear(x, weight) + scaling * F.linear(F.linear(x, lora_A), lora_B)
    return g * z + bias if bias is not None else g * z


def dora_fwd(x, weight, bias, lora_A, lora_B, scaling, magnitude, norm, *, dropout_p=0.0, seed=0, upcast=False,
             s=None):
    """(y, S, Z) of the DoRA forward launcher, g = dora_scale(m, n): without dropout y = g (x W^T + scaling S B^T)
    + b with S = x A^T, Z None; with dropout (x' = dropout(x), S = x' A^T) Z = x' W^T + scaling S B^T and
    y = x W^T + b + g Z - x' W^T. ``s``: an S to expand instead of computing it."""
    x, weight, bias, lora_A, lora_B, magnitude, norm, s = _operands(upcast, x, weight, bias, lora_A, lora_B,
                                                                    magnitude, norm, s)
    x_lora = _dropout_if(x, dropout_p, seed)
    s = F.linear(x_lora, lora_A) if s is None else s
    g = dora_scale(magnitude.to(norm.dtype), norm).to(x.dtype)
    if dropout_p > 0.0:
        base_lora = F.linear(x_lora, weight)
        z = base_lora + scaling * F.linear(s, lora_B)
        return F.linear(x, weight, bias) + g * z - base_lora, s, z
    z = F.linear(x, weight) + scaling * F.linear(s, lora_B)
    return (g * z + bias if bias is not None else g * z), s, None


def dora_bwd(dy, x, weight, bias, lora_A, lora_B, scaling, magnitude, norm, s, saved, *, dropout_p=0.0, seed=0,
             upcast=False, ds=None):
    """(dX, dA, dB, dm) of the DoRA backward launchers, from the forward's S and ``saved`` (y without dropout,
    Z with): dZ = g dY, dS = scaling dZ B, dB = scaling dZ^T S, dA = dS^T x'. Without dropout dX = dZ W + dS A
    and dm = sum_i dY (y - b) / m (= sum_i dY z / n), z recomputed where m = 0; with dropout
    dX = dY W + dropout'((g - 1) dY W + dS A) and dm = sum_i dY Z / n. dm = 0 where n = 0. ``ds``: a dS to use
    for dX and dA instead of computing it (checks those launches alone on the dS pass's own dS)."""
    dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, ds = _operands(
        upcast, dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, ds)
    g = dora_scale(magnitude.to(norm.dtype), norm).to(dy.dtype)
    dz = dy * g
    ds = scaling * dz @ lora_B if ds is None else ds
    m = magnitude.to(norm.dtype)
    n_safe = torch.where(norm > 0, norm, 1.0)
    if dropout_p > 0.0:
        dx = dy @ weight + _dropout_if((dy * (g - 1)) @ weight + ds @ lora_A, dropout_p, seed)
        dm = (dy.to(norm.dtype) * saved.to(norm.dtype)).sum(0) / n_safe
    else:
        dx = dz @ weight + ds @ lora_A
        u = (saved - bias if bias is not None else saved).to(norm.dtype)
        z_lost = (F.linear(x, weight) + scaling * F.linear(s, lora_B)).to(norm.dtype)
        dm = torch.where(m != 0, (dy.to(norm.dtype) * u).sum(0) / torch.where(m != 0, m, 1.0),
                         (dy.to(norm.dtype) * z_lost).sum(0) / n_safe)
    dm = torch.where(norm > 0, dm, 0.0)
    return dx, ds.t() @ _dropout_if(x, dropout_p, seed), scaling * dz.t() @ s, dm
