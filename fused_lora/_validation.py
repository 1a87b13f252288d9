"""Input checks shared by every backend: each error names the tensor and the shape it should have."""
from __future__ import annotations

import math
import re

import torch

from .dropout import MAX_SEED

MAX_RANK = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALL_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, *,
                      dtypes=KERNEL_DTYPES, max_rank: int | None = MAX_RANK) -> None:
    # One pass in the common case: this runs on every call, and at a few tokens a layer's time is host time.
    tensors = (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)) + \
        ((("bias", bias),) if bias is not None else ())
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dtype, device = x.dtype, x.device
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype is not dtype or t.device != device:
            _check_dtypes_and_devices(tensors, dtypes)
    if dtype not in dtypes:
        _check_dtypes_and_devices(tensors, dtypes)

    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., {K}) to match weight (N={N}, K={K}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},) to match weight (N={N}, K={K}), got {tuple(bias.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape (r, {K}) to match weight's in_features, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A must have shape (r, {K}) with r >= 1, got {tuple(lora_A.shape)}")
    if max_rank is not None and r > max_rank:
        raise ValueError(f"lora_A has rank r={r}; fused_lora supports 1 <= r <= {max_rank} "
                         f"(lora_A must be (r, {K}) with r <= {max_rank})")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must have shape ({N}, {r}) to match weight's out_features and lora_A's rank "
                         f"r={r}, got {tuple(lora_B.shape)}")
    if K >= 2**31 or N >= 2**31 or x.numel() // max(K, 1) >= 2**31:
        raise ValueError(f"x has shape {tuple(x.shape)}: fused_lora needs fewer than 2**31 rows, columns and outputs")

    # abs(s) < inf instead of math.isfinite: it also traces when torch.compile(dynamic=True) makes s a SymFloat.
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)) or not abs(scaling) < math.inf:
        raise TypeError(f"scaling must be a finite Python float, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0 or seed.device != x.device:
            raise ValueError(f"seed must be an int in [0, 2**63) or a 0-dim torch.int64 tensor on x's device "
                             f"{x.device}, got a tensor of dtype {seed.dtype}, shape {tuple(seed.shape)} on {seed.device}")
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an int in [0, 2**63) or a 0-dim torch.int64 tensor on x's device, got {seed!r}")


def _check_dtypes_and_devices(tensors, dtypes) -> None:
    """Raises the error that names the first tensor of the wrong kind, dtype or device."""
    x = tensors[0][1]
    for name, t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d) for d in dtypes)
            raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are {names}")
    for name, t in tensors:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; all tensors must share x's dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on device {t.device} but x is on {x.device}; all tensors must be on one device")


# ---- LoRA hyper-parameters ------------------------------------------------------------------------

# The kernels take scaling as a float32 scalar: a larger finite Python float would reach them as inf.
MAX_SCALING = torch.finfo(torch.float32).max


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


# name: (type test, value test, what is expected: read after "must be" and after "expected").
LORA_CONFIG_RULES = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool), lambda v: 1 <= v <= MAX_RANK,
          f"a positive int (fused_lora supports 1 <= r <= {MAX_RANK})"),
    "lora_alpha": (_is_real, _is_finite, "a finite number (int or float)"),
    "lora_dropout": (_is_real, lambda v: 0.0 <= v < 1.0, "in [0, 1) (an int or float)"),
    "use_rslora": (lambda v: isinstance(v, bool), lambda v: True, "a bool"),
}


def lora_config_error(name: str, value) -> tuple[type[Exception], str] | None:
    """(TypeError or ValueError, what is expected) when ``value`` is not a valid LoRA hyper-parameter ``name``
    (a key of LORA_CONFIG_RULES); None when it is valid."""
    is_type, is_valid, expected = LORA_CONFIG_RULES[name]
    if not is_type(value):
        return TypeError, expected
    if not is_valid(value):
        return ValueError, expected
    return None


