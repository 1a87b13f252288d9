"""Launchers for the LoRA kernels. Inputs are 2-D and already validated by fused_lora.

Each launcher mirrors one formula of the LoRA layer; the pure-torch versions of the same formulas
live in fused_lora.reference.

Each launcher first asks a pure ``plan_*`` function (sizes, dtype and flags in; no tensors, no CUDA,
no triton) for the launches it will make: the kernel's grid, tile config and constexprs, and the
torch ops around it (memsets for atomics, reductions of per-tile partials). The launcher then
launches exactly that plan, so ``fused_lora.benchmarks`` models the same launches from the same
functions and its roofline follows every config change.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

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


# ----------------------------------------------------------------------------------------------
# Plans: pure functions of sizes, dtype and flags.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Operand:
    """A tensor a launch reads or writes, by role (``X``, ``W``, ``dB_partials``...)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Launch:
    """One GPU launch: a Triton kernel (``kernel`` is its function name), or a torch op the launcher
    runs on its own buffers (``zeros``, ``zero_``, ``sum(0)``).

    ``flops`` counts the dots as the kernel executes them: whole tiles (edge tiles are masked, not
    skipped) and the padded rank R, since tl.dot runs on the padded operands.
    """
    kernel: str
    grid: tuple[int, ...] = ()
    config: configs.TileConfig | None = None
    constexprs: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)  # runtime scalars the plan derives
    reads: tuple[Operand, ...] = ()
    writes: tuple[Operand, ...] = ()
    flops: int = 0

    @property
    def is_triton(self) -> bool:
        return self.config is not None

    def operand(self, name: str) -> Operand:
        for op in self.reads + self.writes:
            if op.name == name:
                return op
        raise KeyError(f"{self.kernel} has no operand {name!r}")

    @property
    def hbm_bytes(self) -> int:
        """Compulsory traffic: each distinct operand read once, each distinct operand written once."""
        reads = {op.name: op.nbytes for op in self.reads}
        writes = {op.name: op.nbytes for op in self.writes}
        return sum(reads.values()) + sum(writes.values())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _torch_op(kernel: str, *, reads=(), writes=()) -> list[Launch]:
    """A torch op on the launcher's buffers; none when it writes no element (torch launches nothing)."""
    if all(math.prod(op.shape) == 0 for op in writes):
        return []
    return [Launch(kernel, reads=tuple(reads), writes=tuple(writes))]


def _block_constexprs(cfg: configs.TileConfig) -> dict:
    """The tile constexprs a kernel with a grouped launch order takes (GROUP_M = 1: no grouping)."""
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M or 1)


def plan_lora_shrink(M: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool) -> list[Launch]:
    S = Operand("S", (M, r), dtype)
    if M == 0:
        return []
    if K == 0:
        return _torch_op("zero_", writes=[S])
    R = configs.padded_rank(r)
    cfg = configs.shrink_config(R, dtype)
    grid_m = _cdiv(M, cfg.BLOCK_M)
    flops = 2 * grid_m * cfg.BLOCK_M * R * _cdiv(K, cfg.BLOCK_K) * cfg.BLOCK_K
    return [Launch("_lora_shrink_kernel", (grid_m,), cfg, dict(R=R, APPLY_DROPOUT=dropout, **cfg.constexprs()),
                   reads=(Operand("X", (M, K), dtype), Operand("A", (r, K), dtype)), writes=(S,), flops=flops)]


def plan_lora_fwd(M: int, N: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool, bias: bool,
                  fuse_shrink: bool | None = None) -> list[Launch]:
    """The shrink launch (unless fused) and the forward GEMM launch."""
    R = configs.padded_rank(r)
    cfg, fuse = configs.fwd_config(M, R, dtype)
    if fuse_shrink is not None:
        fuse = fuse_shrink
    if M == 0 or N == 0:
        fuse = False
    launches = [] if fuse else plan_lora_shrink(M, K, r, dtype, dropout=dropout)
    if M == 0 or N == 0:
        return launches
    grid_m, grid_n = _cdiv(M, cfg.BLOCK_M), _cdiv(N, cfg.BLOCK_N)
    Mp, Np, Kp = grid_m * cfg.BLOCK_M, grid_n * cfg.BLOCK_N, _cdiv(K, cfg.BLOCK_K) * cfg.BLOCK_K
    flops = 2 * Mp * Np * Kp + 2 * Mp * Np * R  # x W^T, then S B^T over the padded rank
    if fuse:
        flops += 2 * Mp * Kp * R * grid_n  # every N tile column recomputes its S = x' A^T
    S = Operand("S", (M, r), dtype)
    reads = [Operand("X", (M, K), dtype), Operand("W", (N, K), dtype)]
    reads += [Operand("bias", (N,), dtype)] if bias else []
    reads += [Operand("A", (r, K), dtype)] if fuse else [S]
    reads += [Operand("B", (N, r), dtype)]
    writes = [Operand("Y", (M, N), dtype)] + ([S] if fuse else [])
    constexprs = dict(R=R, R_CHUNK=configs.rank_chunk(R), HAS_BIAS=bias, FUSE_SHRINK=fuse, APPLY_DROPOUT=dropout,
                      **_block_constexprs(cfg))
    return launches + [Launch("_lora_fwd_kernel", (grid_m * grid_n,), cfg, constexprs,
                              reads=tuple(reads), writes=tuple(writes), flops=flops)]


