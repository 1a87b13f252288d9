"""Launchers for the LoRA kernels. Inputs are 2-D and already validated by fused_lora.

Each launcher mirrors one formula of the LoRA layer; the pure-torch versions of the same formulas
live in fused_lora.reference.

Each launcher first asks its pure ``plan_*`` function (fused_lora.kernels.plans) for the launches it
will make, then launches exactly that plan; ``fused_lora.benchmarks`` models the same plans.
"""
from __future__ import annotations

import functools

import torch

from fused_lora.dropout import drop_threshold, keep_scale
from fused_lora.functional import interpreting

from ._interpreter import install_bf16_fixes
from ._lora_bwd import _lora_bwd_da_kernel, _lora_bwd_dx_kernel, _lora_bwd_dy_kernel
from ._lora_fwd import _lora_fwd_kernel, _lora_shrink_kernel
from .plans import (Launch, Operand, find_launch, plan_lora_bwd_da, plan_lora_bwd_dx, plan_lora_bwd_dy, plan_lora_fwd,
                    plan_lora_shrink)

# Programs per SM the interpreter pretends to have: small, so tests still see several dA splits.
_INTERPRETER_SMS = 2


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_SMS


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _prepare() -> None:
    if interpreting():
        install_bf16_fixes()


def _dropout_scalars(dropout_p: float, seed: int) -> dict:
    """Runtime dropout arguments; APPLY_DROPOUT (a constexpr) comes from the plan."""
    if dropout_p > 0.0:
        return dict(seed=seed, drop_threshold=drop_threshold(dropout_p), keep_scale=keep_scale(dropout_p))
    return dict(seed=0, drop_threshold=0, keep_scale=1.0)


def _buffer(op: Operand, device, *, zeroed: bool = False) -> torch.Tensor:
    return (torch.zeros if zeroed else torch.empty)(op.shape, device=device, dtype=op.dtype)


def _reduction_buffer(launch: Launch, device) -> torch.Tensor:
    """The buffer a dB / dA launch writes (its last operand, as plans._reduced_over_m sized it): zeroed
    for atomics."""
    return _buffer(launch.writes[-1], device, zeroed=launch.constexprs["USE_ATOMICS"])


def _finish_reduction(buffer: torch.Tensor, launch: Launch) -> torch.Tensor:
    return buffer.sum(0) if launch.writes[-1].name.endswith("_partials") else buffer


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, *, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """S = dropout(x) A^T, (M, r) in x's dtype, fp32 accumulation."""
    M, K = x.shape
    r = lora_A.shape[0]
    s = torch.empty((M, r), device=x.device, dtype=x.dtype)
    launch = find_launch(plan_lora_shrink(M, K, r, x.dtype, dropout=dropout_p > 0.0), "_lora_shrink_kernel")
    if M == 0:
        return s
    if launch is None:  # K == 0
        return s.zero_()
    _prepare()
    _lora_shrink_kernel[launch.grid](
        x, lora_A, s, M, K, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
        **_dropout_scalars(dropout_p, seed), INPUT_PRECISION=_input_precision(x.dtype),
        **launch.constexprs, **launch.config.launch_options())
    return s


def lora_fwd(x, weight, bias, lora_A, lora_B, scaling: float, *, dropout_p: float = 0.0, seed: int = 0,
             fuse_shrink: bool | None = None):
    """(y, S): y = x W^T + b + s * S B^T with S = dropout(x) A^T (saved for backward).

    fuse_shrink=None lets the config choose (few tokens and a small rank fuse the shrink).
    """
    M, K = x.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    plan = plan_lora_fwd(M, N, K, r, x.dtype, dropout=dropout_p > 0.0, bias=bias is not None,
                         fuse_shrink=fuse_shrink)
    launch = find_launch(plan, "_lora_fwd_kernel")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if launch is None or not launch.constexprs["FUSE_SHRINK"]:
        s = lora_shrink(x, lora_A, dropout_p=dropout_p, seed=seed)
    else:
        s = torch.empty((M, r), device=x.device, dtype=x.dtype)
    if launch is None:  # M == 0 or N == 0
        return y, s
    _prepare()
    _lora_fwd_kernel[launch.grid](
        x, weight, bias if bias is not None else y, s, lora_A, lora_B, y, M, N, K, r,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        float(scaling), **_dropout_scalars(dropout_p, seed), INPUT_PRECISION=_input_precision(x.dtype),
        **launch.constexprs, **launch.config.launch_options())
    return y, s