def check_lora_config(r, lora_alpha, lora_dropout, use_rslora) -> float:
    """Check a LoRA layer's hyper-parameters and return its scaling: lora_alpha / r, or / sqrt(r) with use_rslora.

    Raises TypeError (wrong type) or ValueError (out of range) naming the argument, its value and what is
    expected; ValueError too when the scaling is above float32's range.
    """
    for name, value in (("r", r), ("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout),
                        ("use_rslora", use_rslora)):
        error = lora_config_error(name, value)
        if error is not None:
            exc_type, expected = error
            got = f"{value!r} ({type(value).__name__})" if exc_type is TypeError else repr(value)
            raise exc_type(f"{name}={got}: {name} must be {expected}")
    scaling = float(lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r)
    if not abs(scaling) <= MAX_SCALING:
        rule = "lora_alpha / sqrt(r) (use_rslora=True)" if use_rslora else "lora_alpha / r"
        raise ValueError(f"lora_alpha={lora_alpha!r} with r={r} gives scaling = {rule} = {scaling:g}; the kernels "
                         f"take scaling as a float32, so |scaling| must be <= {MAX_SCALING:g}")
    return scaling


def regex_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid regex (re's message), or None."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return None


# ---- LoRA for Embedding -------------------------------------------------------------------------

ID_DTYPES = (torch.int32, torch.int64)


def check_embedding_inputs(ids, weight, lora_A, lora_B, scaling, padding_idx, *, dtypes=KERNEL_DTYPES,
                           max_rank: int | None = MAX_RANK) -> int:
    """Checks the inputs of lora_embedding; returns padding_idx normalised to [0, V), or -1 for None.

    ids: int32 / int64 (...); weight: (V, D); lora_A: (r, V); lora_B: (D, r), all floating-point of one
    dtype and on ids' device. Each error names the argument and what it should be.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"ids has dtype {ids.dtype}; expected torch.int64 or torch.int32 token ids")
    tensors = (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors:
        if not t.is_floating_point() or t.dtype not in dtypes:
            names = ", ".join(str(d) for d in dtypes)
            raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are {names}")
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but weight has dtype {weight.dtype}; lora_A and lora_B "
                            f"must share weight's dtype")
        if t.device != weight.device:
            raise ValueError(f"{name} is on device {t.device} but weight is on {weight.device}; all tensors must "
                             f"be on one device")
    if weight.device != ids.device:
        raise ValueError(f"ids is on device {ids.device} but weight is on {weight.device}; all tensors must be on "
                         f"one device")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_embeddings, embedding_dim), got shape {tuple(weight.shape)}")
    V, D = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != V:
        raise ValueError(f"lora_A (lora_embedding_A) must have shape (r, {V}) to match weight's num_embeddings, "
                         f"got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A (lora_embedding_A) must have shape (r, {V}) with r >= 1, got {tuple(lora_A.shape)}")
    if max_rank is not None and r > max_rank:
        raise ValueError(f"lora_A has rank r={r}; fused_lora supports 1 <= r <= {max_rank}")
    if tuple(lora_B.shape) != (D, r):
        raise ValueError(f"lora_B (lora_embedding_B) must have shape ({D}, {r}) to match weight's embedding_dim "
                         f"and lora_A's rank r={r}, got {tuple(lora_B.shape)}")
    if V >= 2**31 or D >= 2**31 or ids.numel() >= 2**31:
        raise ValueError(f"weight {tuple(weight.shape)} and ids {tuple(ids.shape)}: fused_lora needs fewer than "
                         f"2**31 embeddings, columns and tokens")
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)) or not abs(scaling) < math.inf:
        raise TypeError(f"scaling must be a finite Python float, got {scaling!r}")
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -V <= padding_idx < V:
        raise ValueError(f"padding_idx must be None or an int in [-{V}, {V}) (num_embeddings={V}), "
                         f"got {padding_idx!r}")
    return padding_idx + V if padding_idx < 0 else padding_idx


def check_ids_in_range(ids: torch.Tensor, num_embeddings: int) -> None:
    """IndexError naming the smallest / largest id unless every id is in [0, num_embeddings).

    One reduction and one device-to-host copy (a synchronisation on CUDA); the kernels never read out of
    bounds either way (they mask ids outside the table).
    """
    if ids.numel() == 0 or ids.device.type == "meta":  # meta: no values (the benchmark's traced runs)
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= num_embeddings:
        bad = low if low < 0 else high
        raise IndexError(f"ids contains {bad}, out of range for an embedding table of num_embeddings="
                         f"{num_embeddings}: every id must be in [0, {num_embeddings})")


def check_embedding_options(max_norm, sparse, *, where: str) -> None:
    """max_norm and sparse are refused: PEFT's lora.Embedding passes max_norm to F.embedding for A^T as
    well, which renormalises columns of lora_embedding_A in place during forward, and sparse gradients
    do not exist for the fused op."""
    if max_norm is not None:
        raise ValueError(f"{where}: max_norm={max_norm!r} is not supported (it renormalises rows of the table, "
                         f"and PEFT also columns of lora_embedding_A, in place during forward); expected None")
    if sparse:
        raise ValueError(f"{where}: sparse=True is not supported (the LoRA grads are dense); expected False")


def check_dora_inputs(x, weight, magnitude, weight_norm) -> None:
    """DoRA's magnitude m (N,) and, when given, the cached norm n (N,) on x's device: float32, float64 for
    float64 x (fused_lora.dora_weight_norm's result)."""
    N = weight.shape[0]
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor of shape ({N},), got {type(magnitude).__name__}")
    if tuple(magnitude.shape) != (N,):
        raise ValueError(f"magnitude must have shape ({N},) to match weight's out_features, "
                         f"got {tuple(magnitude.shape)}")
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude must be a floating-point tensor, got dtype {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude is on device {magnitude.device} but x is on {x.device}")
    if weight_norm is not None:
        if not isinstance(weight_norm, torch.Tensor) or tuple(weight_norm.shape) != (N,) \
                or weight_norm.dtype != (torch.float64 if x.dtype == torch.float64 else torch.float32) \
                or weight_norm.device != x.device:
            got = (f"dtype {weight_norm.dtype}, shape {tuple(weight_norm.shape)} on {weight_norm.device}"
                   if isinstance(weight_norm, torch.Tensor) else type(weight_norm).__name__)
            expected = "float64" if x.dtype == torch.float64 else "float32"
            raise ValueError(f"weight_norm must be a {expected} tensor of shape ({N},) on {x.device} "
                             f"(fused_lora.dora_weight_norm's result), got {got}")