def plan_lora_bwd_dy(M: int, N: int, r: int, dtype: torch.dtype, *, deterministic: bool) -> list[Launch]:
    """dS and dB from one pass over dY; dB via fp32 atomics, or per-row-block partials and a sum."""
    dS = Operand("dS", (M, r), dtype)
    dB = Operand("dB", (N, r), torch.float32)
    if M == 0 or N == 0:
        return _torch_op("zero_", writes=[dS]) + _torch_op("zeros", writes=[dB])
    R = configs.padded_rank(r)
    cfg = configs.bwd_dy_config(R, dtype)
    m_blocks = _cdiv(M, cfg.BLOCK_M)
    flops = 4 * m_blocks * cfg.BLOCK_M * _cdiv(N, cfg.BLOCK_N) * cfg.BLOCK_N * R  # dY B and dY^T S
    reads = (Operand("dY", (M, N), dtype), Operand("B", (N, r), dtype), Operand("S", (M, r), dtype))
    constexprs = dict(R=R, USE_ATOMICS=not deterministic, **cfg.constexprs())
    if deterministic:
        partials = Operand("dB_partials", (m_blocks, N, r), torch.float32)
        return [Launch("_lora_bwd_dy_kernel", (m_blocks,), cfg, constexprs, reads=reads, writes=(dS, partials),
                       flops=flops)] + _torch_op("sum(0)", reads=[partials], writes=[dB])
    return _torch_op("zeros", writes=[dB]) + [
        Launch("_lora_bwd_dy_kernel", (m_blocks,), cfg, constexprs, reads=reads, writes=(dS, dB), flops=flops)]


def plan_lora_bwd_dx(M: int, N: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool) -> list[Launch]:
    if M == 0 or K == 0:
        return []
    R = configs.padded_rank(r)
    cfg = configs.bwd_dx_config(M, dtype)
    grid_m, grid_k = _cdiv(M, cfg.BLOCK_M), _cdiv(K, cfg.BLOCK_K)
    Mp, Kp, Np = grid_m * cfg.BLOCK_M, grid_k * cfg.BLOCK_K, _cdiv(N, cfg.BLOCK_N) * cfg.BLOCK_N
    flops = 2 * Mp * Kp * (R + Np)  # dS A seeds the accumulator, then dY W
    reads = (Operand("dY", (M, N), dtype), Operand("W", (N, K), dtype), Operand("dS", (M, r), dtype),
             Operand("A", (r, K), dtype))
    constexprs = dict(R=R, R_CHUNK=configs.rank_chunk(R), APPLY_DROPOUT=dropout, **_block_constexprs(cfg))
    return [Launch("_lora_bwd_dx_kernel", (grid_m * grid_k,), cfg, constexprs, reads=reads,
                   writes=(Operand("dX", (M, K), dtype),), flops=flops)]


def plan_lora_bwd_da(M: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool, deterministic: bool,
                     num_sms: int) -> list[Launch]:
    """dA over SPLIT_M slices of M: fp32 atomics into a zeroed dA, or partials and a sum."""
    dA = Operand("dA", (r, K), torch.float32)
    if M == 0 or K == 0:
        return _torch_op("zeros", writes=[dA])
    R = configs.padded_rank(r)
    cfg = configs.bwd_da_config(R, dtype)
    splits, per_split = configs.da_split(M, K, cfg.BLOCK_M, cfg.BLOCK_K, num_sms)
    use_atomics = splits > 1 and not deterministic
    k_blocks, m_blocks = _cdiv(K, cfg.BLOCK_K), _cdiv(M, cfg.BLOCK_M)
    flops = 2 * k_blocks * cfg.BLOCK_K * m_blocks * cfg.BLOCK_M * R
    reads = (Operand("dS", (M, r), dtype), Operand("X", (M, K), dtype))
    constexprs = dict(R=R, USE_ATOMICS=use_atomics, APPLY_DROPOUT=dropout, **cfg.constexprs())

    def kernel(out: Operand) -> Launch:
        return Launch("_lora_bwd_da_kernel", (k_blocks, splits), cfg, constexprs,
                      args=dict(m_blocks_per_split=per_split), reads=reads, writes=(out,), flops=flops)

    if use_atomics:
        return _torch_op("zeros", writes=[dA]) + [kernel(dA)]
    partials = Operand("dA_partials", (splits, r, K), torch.float32)
    return [kernel(partials)] + _torch_op("sum(0)", reads=[partials], writes=[dA])


