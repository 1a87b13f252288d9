"""Launchers for the LoRA kernels. Inputs are 2-D and already validated by fused_lora.

Each launcher mirrors one formula of the LoRA layer; the pure-torch versions of the same formulas
live in fused_lora.reference.

Each launcher launches exactly the plan its pure ``plan_*`` function (fused_lora.kernels.plans)
returns, which ``fused_lora.benchmarks`` models too. Plans depend only on sizes, dtype and flags, so
the launch arguments derived from them are computed once per shape (``_ready``) and reused: at a few
tokens the host time of a layer is the time of the GPU work.

``seed`` is the dropout seed: a 0-dim int64 tensor on the inputs' device, which the kernels load (so a
CUDA graph replays whatever value the tensor holds), or an int.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch

from . import configs
from ._interpreter import install_fixes, interpreting
from ._lora_bwd import _lora_bwd_da_kernel, _lora_bwd_dx_da_db_kernel, _lora_bwd_dx_kernel, _lora_bwd_dy_kernel
from ._dora import _dora_magnitude_grad_kernel, _dora_weight_norm_kernel
from ._lora_fwd import _lora_fwd_kernel, _lora_shrink_kernel
from .dropout_args import drop_threshold, keep_scale, seed_on
from .plans import (ZERO_, ZEROS, Launch, find_launch, plan_dora_bwd, plan_dora_magnitude_grad, plan_dora_weight_norm,
                    plan_lora_bwd, plan_lora_bwd_da, plan_lora_bwd_dx, plan_lora_bwd_dy, plan_lora_bwd_in_launch,
                    plan_lora_fwd, plan_lora_shrink)

# Programs per SM the interpreter pretends to have: small, so tests still see several dA splits.
_INTERPRETER_SMS = 2


def launch_guard(device: torch.device):
    """Makes the inputs' CUDA device current around a launch: Triton launches on the current device (and
    its current stream), which need not be the tensors' (cuda:1 tensors with cuda:0 current)."""
    return torch.cuda.device(device) if device.type == "cuda" else _NO_GUARD


_NO_GUARD = contextlib.nullcontext()  # reusable: it holds no state


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


# triton decides at import whether @triton.jit interprets, so this module's kernels keep that mode.
if interpreting():
    install_fixes()


class _Ready(NamedTuple):
    """A plan made ready to execute: its Triton launch (None when the sizes leave nothing to compute) with
    the launch arguments (constexprs, INPUT_PRECISION, launch options), and the plan's torch ops before
    and after it (plans.TORCH_OPS), which the launcher runs on its buffers with ``_run_torch_ops``."""
    launch: Launch | None
    kwargs: dict
    before: tuple[Launch, ...]
    after: tuple[Launch, ...]


def _ready(plan: list[Launch], kernel: str, precision: str) -> _Ready:
    launch = find_launch(plan, kernel)
    if launch is None:
        return _Ready(None, {}, tuple(op for op in plan if not op.is_triton), ())
    kwargs = {**launch.args, **launch.constexprs, "INPUT_PRECISION": precision, **launch.config.launch_options()}
    at = plan.index(launch)
    return _Ready(launch, kwargs, tuple(op for op in plan[:at] if not op.is_triton),
                  tuple(op for op in plan[at + 1:] if not op.is_triton))


def _run_torch_ops(ops: tuple[Launch, ...], buffers: dict, device) -> dict:
    """Runs a plan's torch ops on ``buffers`` (operand name -> tensor): each op as plans.TORCH_OPS says."""
    for op in ops:
        if op.kernel == ZEROS:
            for out in op.writes:
                buffers[out.name] = torch.zeros(out.shape, device=device, dtype=out.dtype)
        elif op.kernel == ZERO_:
            for out in op.writes:
                buffers[out.name].zero_()
        else:
            raise AssertionError(f"the plan has a torch op no launcher runs: {op.kernel}")
    return buffers


def _result(buffers: dict, name: str, shape, device) -> torch.Tensor:
    """The plan's buffer ``name``; a plan has no op for a buffer without elements (torch would launch
    nothing), so that one is made here, empty."""
    result = buffers.get(name)
    return result if result is not None else torch.empty(shape, device=device, dtype=torch.float32)


def _written(ready: _Ready, buffers: dict, device) -> torch.Tensor:
    """The buffer the Triton launch writes last (its dB / dA), new, as the plan sizes it."""
    out = ready.launch.writes[-1]
    buffer = buffers.get(out.name)
    if buffer is None:
        buffer = buffers[out.name] = torch.empty(out.shape, device=device, dtype=out.dtype)
    return buffer


