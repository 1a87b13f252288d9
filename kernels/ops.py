"""Launchers for the LoRA kernels. Inputs are 2-D and already validated by fused_lora.

Each launcher mirrors one formula of the LoRA layer; the pure-torch versions of the same formulas
live in fused_lora.reference.
"""
from __future__ import annotations

import functools

import torch
import triton

from . import configs
from fused_lora.dropout import drop_threshold, keep_scale
from fused_lora.functional import interpreting

from ._interpreter import install_bf16_dot_fix
from ._lora_bwd import _lora_bwd_da_kernel, _lora_bwd_dx_kernel, _lora_bwd_dy_kernel
from ._lora_fwd import _lora_fwd_kernel, _lora_shrink_kernel

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
        install_bf16_dot_fix()


def _dropout_args(dropout_p: float, seed: int) -> dict:
    if dropout_p > 0.0:
        return dict(seed=seed, drop_threshold=drop_threshold(dropout_p),
                    keep_scale=keep_scale(dropout_p), APPLY_DROPOUT=True)
    return dict(seed=0, drop_threshold=0, keep_scale=1.0, APPLY_DROPOUT=False)


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, *, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """S = dropout(x) A^T, (M, r) in x's dtype, fp32 accumulation."""
    M, K = x.shape
    r = lora_A.shape[0]
    s = torch.empty((M, r), device=x.device, dtype=x.dtype)
    if M == 0:
        return s
    if K == 0:
        return s.zero_()
    _prepare()
    R = configs.padded_rank(r)
    cfg = configs.shrink_config(R, x.dtype)
    _lora_shrink_kernel[(triton.cdiv(M, cfg.BLOCK_M),)](
        x, lora_A, s, M, K, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
        **_dropout_args(dropout_p, seed), R=R, INPUT_PRECISION=_input_precision(x.dtype),
        **cfg.constexprs(), **cfg.launch_options())
    return s


def lora_fwd(x, weight, bias, lora_A, lora_B, scaling: float, *, dropout_p: float = 0.0, seed: int = 0,
             fuse_shrink: bool | None = None):
    """(y, S): y = x W^T + b + s * S B^T with S = dropout(x) A^T (saved for backward).

    fuse_shrink=None lets the config choose (few tokens and a small rank fuse the shrink).
    """
    M, K = x.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    R = configs.padded_rank(r)
    cfg, fuse = configs.fwd_config(M, R, x.dtype)
    if fuse_shrink is not None:
        fuse = fuse_shrink
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0 or not fuse:
        s = lora_shrink(x, lora_A, dropout_p=dropout_p, seed=seed)
        fuse = False
    else:
        s = torch.empty((M, r), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y, s
    _prepare()
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    _lora_fwd_kernel[grid](
        x, weight, bias if bias is not None else y, s, lora_A, lora_B, y, M, N, K, r,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        float(scaling), **_dropout_args(dropout_p, seed), R=R, R_CHUNK=configs.rank_chunk(R),
        GROUP_M=cfg.GROUP_M or 1, HAS_BIAS=bias is not None, FUSE_SHRINK=fuse,
        INPUT_PRECISION=_input_precision(x.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, **cfg.launch_options())
    return y, s


def lora_bwd_dy(dy, lora_B, s, scaling: float, *, deterministic: bool | None = None):
    """(dS, dB) from one pass over dY: dS = s dY B (x's dtype), dB = s dY^T S (fp32)."""
    M, N = dy.shape
    r = lora_B.shape[1]
    ds = torch.empty((M, r), device=dy.device, dtype=s.dtype)
    if M == 0 or N == 0:
        return ds.zero_(), torch.zeros((N, r), device=dy.device, dtype=torch.float32)
    _prepare()
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    R = configs.padded_rank(r)
    cfg = configs.bwd_dy_config(R, dy.dtype)
    m_blocks = triton.cdiv(M, cfg.BLOCK_M)
    if deterministic:
        db = torch.empty((m_blocks, N, r), device=dy.device, dtype=torch.float32)
    else:
        db = torch.zeros((N, r), device=dy.device, dtype=torch.float32)
    _lora_bwd_dy_kernel[(m_blocks,)](
        dy, lora_B, s, ds, db, M, N, r,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        ds.stride(0), ds.stride(1), float(scaling), R=R, USE_ATOMICS=not deterministic,
        INPUT_PRECISION=_input_precision(dy.dtype), **cfg.constexprs(), **cfg.launch_options())
    return ds, (db.sum(0) if deterministic else db)


def lora_bwd_dx(dy, weight, ds, lora_A, *, dropout_p: float = 0.0, seed: int = 0):
    """dX = dY W + dropout'(dS A), one fused GEMM (the LoRA term seeds the accumulator)."""
    M, N = dy.shape
    r, K = lora_A.shape
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if M == 0 or K == 0:
        return dx
    _prepare()
    R = configs.padded_rank(r)
    cfg = configs.bwd_dx_config(M, dy.dtype)
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(K, cfg.BLOCK_K),)
    _lora_bwd_dx_kernel[grid](
        dy, weight, ds, lora_A, dx, M, N, K, r,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), ds.stride(0), ds.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        **_dropout_args(dropout_p, seed), R=R, R_CHUNK=configs.rank_chunk(R),
        GROUP_M=cfg.GROUP_M or 1, INPUT_PRECISION=_input_precision(dy.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K, BLOCK_N=cfg.BLOCK_N, **cfg.launch_options())
    return dx


def lora_bwd_da(ds, x, *, dropout_p: float = 0.0, seed: int = 0, deterministic: bool | None = None):
    """dA = dS^T dropout(x), (r, K) in fp32, reduced over M in SPLIT_M slices."""
    M, K = x.shape
    r = ds.shape[1]
    if M == 0 or K == 0:
        return torch.zeros((r, K), device=x.device, dtype=torch.float32)
    _prepare()
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    R = configs.padded_rank(r)
    cfg = configs.bwd_da_config(R, x.dtype)
    splits, per_split = configs.da_split(M, K, cfg.BLOCK_M, cfg.BLOCK_K, _num_sms(x.device))
    use_atomics = splits > 1 and not deterministic
    if use_atomics:
        da = torch.zeros((r, K), device=x.device, dtype=torch.float32)
    else:
        da = torch.empty((splits, r, K), device=x.device, dtype=torch.float32)
    _lora_bwd_da_kernel[(triton.cdiv(K, cfg.BLOCK_K), splits)](
        ds, x, da, M, K, r, ds.stride(0), ds.stride(1), x.stride(0), x.stride(1), per_split,
        **_dropout_args(dropout_p, seed), R=R, USE_ATOMICS=use_atomics,
        INPUT_PRECISION=_input_precision(x.dtype), **cfg.constexprs(), **cfg.launch_options())
    return da if use_atomics else da.sum(0)