def lora_bwd_dy(dy, lora_B, s, scaling: float, *, deterministic: bool | None = None):
    """(dS, dB) from one pass over dY: dS = s dY B (x's dtype), dB = s dY^T S (fp32, or dY's dtype when
    one row block covers M: callers cast to B's dtype)."""
    M, N = dy.shape
    r = lora_B.shape[1]
    ds = torch.empty((M, r), device=dy.device, dtype=s.dtype)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    plan = plan_lora_bwd_dy(M, N, r, dy.dtype, deterministic=deterministic)
    launch = find_launch(plan, "_lora_bwd_dy_kernel")
    if launch is None:  # M == 0 or N == 0
        return ds.zero_(), torch.zeros((N, r), device=dy.device, dtype=torch.float32)
    _prepare()
    db = _reduction_buffer(launch, dy.device)
    _lora_bwd_dy_kernel[launch.grid](
        dy, lora_B, s, ds, db, M, N, r,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        ds.stride(0), ds.stride(1), float(scaling), INPUT_PRECISION=_input_precision(dy.dtype),
        **launch.constexprs, **launch.config.launch_options())
    return ds, _finish_reduction(db, launch)


def lora_bwd_dx(dy, weight, ds, lora_A, *, dropout_p: float = 0.0, seed: int = 0):
    """dX = dY W + dropout'(dS A), one fused GEMM (the LoRA term seeds the accumulator)."""
    M, N = dy.shape
    r, K = lora_A.shape
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    launch = find_launch(plan_lora_bwd_dx(M, N, K, r, dy.dtype, dropout=dropout_p > 0.0), "_lora_bwd_dx_kernel")
    if launch is None:  # M == 0 or K == 0
        return dx
    _prepare()
    _lora_bwd_dx_kernel[launch.grid](
        dy, weight, ds, lora_A, dx, M, N, K, r,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), ds.stride(0), ds.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        **_dropout_scalars(dropout_p, seed), INPUT_PRECISION=_input_precision(dy.dtype),
        **launch.constexprs, **launch.config.launch_options())
    return dx


def lora_bwd_da(ds, x, *, dropout_p: float = 0.0, seed: int = 0, deterministic: bool | None = None):
    """dA = dS^T dropout(x), (r, K) in fp32 (in x's dtype when SPLIT_M == 1: callers cast to A's dtype),
    reduced over M in SPLIT_M slices."""
    M, K = x.shape
    r = ds.shape[1]
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    plan = plan_lora_bwd_da(M, K, r, x.dtype, dropout=dropout_p > 0.0, deterministic=deterministic,
                            num_sms=_num_sms(x.device) if M and K else 1)
    launch = find_launch(plan, "_lora_bwd_da_kernel")
    if launch is None:  # M == 0 or K == 0
        return torch.zeros((r, K), device=x.device, dtype=torch.float32)
    _prepare()
    da = _reduction_buffer(launch, x.device)
    _lora_bwd_da_kernel[launch.grid](
        ds, x, da, M, K, r, ds.stride(0), ds.stride(1), x.stride(0), x.stride(1),
        **launch.args, **_dropout_scalars(dropout_p, seed), INPUT_PRECISION=_input_precision(x.dtype),
        **launch.constexprs, **launch.config.launch_options())
    return _finish_reduction(da, launch)