def _scratch(launch: Launch, name: str, device, default=None) -> torch.Tensor | None:
    """A new (uninitialised) buffer for the plan's scratch operand ``name``; ``default`` when the plan has none."""
    for op in launch.writes:
        if op.name == name:
            return torch.empty(op.shape, device=device, dtype=op.dtype)
    return default


class _Workspace(NamedTuple):
    counters: torch.Tensor  # int32
    accumulator: torch.Tensor  # fp32


_workspaces: dict = {}


def _workspace(device: torch.device, counters: int, accumulator: int) -> _Workspace:
    """Zero-at-rest scratch for the kernels that finish a sum across programs in the last program to arrive
    (kernels/_common.py: _last_to_arrive, _sum_of_parts): arrival counters and an fp32 atomic accumulator. The
    kernels leave both at zero, so they are zeroed once, when made or grown, not per launch.

    One per device and stream: launches on one stream run one after another, while two streams could run two
    backward passes at once. Inside CUDA graph capture every call makes its own, not cached: its zeroing is
    captured with the graph (each replay starts from zero, whatever used that memory since), and it comes from the
    graph's private pool, which lives as long as the graph. A cached one reused there would be freed under the
    graph when a later eager call on that stream grew it, and shared by the graph's replays with eager calls and
    other graphs on that stream.
    """
    if _capturing(device):
        return _zeroed_workspace(device, counters, accumulator)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    found = _workspaces.get(key)
    if found is not None and found.counters.numel() >= counters and found.accumulator.numel() >= accumulator:
        return found
    if found is not None:
        counters, accumulator = max(counters, found.counters.numel()), max(accumulator, found.accumulator.numel())
    made = _workspaces[key] = _zeroed_workspace(device, counters, accumulator)
    return made


def _zeroed_workspace(device: torch.device, counters: int, accumulator: int) -> _Workspace:
    return _Workspace(torch.zeros(max(counters, 1), device=device, dtype=torch.int32),
                      torch.zeros(max(accumulator, 1), device=device, dtype=torch.float32))


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=4096)
def _shrink_ready(M, K, r, dtype, dropout, precision, num_sms):
    return _ready(plan_lora_shrink(M, K, r, dtype, dropout=dropout, num_sms=num_sms), "_lora_shrink_kernel",
                  precision)


@functools.lru_cache(maxsize=4096)
def _fwd_ready(M, N, K, r, dtype, dropout, bias, fuse_shrink, precision, dora=False, shrink_in_launch=None):
    """(the shrink's, the forward GEMM's) of one forward plan, made for the plans' default of 132 SMs on every device
    (the backward's take the device's count): under the interpreter's 2 the K splits the forward weighs would never
    be taken, and its tests would not run them."""
    plan = plan_lora_fwd(M, N, K, r, dtype, dropout=dropout, bias=bias, fuse_shrink=fuse_shrink, dora=dora,
                         shrink_in_launch=shrink_in_launch)
    gemm = _ready(plan, "_lora_fwd_kernel", precision)
    return _ready(plan[:plan.index(gemm.launch)] if gemm.launch else plan, "_lora_shrink_kernel", precision), gemm


@functools.lru_cache(maxsize=4096)
def _dy_ready(M, N, r, dtype, deterministic, precision, num_sms, dora=False, bias=False, dropout=False):
    return _ready(plan_lora_bwd_dy(M, N, r, dtype, deterministic=deterministic, dora=dora, bias=bias, dropout=dropout,
                                   num_sms=num_sms), "_lora_bwd_dy_kernel", precision)


@functools.lru_cache(maxsize=4096)
def _dx_ready(M, N, K, r, dtype, dropout, precision, dora=False):
    return _ready(plan_lora_bwd_dx(M, N, K, r, dtype, dropout=dropout, dora=dora), "_lora_bwd_dx_kernel", precision)


@functools.lru_cache(maxsize=4096)
def _one_launch_ready(M, N, K, r, dtype, dropout, deterministic, precision, num_sms, need_dx=True,
                      one_launch=None) -> _Ready | None:
    """The backward's one launch where plan_lora_bwd plans one (_lora_bwd_dx_da_db_kernel, or _lora_bwd_dx_kernel
    with DS_IN_LAUNCH), or None where that plan is the separate launches."""
    plan = plan_lora_bwd(M, N, K, r, dtype, dropout=dropout, deterministic=deterministic, num_sms=num_sms,
                         need_dx=need_dx, one_launch=one_launch)
    if len(plan) == 1 and plan[0].constexprs.get("DS_IN_LAUNCH"):
        return _ready(plan, "_lora_bwd_dx_kernel", precision)
    if find_launch(plan, "_lora_bwd_dx_da_db_kernel") is None:
        return None
    return _ready(plan, "_lora_bwd_dx_da_db_kernel", precision)