def _triton_launch(plan: list[Launch], kernel: str) -> Launch | None:
    found = [launch for launch in plan if launch.kernel == kernel]
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

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


def _dropout_scalars(dropout_p: float, seed: int) -> dict:
    """Runtime dropout arguments; APPLY_DROPOUT (a constexpr) comes from the plan."""
    if dropout_p > 0.0:
        return dict(seed=seed, drop_threshold=drop_threshold(dropout_p), keep_scale=keep_scale(dropout_p))
    return dict(seed=0, drop_threshold=0, keep_scale=1.0)


def _buffer(op: Operand, device, *, zeroed: bool = False) -> torch.Tensor:
    return (torch.zeros if zeroed else torch.empty)(op.shape, device=device, dtype=op.dtype)


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, *, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """S = dropout(x) A^T, (M, r) in x's dtype, fp32 accumulation."""
    M, K = x.shape
    r = lora_A.shape[0]
    s = torch.empty((M, r), device=x.device, dtype=x.dtype)
    launch = _triton_launch(plan_lora_shrink(M, K, r, x.dtype, dropout=dropout_p > 0.0), "_lora_shrink_kernel")
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
    launch = _triton_launch(plan, "_lora_fwd_kernel")
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
    """(dS, dB) from one pass over dY: dS = s dY B (x's dtype), dB = s dY^T S (fp32)."""
    M, N = dy.shape
    r = lora_B.shape[1]
    ds = torch.empty((M, r), device=dy.device, dtype=s.dtype)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    plan = plan_lora_bwd_dy(M, N, r, dy.dtype, deterministic=deterministic)
    launch = _triton_launch(plan, "_lora_bwd_dy_kernel")
    if launch is None:  # M == 0 or N == 0
        return ds.zero_(), torch.zeros((N, r), device=dy.device, dtype=torch.float32)
    _prepare()
    use_atomics = launch.constexprs["USE_ATOMICS"]
    db = _buffer(launch.operand("dB" if use_atomics else "dB_partials"), dy.device, zeroed=use_atomics)
    _lora_bwd_dy_kernel[launch.grid](
        dy, lora_B, s, ds, db, M, N, r,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        ds.stride(0), ds.stride(1), float(scaling), INPUT_PRECISION=_input_precision(dy.dtype),
        **launch.constexprs, **launch.config.launch_options())
    return ds, (db if use_atomics else db.sum(0))


def lora_bwd_dx(dy, weight, ds, lora_A, *, dropout_p: float = 0.0, seed: int = 0):
    """dX = dY W + dropout'(dS A), one fused GEMM (the LoRA term seeds the accumulator)."""
    M, N = dy.shape
    r, K = lora_A.shape
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    launch = _triton_launch(plan_lora_bwd_dx(M, N, K, r, dy.dtype, dropout=dropout_p > 0.0), "_lora_bwd_dx_kernel")
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
    """dA = dS^T dropout(x), (r, K) in fp32, reduced over M in SPLIT_M slices."""
    M, K = x.shape
    r = ds.shape[1]
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    plan = plan_lora_bwd_da(M, K, r, x.dtype, dropout=dropout_p > 0.0, deterministic=deterministic,
                            num_sms=_num_sms(x.device) if M and K else 1)
    launch = _triton_launch(plan, "_lora_bwd_da_kernel")
    if launch is None:  # M == 0 or K == 0
        return torch.zeros((r, K), device=x.device, dtype=torch.float32)
    _prepare()
    use_atomics = launch.constexprs["USE_ATOMICS"]
    da = _buffer(launch.operand("dA" if use_atomics else "dA_partials"), x.device, zeroed=use_atomics)
    _lora_bwd_da_kernel[launch.grid](
        ds, x, da, M, K, r, ds.stride(0), ds.stride(1), x.stride(0), x.stride(1),
        **launch.args, **_dropout_scalars(dropout_p, seed), INPUT_PRECISION=_input_precision(x.dtype),
        **launch.constexprs, **launch.config.launch_options())
    return da if use_atomics else da.sum(0)