@functools.lru_cache(maxsize=4096)
def _norm_ready(N, K, r, dtype, precision):
    return _ready(plan_dora_weight_norm(N, K, r, dtype), "_dora_weight_norm_kernel", precision)


@functools.lru_cache(maxsize=4096)
def _dm_ready(M, N, r, dtype, precision, dropout):
    return _ready(plan_dora_magnitude_grad(M, N, r, dtype, dropout=dropout), "_dora_magnitude_grad_kernel",
                  precision)


@functools.lru_cache(maxsize=4096)
def _da_ready(M, K, r, dtype, dropout, deterministic, num_sms, precision):
    plan = plan_lora_bwd_da(M, K, r, dtype, dropout=dropout, deterministic=deterministic, num_sms=num_sms)
    return _ready(plan, "_lora_bwd_da_kernel", precision)


_unused_seeds: dict[torch.device, torch.Tensor] = {}


def _seed_arg(seed, dropout_p: float, device: torch.device) -> torch.Tensor:
    """The seed tensor the kernels take (dropout_args.seed_on); without dropout, when the kernels never
    load it, one cached per device (a pointer argument must be on the launch's device)."""
    if dropout_p <= 0.0:
        unused = _unused_seeds.get(device)
        if unused is None:
            unused = _unused_seeds[device] = torch.zeros((), dtype=torch.int64, device=device)
        return unused
    return seed_on(device, seed)


def _dropout_scalars(dropout_p: float) -> tuple[int, float]:
    """(drop_threshold, keep_scale); APPLY_DROPOUT (a constexpr) comes from the plan."""
    if dropout_p > 0.0:
        return drop_threshold(dropout_p), keep_scale(dropout_p)
    return 0, 1.0


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, *, dropout_p: float = 0.0, seed=0) -> torch.Tensor:
    """S = dropout(x) A^T, (M, r) in x's dtype, fp32 accumulation."""
    M, K = x.shape
    r = lora_A.shape[0]
    s = torch.empty((M, r), device=x.device, dtype=x.dtype)
    ready = _shrink_ready(M, K, r, x.dtype, dropout_p > 0.0, _input_precision(x.dtype), _num_sms(x.device))
    with launch_guard(x.device):
        _launch_shrink(ready, x, lora_A, s, _seed_arg(seed, dropout_p, x.device), dropout_p)
    return s


def _launch_shrink(ready: _Ready, x, lora_A, s, seed, dropout_p) -> torch.Tensor | None:
    """Runs a shrink plan into ``s`` (the plan's memset for empty sizes); returns the K splits' fp32 shares where
    the plan leaves them to the forward GEMM (SUM_PARTS off), else None."""
    if ready.launch is None:
        _run_torch_ops(ready.before, {"S": s}, x.device)
        return None
    launch = ready.launch
    M, K = x.shape
    counters, accumulator = _workspace(x.device, launch.grid[0], 0)
    parts = _scratch(launch, "S_partials", x.device, accumulator)
    _lora_shrink_kernel[launch.grid](
        x, lora_A, s, parts, counters, seed, M, K, lora_A.shape[0], *x.stride(), *lora_A.stride(), *s.stride(),
        *_dropout_scalars(dropout_p), **ready.kwargs)
    return None if launch.constexprs["SUM_PARTS"] else parts


def lora_fwd(x, weight, bias, lora_A, lora_B, scaling: float, *, dropout_p: float = 0.0, seed=0,
             fuse_shrink: bool | None = None, shrink_in_launch: bool | None = None):
    """(y, S): y = x W^T + b + s * S B^T with S = dropout(x) A^T (saved for backward).

    fuse_shrink=None lets the plan choose (few tokens and a small rank fuse the shrink); fuse_shrink=False is a
    shrink launch before the GEMM, shrink_in_launch=True the shrink's K splits made inside the GEMM launch
    (plans.fwd_alternatives).
    """
    y, s, _ = _fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fuse_shrink, None, None,
                   shrink_in_launch)
    return y, s


def dora_fwd(x, weight, bias, lora_A, lora_B, scaling: float, magnitude, norm, *, dropout_p: float = 0.0, seed=0,
             fuse_shrink: bool | None = None, shrink_in_launch: bool | None = None):
    """(y, S, Z) of DoRA with g = m / n (``magnitude`` (N,), ``norm`` (N,) fp32): y = g (x W^T + s S B^T) + b and
    Z empty; with dropout (x' = dropout(x), S = x' A^T) y = x W^T + b + (g - 1) x' W^T + g s S B^T and
    Z = x' W^T + s S B^T (M, N), both base products in one GEMM loop."""
    y, s, z = _fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fuse_shrink, magnitude, norm,
                   shrink_in_launch)
    return y, s, x.new_empty((0,)) if z is None else z


def _fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fuse_shrink, magnitude, norm,
         shrink_in_launch=None):
    M, K = x.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    dora = magnitude is not None
    shrink, ready = _fwd_ready(M, N, K, r, x.dtype, dropout_p > 0.0, bias is not None, fuse_shrink,
                               _input_precision(x.dtype), dora, shrink_in_launch)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    # Z only for DoRA with dropout; otherwise y stands in for the pointer the kernel does not touch (an
    # empty tensor per call cost host time at a few tokens).
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if dora and dropout_p > 0.0 else None
    with launch_guard(x.device):
        seed = _seed_arg(seed, dropout_p, x.device)
        s = torch.empty((M, r), device=x.device, dtype=x.dtype)
        s_parts = None
        in_launch = ready.launch is not None and ready.launch.constexprs.get("SHRINK_IN_LAUNCH", False)
        if ready.launch is None or not (ready.launch.constexprs["FUSE_SHRINK"] or in_launch):
            s_parts = _launch_shrink(shrink, x, lora_A, s, seed, dropout_p)  # the plan's shrink launch
        if ready.launch is None:  # M == 0 or N == 0: the plan is the shrink's
            return y, s, z
        launch = ready.launch
        if len(launch.grid) > 1:  # K split: the tiles' fp32 partials and arrival counters
            counters, _ = _workspace(x.device, launch.grid[0], 0)
            parts = (_scratch(launch, "Y_partials", x.device),
                     _scratch(launch, "S_partials", x.device, y if s_parts is None else s_parts), counters)
        elif in_launch:  # the share jobs' fp32 shares; a counter per row block, then the ticket counter
            counters, _ = _workspace(x.device, -(-M // launch.config.BLOCK_M) + 1, 0)
            parts = (y, _scratch(launch, "S_partials", x.device), counters)
        else:
            parts = (y, y if s_parts is None else s_parts, y)  # y: pointers the kernel does not touch
        _lora_fwd_kernel[launch.grid](
            x, weight, y if bias is None else bias, s, lora_A, lora_B, y, seed, *_dora_ptrs(magnitude, norm, y),
            y if z is None else z, *parts, M, N, K, r, *x.stride(), *weight.stride(),
            0 if bias is None else bias.stride(0),
            *s.stride(), *lora_A.stride(), *lora_B.stride(), *y.stride(), magnitude.stride(0) if dora else 0,
            *((0, 0) if z is None else z.stride()), float(scaling), *_dropout_scalars(dropout_p), **ready.kwargs)
    return y, s, z


def _dora_ptrs(magnitude, norm, placeholder):
    """(mag_ptr, norm_ptr) of a launch: DoRA's m and n, or a tensor the kernel does not read."""
    return (magnitude, norm) if magnitude is not None else (placeholder, placeholder)


def lora_bwd_dy(dy, lora_B, s, scaling: float, *, deterministic: bool | None = None):
    """(dS, dB) from one pass over dY: dS = s dY B (x's dtype), dB = s dY^T S (dY's dtype), both summed across
    programs in the kernel."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    ready = _dy_ready(*dy.shape, lora_B.shape[1], dy.dtype, deterministic, _input_precision(dy.dtype),
                      _num_sms(dy.device))
    with launch_guard(dy.device):
        return _bwd_dy(ready, dy, lora_B, s, scaling)


def lora_bwd_dx(dy, weight, ds, lora_A, *, dropout_p: float = 0.0, seed=0):
    """dX = dY W + dropout'(dS A), one fused GEMM (the LoRA term seeds the accumulator)."""
    ready = _dx_ready(*dy.shape, lora_A.shape[1], lora_A.shape[0], dy.dtype, dropout_p > 0.0,
                      _input_precision(dy.dtype))
    with launch_guard(dy.device):
        return _bwd_dx(ready, dy, weight, ds, lora_A, dropout_p, seed)


def lora_bwd_da(ds, x, *, dropout_p: float = 0.0, seed=0, deterministic: bool | None = None):
    """dA = dS^T dropout(x), (r, K) in x's dtype, summed over M's SPLIT_M slices in the kernel."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    with launch_guard(x.device):
        return _bwd_da(_da_ready_for(x, ds.shape[1], dropout_p, deterministic, _input_precision(x.dtype)),
                       ds, x, dropout_p, seed)


def lora_bwd(dy, x, weight, lora_A, lora_B, s, scaling: float, *, dropout_p: float = 0.0, seed=0,
             need_dx: bool = True, need_dA: bool = True):
    """(dX or None, dA or None, dB) as plan_lora_bwd plans them: one launch where it pays (lora_bwd_one_launch;
    without ``need_dx`` it skips dX and the read of W), else lora_bwd_dy, then lora_bwd_dx and lora_bwd_da as
    needed, under one device guard with one look-up of the launch arguments each."""
    precision = _input_precision(dy.dtype)
    M, N = dy.shape
    r, K = lora_A.shape
    deterministic = torch.are_deterministic_algorithms_enabled()
    one_launch = _one_launch_ready(M, N, K, r, dy.dtype, dropout_p > 0.0, deterministic, precision,
                                   _num_sms(dy.device), need_dx)
    if one_launch is not None and one_launch.launch.kernel == "_lora_bwd_dx_kernel":  # DS_IN_LAUNCH
        with launch_guard(dy.device):
            dx, da, db = _bwd_in_launch(one_launch, dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed)
        return dx, da if need_dA else None, db
    if one_launch is not None:
        with launch_guard(dy.device):
            dx, da, db = _bwd_one_launch(one_launch, dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed)
        return dx if need_dx else None, da if need_dA else None, db
    with launch_guard(dy.device):
        seed = _seed_arg(seed, dropout_p, dy.device)
        ds, db = _bwd_dy(_dy_ready(M, N, r, dy.dtype, deterministic, precision, _num_sms(dy.device)), dy, lora_B, s,
                         scaling)
        dx = _bwd_dx(_dx_ready(M, N, K, r, dy.dtype, dropout_p > 0.0, precision), dy, weight, ds, lora_A,
                     dropout_p, seed) if need_dx else None
        da = _bwd_da(_da_ready_for(x, r, dropout_p, deterministic, precision), ds, x, dropout_p,
                     seed) if need_dA else None
    return dx, da, db


def lora_bwd_in_launch(dy, x, weight, lora_A, lora_B, s, scaling: float, *, dropout_p: float = 0.0, seed=0):
    """(dX, dA, dB) from one _lora_bwd_dx_kernel launch with the dS / dB jobs inside it (plans.plan_lora_bwd_in_launch,
    whether or not plan_lora_bwd would choose it): fp16 / bf16 above FEW_TOKENS, not in deterministic mode."""
    M, N = dy.shape
    r, K = lora_A.shape
    R = configs.padded_rank(r)
    if not configs.bwd_ds_in_launch(M, R, dy.dtype, torch.are_deterministic_algorithms_enabled()) or not N or not K:
        raise ValueError(f"lora_bwd_in_launch: {M} tokens at rank {r} in {dy.dtype} (N={N}, K={K}) cannot run the "
                         f"dS / dB jobs in the dX launch (configs.bwd_ds_in_launch: fp16 / bf16, more than "
                         f"{configs.FEW_TOKENS} tokens, rank <= 64, not deterministic; N and K > 0); use "
                         f"lora_bwd")
    ready = _in_launch_ready(M, N, K, r, dy.dtype, dropout_p > 0.0, _input_precision(dy.dtype), _num_sms(dy.device))
    with launch_guard(dy.device):
        return _bwd_in_launch(ready, dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed)


@functools.lru_cache(maxsize=4096)
def _in_launch_ready(M, N, K, r, dtype, dropout, precision, num_sms):
    return _ready(plan_lora_bwd_in_launch(M, N, K, r, dtype, dropout=dropout, num_sms=num_sms), "_lora_bwd_dx_kernel",
                  precision)


def lora_bwd_one_launch(dy, x, weight, lora_A, lora_B, s, scaling: float, *, dropout_p: float = 0.0, seed=0):
    """(dX, dA, dB) in one launch wherever configs.bwd_one_launch_config gives tiles (whether or not plan_lora_bwd
    would choose it): dX = dY W + dropout'(dS A), dA = dS^T dropout(x), dB = s dY^T S with dS = s dY B; dA and dB
    in the inputs' dtype."""
    M, N = dy.shape
    r, K = lora_A.shape
    ready = _one_launch_ready(M, N, K, r, dy.dtype, dropout_p > 0.0, torch.are_deterministic_algorithms_enabled(),
                              _input_precision(dy.dtype), _num_sms(dy.device), one_launch=True)
    if ready is None:
        raise ValueError(f"lora_bwd_one_launch: {M} tokens at rank {r} in {dy.dtype} have no one-launch tiles "
                         f"(configs.bwd_one_launch_config: 1..{configs.MID_TOKENS} tokens, rank <= "
                         f"{configs.ONE_LAUNCH_BWD_MAX_RANK}, above {configs.FEW_TOKENS} tokens not in fp32 nor "
                         f"deterministic mode, N and K > 0); use lora_bwd")
    with launch_guard(dy.device):
        return _bwd_one_launch(ready, dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed)


def _bwd_one_launch(ready, dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed):
    M, N = dy.shape
    r, K = lora_A.shape
    launch = ready.launch
    # Without COMPUTE_DX dy stands in for the dX pointer the kernel does not touch.
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype) if launch.constexprs["COMPUTE_DX"] else dy
    da = torch.empty((r, K), device=dy.device, dtype=x.dtype)
    db = torch.empty((N, r), device=dy.device, dtype=dy.dtype)
    if launch.constexprs["REDUCE"]:
        counters, accumulator = _workspace(dy.device, -(-K // launch.config.BLOCK_K), r * K + N * r)
    else:  # not touched
        counters, accumulator = da, da
    _lora_bwd_dx_da_db_kernel[launch.grid](
        dy, x, weight, lora_A, lora_B, s, dx, da, db, accumulator, counters, _seed_arg(seed, dropout_p, dy.device),
        M, N, K, r, *dy.stride(), *x.stride(), *weight.stride(), *lora_A.stride(), *lora_B.stride(), *s.stride(),
        *dx.stride(), *da.stride(), *db.stride(), float(scaling), *_dropout_scalars(dropout_p), **ready.kwargs)
    return dx, da, db


def _da_ready_for(x, r, dropout_p, deterministic, precision):
    M, K = x.shape
    return _da_ready(M, K, r, x.dtype, dropout_p > 0.0, deterministic, _num_sms(x.device) if M and K else 1,
                     precision)


def _bwd_dy(ready, dy, lora_B, s, scaling, dora=None):
    """(dS, dB), and DoRA's dm partials (or None) when ``dora`` = (magnitude, norm, y, bias)."""
    M, N = dy.shape
    r = lora_B.shape[1]
    buffers = _run_torch_ops(ready.before, {"dS": torch.empty((M, r), device=dy.device, dtype=s.dtype)},
                             dy.device)
    dm_parts = None
    if ready.launch is not None:
        launch, ds = ready.launch, buffers["dS"]
        m_blocks, splits = launch.grid
        counters, accumulator = _workspace(dy.device, splits + m_blocks, N * r + M * launch.constexprs["R"])
        db_work = accumulator if launch.constexprs["USE_ATOMICS"] else _scratch(launch, "dB_partials", dy.device)
        if dora is not None:
            magnitude, norm, y, bias = dora
            dm_parts = _scratch(launch, "dm_parts", dy.device)
            dora_args = (magnitude, norm, y, y if bias is None else bias, dm_parts)
            dora_strides = (*y.stride(), 0 if bias is None else bias.stride(0), magnitude.stride(0))
        else:
            dora_args, dora_strides = (ds,) * 5, (0, 0, 0, 0)
        _lora_bwd_dy_kernel[launch.grid](
            dy, lora_B, s, ds, _scratch(launch, "dS_partials", dy.device, accumulator),
            _written(ready, buffers, dy.device),
            accumulator if db_work is None else db_work, counters, *dora_args, M, N, r, *dy.stride(),
            *lora_B.stride(), *s.stride(), *ds.stride(), *dora_strides, float(scaling), **ready.kwargs)
        _run_torch_ops(ready.after, buffers, dy.device)
    if dora is not None:
        return buffers["dS"], _result(buffers, "dB", (N, r), dy.device), dm_parts
    return buffers["dS"], _result(buffers, "dB", (N, r), dy.device)


def _bwd_dx(ready, dy, weight, ds, lora_A, dropout_p, seed, magnitude=None, norm=None):
    M, N = dy.shape
    r, K = lora_A.shape
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if ready.launch is None:  # M == 0 or K == 0: dX has no element
        return dx
    # dx stands in for the pointers only DS_IN_LAUNCH reads (_bwd_in_launch).
    _lora_bwd_dx_kernel[ready.launch.grid](
        dy, weight, ds, lora_A, dx, _seed_arg(seed, dropout_p, dy.device), *_dora_ptrs(magnitude, norm, dx),
        *(dx,) * 10, M, N, K, r, *dy.stride(), *weight.stride(), *ds.stride(), *lora_A.stride(), *dx.stride(),
        magnitude.stride(0) if magnitude is not None else 0, *(0,) * 9, *_dropout_scalars(dropout_p), 1.0,
        0, 1, 0, 0, 0, **ready.kwargs)  # n_per_split, dy_splits, db_slots, da_slots, tiles_first: DS_IN_LAUNCH's
    return dx


def _bwd_in_launch(ready, dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, dora=None):
    """(dX, dA, dB) from one DS_IN_LAUNCH _lora_bwd_dx_kernel launch (plans.plan_lora_bwd_in_launch), and DoRA's dm
    partials (or None) when ``dora`` = (magnitude, norm, saved y or Z, bias or None)."""
    M, N = dy.shape
    r, K = lora_A.shape
    launch = ready.launch
    cfg, R = launch.config, launch.constexprs["R"]
    grid_m = -(-M // cfg.BLOCK_M)
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    ds = torch.empty((M, r), device=dy.device, dtype=s.dtype)
    da = torch.empty((r, K), device=dy.device, dtype=x.dtype)
    db = torch.empty((N, r), device=dy.device, dtype=dy.dtype)
    # Counters: dS per DS_ROWS rows, ready per row block, dA and dB per chunk of JOB_COLS columns, the ticket.
    cols, halves = launch.constexprs["JOB_COLS"], cfg.BLOCK_M // launch.constexprs["DS_ROWS"]
    counters, accumulator = _workspace(dy.device, grid_m * (halves + 1) + -(-K // cols) + -(-N // cols) + 1,
                                       N * r + M * R + r * K)
    dm_parts = None
    if dora is not None:
        magnitude, norm, saved, bias = dora
        dm_parts = _scratch(launch, "dm_parts", dy.device)
        dora_ptrs = (magnitude, norm, saved, dx if bias is None else bias, dm_parts)
        dora_strides = (magnitude.stride(0), *saved.stride(), 0 if bias is None else bias.stride(0))
    else:  # dx: pointers the kernel does not touch
        dora_ptrs, dora_strides = (dx,) * 5, (0,) * 4
    _lora_bwd_dx_kernel[launch.grid](
        dy, weight, ds, lora_A, dx, _seed_arg(seed, dropout_p, dy.device), *dora_ptrs[:2], lora_B, s, db, x, da,
        *dora_ptrs[2:], accumulator, counters, M, N, K, r, *dy.stride(), *weight.stride(), *ds.stride(),
        *lora_A.stride(), *dx.stride(), dora_strides[0], *lora_B.stride(), *s.stride(), *x.stride(), *dora_strides[1:],
        *_dropout_scalars(dropout_p), float(scaling), **ready.kwargs)
    return (dx, da, db) if dora is None else (dx, da, db, dm_parts)


def _bwd_da(ready, ds, x, dropout_p, seed):
    M, K = x.shape
    r = ds.shape[1]
    buffers = _run_torch_ops(ready.before, {}, x.device)
    if ready.launch is not None:
        launch = ready.launch
        counters, accumulator = _workspace(x.device, launch.grid[0], r * K)
        da_work = accumulator if launch.constexprs["USE_ATOMICS"] else _scratch(launch, "dA_partials", x.device)
        _lora_bwd_da_kernel[launch.grid](
            ds, x, _written(ready, buffers, x.device), accumulator if da_work is None else da_work, counters,
            _seed_arg(seed, dropout_p, x.device), M, K, r, *ds.stride(), *x.stride(), *_dropout_scalars(dropout_p),
            **ready.kwargs)
        _run_torch_ops(ready.after, buffers, x.device)
    return _result(buffers, "dA", (r, K), x.device)


# ---- DoRA: the LoRA kernels with DORA on, and the two DoRA kernels ------------------

def dora_weight_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """n = ||W + s B A|| per row, (N,) fp32, without an N x K tensor."""
    N, K = weight.shape
    r = lora_A.shape[0]
    ready = _norm_ready(N, K, r, weight.dtype, _input_precision(weight.dtype))
    buffers = _run_torch_ops(ready.before, {"norm": torch.empty(N, device=weight.device, dtype=torch.float32)},
                             weight.device)
    if ready.launch is not None:
        with launch_guard(weight.device):
            _dora_weight_norm_kernel[ready.launch.grid](
                weight, lora_A, lora_B, buffers["norm"], N, K, r, *weight.stride(), *lora_A.stride(),
                *lora_B.stride(), float(scaling), **ready.kwargs)
    return buffers["norm"]


def dora_bwd(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, s, saved, scaling: float, *, dropout_p=0.0,
             seed=0, need_dx=True, need_dA=True, need_dm=True):
    """(dX or None, dA or None, dB, dm or None) of dora_fwd's y, from its S and ``saved``: y without dropout, Z
    with. The dS / dB pass on dZ = g dY (with the magnitude's partials from y - b, or from Z), dX, dA, and dm's
    reduction."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    precision = _input_precision(dy.dtype)
    M, N = dy.shape
    r, K = lora_A.shape
    dropout = dropout_p > 0.0
    bias = None if dropout else bias  # Z = z' needs no bias removed
    in_launch = _dora_in_launch_ready(M, N, K, r, dy.dtype, dropout, bias is not None, deterministic, precision,
                                      _num_sms(dy.device), need_dx)
    if in_launch is not None:  # plan_dora_bwd: the dS / dB jobs in the dX launch, then dm's reduction
        in_ready, dm_ready = in_launch
        with launch_guard(dy.device):
            dx, da, db, dm_parts = _bwd_in_launch(in_ready, dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed,
                                                  dora=(magnitude, norm, saved, bias))
            dm = _dora_dm(dm_ready, dm_parts, magnitude, norm, dy, x, weight, s, lora_B, scaling) if need_dm else None
        return dx, da if need_dA else None, db, dm
    with launch_guard(dy.device):
        seed = _seed_arg(seed, dropout_p, dy.device)
        dy_ready = _dy_ready(M, N, r, dy.dtype, deterministic, precision, _num_sms(dy.device), True, bias is not None,
                             dropout)
        ds, db, dm_parts = _bwd_dy(dy_ready, dy, lora_B, s, scaling, dora=(magnitude, norm, saved, bias))
        dx = _bwd_dx(_dx_ready(M, N, K, r, dy.dtype, dropout, precision, True), dy, weight, ds, lora_A, dropout_p,
                     seed, magnitude, norm) if need_dx else None
        da = _bwd_da(_da_ready_for(x, r, dropout_p, deterministic, precision), ds, x, dropout_p,
                     seed) if need_dA else None
        dm = _dora_dm(_dm_ready(M, N, r, dy.dtype, precision, dropout), dm_parts, magnitude, norm, dy, x, weight, s,
                      lora_B, scaling) if need_dm else None
    return dx, da, db, dm


@functools.lru_cache(maxsize=4096)
def _dora_in_launch_ready(M, N, K, r, dtype, dropout, bias, deterministic, precision, num_sms, need_dx):
    """(the dX launch's, the dm reduction's) where plans.plan_dora_bwd puts the dS / dB jobs in the dX launch, else
    None."""
    plan = plan_dora_bwd(M, N, K, r, dtype, dropout=dropout, bias=bias, deterministic=deterministic, num_sms=num_sms,
                         need_dx=need_dx)
    if not plan[0].constexprs.get("DS_IN_LAUNCH"):
        return None
    return _ready(plan, "_lora_bwd_dx_kernel", precision), _ready(plan, "_dora_magnitude_grad_kernel", precision)


def _dora_dm(ready, dm_parts, magnitude, norm, dy, x, weight, s, lora_B, scaling):
    M, N = dy.shape
    K, r = x.shape[1], s.shape[1]
    buffers = _run_torch_ops(ready.before, {"dm": torch.empty(N, device=dy.device, dtype=magnitude.dtype)},
                             dy.device)
    if ready.launch is not None:
        _dora_magnitude_grad_kernel[ready.launch.grid](
            dm_parts, magnitude, norm, buffers["dm"], dy, x, weight, s, lora_B, M, N, K, r,
            magnitude.stride(0), *dy.stride(), *x.stride(), *weight.stride(), *s.stride(), *lora_B.stride(),
            float(scaling), **ready.kwargs)
    return buffers["dm"]
