"""Launch plans of the LoRA kernels: pure functions of sizes, dtype and flags.

Each ``plan_*`` function returns the launches one launcher of fused_lora.kernels.launchers makes: the
kernel's grid, tile config and constexprs, its scratch (partials, atomics, the work after the last program
arrives), and torch ops only where sizes leave a kernel nothing to do (a zeroed grad). The launchers launch exactly
these plans, and
``fused_lora.benchmarks`` models the same launches from the same functions, so its roofline follows
every config change. No tensors, no CUDA, and no triton: importing this imports torch and
``.configs`` only (the benchmark's modeled table runs where triton is not installed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from . import configs, cost


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
    runs on its own buffers (``kernel`` is one of TORCH_OPS: a memset or a fresh zeroed buffer, for empty sizes).

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
    atomic_bytes: int = 0  # fp32 atomic adds into a zero-at-rest accumulator (resolved in L2)
    tail_bytes: int = 0  # bytes one last-to-arrive program moves after the other programs are done
    schedule: cost.Schedule | None = None  # producer jobs beside the tiles: the programs cost.schedule_seconds runs

    def __post_init__(self):
        if self.config is not None:
            limits = (_MAX_GRID_X, _MAX_GRID_YZ, _MAX_GRID_YZ)
            if any(g > limit for g, limit in zip(self.grid, limits)):
                raise ValueError(f"{self.kernel} would launch a grid of {self.grid} programs, beyond CUDA's "
                                 f"limits (x < 2**31, y and z < 65536); the operand shapes are "
                                 f"{[op.shape for op in self.reads + self.writes]}")

    @property
    def is_triton(self) -> bool:
        return self.config is not None

    @property
    def programs(self) -> int | None:
        """The grid's programs; None for a torch op (torch's kernels size their grids to the GPU)."""
        return math.prod(self.grid) if self.is_triton else None

    @property
    def hbm_bytes(self) -> int:
        """Compulsory traffic: each distinct operand read once, each distinct operand written once."""
        reads = {op.name: op.nbytes for op in self.reads}
        writes = {op.name: op.nbytes for op in self.writes}
        return sum(reads.values()) + sum(writes.values())


# The torch ops a plan may contain, named after the call the launcher makes.
ZEROS = "torch.zeros"  # writes: a new zeroed buffer (atomics add into it)
ZERO_ = "torch.Tensor.zero_"  # writes: the launcher's buffer, zeroed in place (an empty reduction)
TORCH_OPS = (ZEROS, ZERO_)

_MAX_GRID_X = 2**31 - 1
_MAX_GRID_YZ = 65535


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _torch_op(kernel: str, *, reads=(), writes=()) -> list[Launch]:
    """A torch op on the launcher's buffers; none when it writes no element (torch launches nothing)."""
    assert kernel in TORCH_OPS, kernel
    if all(math.prod(op.shape) == 0 for op in writes):
        return []
    return [Launch(kernel, reads=tuple(reads), writes=tuple(writes))]


def _block_constexprs(cfg: configs.TileConfig) -> dict:
    """The tile constexprs a kernel with a grouped launch order takes (GROUP_M = 1: no grouping)."""
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M or 1)


def plan_lora_shrink(M: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool, num_sms: int = 132,
                     to_consumer: bool = False) -> list[Launch]:
    """S = dropout(x) A^T on a (row blocks, K splits) grid; with several K splits, each stores its fp32 share and the
    last to arrive at a row block sums them in a fixed order and stores S (configs.shrink_split). ``to_consumer``:
    the shares are left for the forward GEMM, which sums them in the same order and stores S (_fwd_plan), so no
    program sums a row block alone; the launch then writes S_partials instead of S."""
    S = Operand("S", (M, r), dtype)
    if M == 0:
        return []
    if K == 0:
        return _torch_op(ZERO_, writes=[S])
    R = configs.padded_rank(r)
    cfg = configs.shrink_config(R, dtype)
    grid_m, k_tiles = _cdiv(M, cfg.BLOCK_M), _cdiv(K, cfg.BLOCK_K)
    splits, per_split = configs.shrink_split(grid_m, k_tiles, num_sms, to_consumer)
    flops = 2 * grid_m * cfg.BLOCK_M * R * k_tiles * cfg.BLOCK_K
    reads, writes, tail = [Operand("X", (M, K), dtype), Operand("A", (r, K), dtype)], [S], 0
    sum_parts = not to_consumer or splits == 1
    if splits > 1:
        parts = Operand("S_partials", (splits, M, R), torch.float32)
        if sum_parts:
            reads, writes = reads + [parts], [parts] + writes
            tail = min(M, cfg.BLOCK_M) * (R * 4 * splits + r * dtype.itemsize)  # a row block's partials, and its S
        else:
            writes = [parts]
    # SUM_PARTS is in every plan (not only to_consumer ones): the AOT report compiles both as one job (True).
    constexprs = dict(R=R, SPLIT_K=splits > 1, SUM_PARTS=sum_parts, APPLY_DROPOUT=dropout, **cfg.constexprs())
    return [Launch("_lora_shrink_kernel", (grid_m, splits), cfg, constexprs,
                   args=dict(k_per_split=per_split * cfg.BLOCK_K), reads=tuple(reads), writes=tuple(writes),
                   flops=flops, tail_bytes=tail)]


def plan_lora_fwd(M: int, N: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool, bias: bool,
                  fuse_shrink: bool | None = None, dora: bool = False, num_sms: int = 132,
                  shrink_in_launch: bool | None = None) -> list[Launch]:
    """The shrink launch (unless fused, or made inside the GEMM launch) and the forward GEMM launch; ``dora``: DoRA's
    column scale m / n in the epilogue, and with dropout the second base product x' W^T in the same loop and Z = z'
    written. Of fwd_alternatives, the lowest modeled time (kernels/cost.py) at ``num_sms``; ``fuse_shrink`` and
    ``shrink_in_launch`` force one."""
    return min(fwd_alternatives(M, N, K, r, dtype, dropout=dropout, bias=bias, fuse_shrink=fuse_shrink, dora=dora,
                                num_sms=num_sms, shrink_in_launch=shrink_in_launch),
               key=lambda plan: cost.plan_seconds(plan, num_sms))


def fwd_alternatives(M: int, N: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool, bias: bool,
                     fuse_shrink: bool | None = None, dora: bool = False, num_sms: int = 132,
                     shrink_in_launch: bool | None = None) -> list[list[Launch]]:
    """Every forward plan plan_lora_fwd weighs: each (config, shrink fused or not) of configs.fwd_choices, at each K
    split count of configs.fwd_k_splits; an unfused one also with its shares made in the GEMM launch where
    configs.fwd_shrink_in_launch allows, at each width of configs.fwd_in_launch_tiles and share size of
    configs.IN_LAUNCH_SHARE_TILES. ``fuse_shrink=False`` means a shrink launch: not fused, not in the GEMM
    launch; ``shrink_in_launch=True`` forces the in-launch shares (not fused)."""
    in_launch = (configs.fwd_shrink_in_launch(M, configs.padded_rank(r), dtype, dora) and K > 0
                 and fuse_shrink is None and shrink_in_launch is not False)
    if shrink_in_launch:
        if not in_launch:
            raise ValueError(f"the shrink cannot run in the forward launch at M={M}, K={K}, dtype={dtype}, "
                             f"dora={dora}, fuse_shrink={fuse_shrink} (configs.fwd_shrink_in_launch)")
        fuse_shrink = False
    choices = configs.fwd_choices(M, N, configs.padded_rank(r), dtype, dora, dropout)
    if fuse_shrink is not None:
        picked = [choice for choice in choices if choice[1] == fuse_shrink]
        choices = picked[:1] or [(choices[0][0], fuse_shrink)]
    places = (True,) if shrink_in_launch else (False, True) if in_launch else (False,)
    alternatives = []
    for cfg, fuse in choices:
        for splits in configs.fwd_k_splits(M, _cdiv(M, cfg.BLOCK_M) * _cdiv(N, cfg.BLOCK_N), _cdiv(K, cfg.BLOCK_K),
                                           dora, dropout):
            for place in places:
                if not place:
                    alternatives.append(_fwd_plan(M, N, K, r, dtype, cfg, fuse, splits, dropout=dropout, bias=bias,
                                                  dora=dora, num_sms=num_sms))
                elif not fuse and splits == 1:  # the shares in the launch: each tile width and share size
                    alternatives += [_fwd_plan(M, N, K, r, dtype, tiles, False, 1, dropout=dropout, bias=bias,
                                               dora=dora, num_sms=num_sms, share_tiles=share_tiles)
                                     for tiles in configs.fwd_in_launch_tiles(cfg)
                                     for share_tiles in configs.IN_LAUNCH_SHARE_TILES]
    return alternatives


def _fwd_plan(M, N, K, r, dtype, cfg, fuse, splits, *, dropout, bias, dora, num_sms, share_tiles=0) -> list[Launch]:
    """``share_tiles``: the shares made by jobs of the launch itself (SHRINK_IN_LAUNCH), of that many K tiles each."""
    in_launch = share_tiles > 0
    R = configs.padded_rank(r)
    two_products = dora and dropout
    if M == 0 or N == 0:
        return plan_lora_shrink(M, K, r, dtype, dropout=dropout, num_sms=num_sms)
    sums_parts = not fuse and configs.fwd_sums_shrink_parts(M, dtype)
    launches = [] if fuse or in_launch else plan_lora_shrink(M, K, r, dtype, dropout=dropout, num_sms=num_sms,
                                                             to_consumer=sums_parts)
    s_parts = _s_partials(launches)
    grid_m, grid_n, k_tiles = _cdiv(M, cfg.BLOCK_M), _cdiv(N, cfg.BLOCK_N), _cdiv(K, cfg.BLOCK_K)
    schedule = None
    if in_launch:  # grid_m x shares jobs beside the tiles (SHRINK_IN_LAUNCH), which wait after their main loop
        shares, share_tiles = configs.in_launch_shrink_split(k_tiles, share_tiles)
        s_parts = Operand("S_partials", (shares, M, R), torch.float32)
        job = cfg.BLOCK_M * share_tiles * cfg.BLOCK_K * dtype.itemsize + R * share_tiles * cfg.BLOCK_K * \
            dtype.itemsize + cfg.BLOCK_M * R * 4  # one job's x and A columns, and its share
        schedule = cost.Schedule(num_pid_m=grid_m, group_m=cfg.GROUP_M, parts=shares, part_bytes=job, tiles=grid_n,
                                 tiles_wait_at_start=False,
                                 part_flops=2 * cfg.BLOCK_M * share_tiles * cfg.BLOCK_K * R)  # its x' A^T
    Mp, Np, Kp = grid_m * cfg.BLOCK_M, grid_n * cfg.BLOCK_N, k_tiles * cfg.BLOCK_K
    flops = 2 * Mp * Np * Kp * (2 if two_products else 1) + 2 * Mp * Np * R  # x W^T (and x' W^T), S B^T
    if fuse:
        flops += 2 * Mp * Kp * R * grid_n  # every N tile column recomputes its S = x' A^T
    if in_launch:
        flops += 2 * Mp * Kp * R  # the share jobs' x' A^T
    S = Operand("S", (M, r), dtype)
    reads = [Operand("X", (M, K), dtype), Operand("W", (N, K), dtype)]
    reads += [Operand("bias", (N,), dtype)] if bias else []
    reads += [Operand("A", (r, K), dtype)] if fuse or in_launch else [s_parts or S]
    reads += [s_parts] if in_launch else []
    reads += [Operand("B", (N, r), dtype)]
    reads += _dora_scale_operands(N, dtype) if dora else []
    writes = [Operand("Y", (M, N), dtype)] + ([S] if fuse or s_parts else [])
    writes += [Operand("Z", (M, N), dtype)] if two_products else []
    writes += [s_parts] if in_launch else []
    constexprs = dict(R=R, R_CHUNK=configs.rank_chunk(R), HAS_BIAS=bias, FUSE_SHRINK=fuse, APPLY_DROPOUT=dropout,
                      DORA=dora, **_block_constexprs(cfg))
    if sums_parts:  # wherever it may be on: the AOT report compiles both values as one job (True)
        constexprs["S_FROM_PARTS"] = s_parts is not None
    if sums_parts and configs.fwd_shrink_in_launch(M, R, dtype, dora):  # the same
        constexprs["SHRINK_IN_LAUNCH"] = in_launch
    if configs.fwd_may_split(M, dora, dropout):  # compiled with the split by the AOT report (WORST_CASE_FLAGS)
        constexprs["SPLIT_K_PARTIALS"] = splits > 1
    per_split = _cdiv(k_tiles, splits)
    tail = 0
    if splits > 1:
        # Each split stores its fp32 shares; the last to arrive at a tile reads them all and stores the tile.
        parts = [Operand("Y_partials", (splits, M, N), torch.float32)]
        parts += [Operand("S_partials", (grid_n, splits, M, R), torch.float32)] if fuse else []
        reads, writes = reads + parts, writes + parts
        rows = min(M, cfg.BLOCK_M)
        tail = rows * (splits * 4 * (cfg.BLOCK_N + (R if fuse else 0)) + cfg.BLOCK_N * dtype.itemsize)
        tail += rows * R * 4 * s_parts.shape[0] if s_parts else 0  # the shrink's shares, summed in the epilogue
    grid = (grid_m * grid_n, splits) if splits > 1 else (grid_m * grid_n,)
    args = dict(k_per_split=per_split * cfg.BLOCK_K, s_splits=s_parts.shape[0] if s_parts else 1)
    if in_launch:
        grid = (grid_m * (grid_n + shares),)
        args["k_per_split"] = share_tiles * cfg.BLOCK_K  # the share jobs' columns (the tiles walk all of K)
    return launches + [Launch("_lora_fwd_kernel", grid, cfg, constexprs, args=args, reads=tuple(reads),
                              writes=tuple(writes), flops=flops, tail_bytes=tail, schedule=schedule)]


def producers_first_order(num_pid_m: int, num_pid_n: int, parts: int, group_m: int) -> list[tuple[str, int]]:
    """The job of each ticket of a launch with producer jobs (the forward's SHRINK_IN_LAUNCH, the dX launch's
    DS_IN_LAUNCH), as _common._producers_first_job computes it: ("part", row block x parts + split) or ("tile", index
    in grouped order, _common._grouped_tile_of). cost.ticket_order's order, which the model's schedule runs."""
    group_m = max(1, group_m)
    order = []
    for is_part, m, j in cost.ticket_order(num_pid_m, num_pid_n, parts, group_m):
        first = m // group_m * group_m
        size = min(group_m, num_pid_m - first)
        order.append(("part", m * parts + j) if is_part else ("tile", first * num_pid_n + j * size + m - first))
    return order


def _s_partials(shrink: list[Launch]) -> Operand | None:
    """The K splits' shares of S a to_consumer shrink launch left for the forward GEMM; None if it stored S."""
    for launch in shrink:
        if launch.is_triton and not launch.constexprs["SUM_PARTS"]:
            return next(op for op in launch.writes if op.name == "S_partials")
    return None


def _dora_scale_operands(N: int, dtype: torch.dtype) -> list[Operand]:
    """What a launch reads for DoRA's column scale g = m / n (m modeled in the inputs' dtype)."""
    return [Operand("magnitude", (N,), dtype), Operand("norm", (N,), torch.float32)]


def plan_lora_bwd_dy(M: int, N: int, r: int, dtype: torch.dtype, *, deterministic: bool, dora: bool = False,
                     bias: bool = False, dropout: bool = False, num_sms: int = 132) -> list[Launch]:
    """dS and dB from one pass over dY on a (row blocks, N splits) grid, both finished in the kernel: dS summed over
    the N splits, dB over the row blocks (fp32 atomics into a zero-at-rest accumulator, or with ``deterministic``
    per-row-block partials summed in a fixed order), each by the last program to arrive; dS in x's dtype, dB in
    dY's. No memset, sum or cast is launched.

    ``dora``: from dZ = g dY, reading the saved output y (and b with ``bias``), or with ``dropout`` the saved
    Z = z', for the magnitude's per-row-block partials (dm_parts, fp32), which plan_dora_magnitude_grad reduces.
    """
    bias = bias and not dropout  # from Z there is no bias to subtract
    dS = Operand("dS", (M, r), dtype)
    dB = Operand("dB", (N, r), dtype)
    if M == 0 or N == 0:
        return _torch_op(ZERO_, writes=[dS]) + _torch_op(ZEROS, writes=[dB])
    R = configs.padded_rank(r)
    cfg = configs.bwd_dy_config(R, dtype, dora)
    m_blocks, n_tiles = _cdiv(M, cfg.BLOCK_M), _cdiv(N, cfg.BLOCK_N)
    splits, per_split = configs.dy_split(m_blocks, n_tiles, num_sms, cfg.BLOCK_N, M)
    flops = 4 * m_blocks * cfg.BLOCK_M * n_tiles * cfg.BLOCK_N * R  # dY B and dY^T S
    reads = [Operand("dY", (M, N), dtype), Operand("B", (N, r), dtype), Operand("S", (M, r), dtype)]
    writes = [dS]
    if dora:
        reads += [Operand("Z" if dropout else "Y", (M, N), dtype), *_dora_scale_operands(N, dtype)]
        reads += [Operand("bias", (N,), dtype)] if bias else []
        writes += [Operand("dm_parts", (m_blocks, N), torch.float32)]
    reduce, split_n = m_blocks > 1, splits > 1
    use_atomics = (reduce or split_n) and not deterministic
    rows = min(M, cfg.BLOCK_M)
    split_cols = min(N, per_split * cfg.BLOCK_N)
    atomic = tail = 0
    # The last program to arrive finishes a sum: a row block's dS (over the N splits), an N split's dB (over the
    # row blocks). From atomics it reads and re-zeroes the accumulator's tile in one atomic exchange
    # (_common._sum_of_parts); from partials it reads all of them.
    if split_n and use_atomics:
        atomic += splits * M * R * 4 + M * R * 4
        tail += rows * R * 4 + rows * r * dtype.itemsize
    elif split_n:
        parts = Operand("dS_partials", (splits, M, R), torch.float32)
        reads, writes = reads + [parts], writes + [parts]
        tail += rows * (R * 4 * splits + r * dtype.itemsize)
    if reduce and use_atomics:
        atomic += m_blocks * N * r * 4 + N * r * 4
        tail += split_cols * r * (4 + dtype.itemsize)
    elif reduce:
        parts = Operand("dB_partials", (m_blocks, N, r), torch.float32)
        reads, writes = reads + [parts], writes + [parts]
        tail += split_cols * r * (4 * m_blocks + dtype.itemsize)
    writes += [dB]
    constexprs = dict(R=R, SPLIT_N=split_n, REDUCE=reduce, USE_ATOMICS=use_atomics, DORA=dora,
                      HAS_BIAS=dora and bias, **cfg.constexprs())
    return [Launch("_lora_bwd_dy_kernel", (m_blocks, splits), cfg, constexprs,
                   args=dict(n_per_split=per_split * cfg.BLOCK_N), reads=tuple(reads), writes=tuple(writes),
                   flops=flops, atomic_bytes=atomic, tail_bytes=tail)]


def plan_lora_bwd_dx(M: int, N: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool,
                     dora: bool = False) -> list[Launch]:
    """dX = dY W + dropout'(dS A) in one GEMM; ``dora``: (g dY) W + dS A, dY scaled per column in the loop, and
    with dropout dY W + dropout'((g - 1) dY W + dS A), both products in the same loop."""
    if M == 0 or K == 0:
        return []
    R = configs.padded_rank(r)
    two_products = dora and dropout
    cfg = configs.bwd_dx_config(M, dtype, two_products, dora)
    grid_m, grid_k = _cdiv(M, cfg.BLOCK_M), _cdiv(K, cfg.BLOCK_K)
    Mp, Kp, Np = grid_m * cfg.BLOCK_M, grid_k * cfg.BLOCK_K, _cdiv(N, cfg.BLOCK_N) * cfg.BLOCK_N
    flops = 2 * Mp * Kp * (R + Np * (2 if two_products else 1))  # dS A seeds the accumulator, then dY W
    reads = (Operand("dY", (M, N), dtype), Operand("W", (N, K), dtype), Operand("dS", (M, r), dtype),
             Operand("A", (r, K), dtype), *(_dora_scale_operands(N, dtype) if dora else ()))
    constexprs = dict(R=R, R_CHUNK=configs.rank_chunk(R), APPLY_DROPOUT=dropout, DORA=dora,
                      **_block_constexprs(cfg))
    return [Launch("_lora_bwd_dx_kernel", (grid_m * grid_k,), cfg, constexprs, reads=reads,
                   writes=(Operand("dX", (M, K), dtype),), flops=flops)]


def plan_lora_bwd_da(M: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool, deterministic: bool,
                     num_sms: int) -> list[Launch]:
    """dA over SPLIT_M slices of M, finished in the kernel (in x's dtype): the last slice to arrive at each K tile
    sums them, from fp32 atomics into a zero-at-rest accumulator or, with ``deterministic``, from per-slice
    partials in a fixed order. No memset, sum or cast is launched."""
    dA = Operand("dA", (r, K), dtype)
    if M == 0 or K == 0:
        return _torch_op(ZEROS, writes=[dA])
    R = configs.padded_rank(r)
    cfg = configs.bwd_da_config(R, dtype)
    splits, per_split = configs.da_split(M, K, cfg.BLOCK_M, cfg.BLOCK_K, num_sms)
    reduce = splits > 1
    use_atomics = reduce and not deterministic
    k_blocks, m_blocks = _cdiv(K, cfg.BLOCK_K), _cdiv(M, cfg.BLOCK_M)
    flops = 2 * k_blocks * cfg.BLOCK_K * m_blocks * cfg.BLOCK_M * R
    reads, writes = [Operand("dS", (M, r), dtype), Operand("X", (M, K), dtype)], [dA]
    atomic = tail = 0
    if use_atomics:
        atomic = splits * r * K * 4 + r * K * 4
        tail = cfg.BLOCK_K * r * (4 + dtype.itemsize)
    elif reduce:
        parts = Operand("dA_partials", (splits, r, K), torch.float32)
        reads, writes = reads + [parts], [parts] + writes
        tail = cfg.BLOCK_K * r * (4 * splits + dtype.itemsize)
    constexprs = dict(R=R, REDUCE=reduce, USE_ATOMICS=use_atomics, APPLY_DROPOUT=dropout, **cfg.constexprs())
    return [Launch("_lora_bwd_da_kernel", (k_blocks, splits), cfg, constexprs, args=dict(m_blocks_per_split=per_split),
                   reads=tuple(reads), writes=tuple(writes), flops=flops, atomic_bytes=atomic, tail_bytes=tail)]


# The columns of N or K a DS_IN_LAUNCH dB or dA job sums at a time (over its group's rows): longer jobs hold a slot
# longer, shorter ones re-read their rows' S or dS more often. The backward at 4096 -> 1024, r = 64 (bf16) models
# 9.5 us at 256 tokens with 64 (10.8 with 32 or 128), 23.4 at 1024 tokens (22.5 with 128, 26.0 with 32) and 126.8 at
# 8192 (121.5 with 128, 142.9 with 32; cost.schedule_seconds): 64 is kept, as a constexpr one value compiles once.
JOB_COLS = 64
# The rows a DS_IN_LAUNCH dS job sums at a time (the dm partials' rows with DoRA): 128-row dX tiles take two.
DS_ROWS = 64


def plan_lora_bwd_in_launch(M: int, N: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool,
                            num_sms: int, dora: bool = False, bias: bool = False,
                            group_m: int | None = None) -> list[Launch]:
    """The backward as one _lora_bwd_dx_kernel launch with DS_IN_LAUNCH (configs.bwd_ds_in_launch). Per row block of
    the dX tiles: dS jobs (plan_lora_bwd_dy's pass without dB, summed over the N splits by fp32 atomics), which take
    lower tickets than the group's tiles (_common._producers_first_job); then per group dA jobs, which wait for
    their group's dS, and dB jobs, before or after (64-row tiles: configs.IN_LAUNCH_TILES_FIRST) the dX tiles, which
    wait for their row block's dS and add dropout'(dS A). A dB or dA job sums a group of GROUP_M row blocks in
    registers (JOB_COLS columns of N or K at a time): dB = s dY^T S and dA = dS^T dropout(x) are summed over the
    groups by fp32 atomics, and the last group to arrive at a chunk stores it (a lone group stores its sums). The dX
    tiles wait for dS after their main loop but with LoRA's dropout on 128-row tiles (_lora_bwd_dx_tile's DS_LATE).
    ``dora``: the dS / dB jobs from dZ = g dY, the dS jobs with the magnitude's partials (plan_lora_bwd_dy's), the
    tiles' dX as plan_lora_bwd_dx's; plan_dora_magnitude_grad follows with block_m = DS_ROWS. Of every group size of
    configs.IN_LAUNCH_GROUP_M (``group_m`` forces one), job order and N split of the dS jobs, the lowest modeled time
    (kernels/cost.py, its schedule) at ``num_sms``."""
    cfg = configs.bwd_dx_config(M, dtype, dora and dropout, dora)
    sizes = configs.IN_LAUNCH_GROUP_M if group_m is None else (group_m,)
    return min((_in_launch_plan(M, N, K, r, dtype, replace(cfg, GROUP_M=size), dropout=dropout, num_sms=num_sms,
                                dora=dora, bias=bias) for size in sizes),
               key=lambda plan: cost.plan_seconds(plan, num_sms))


def _in_launch_plan(M, N, K, r, dtype, cfg, *, dropout, num_sms, dora, bias) -> list[Launch]:
    R = configs.padded_rank(r)
    two_products = dora and dropout
    bias = dora and bias and not dropout  # from Z there is no bias to subtract
    # A dS job covers a dX row block (one counter of dS readiness per row block) DS_ROWS rows at a time, and the
    # dS / dB pass's columns.
    dy_cfg = configs.TileConfig(BLOCK_M=DS_ROWS, BLOCK_N=configs.bwd_dy_config(R, dtype, dora).BLOCK_N)
    grid_m, grid_k = _cdiv(M, cfg.BLOCK_M), _cdiv(K, cfg.BLOCK_K)
    m_blocks, n_tiles = grid_m * (cfg.BLOCK_M // DS_ROWS), _cdiv(N, dy_cfg.BLOCK_N)
    n_chunks, k_chunks = _cdiv(N, JOB_COLS), _cdiv(K, JOB_COLS)
    groups, group_m = _cdiv(grid_m, cfg.GROUP_M), min(grid_m, cfg.GROUP_M)
    db_slots, da_slots = _cdiv(n_chunks, group_m), _cdiv(k_chunks, group_m)
    Mp, Kp, Np = grid_m * cfg.BLOCK_M, grid_k * cfg.BLOCK_K, _cdiv(N, cfg.BLOCK_N) * cfg.BLOCK_N
    rows = _cdiv(M, 64) * 64  # the dB and dA jobs' 64-row slices
    flops = (2 * Mp * Kp * (Np * (2 if two_products else 1) + R)  # dY W (and (g - 1) dY W) and dS A
             + 2 * m_blocks * dy_cfg.BLOCK_M * n_tiles * dy_cfg.BLOCK_N * R  # dY B
             + 2 * rows * n_chunks * JOB_COLS * R  # dY^T S
             + 2 * rows * k_chunks * JOB_COLS * R)  # dropout(x)^T dS
    # The dB jobs read dY again, a group's rows after its dS jobs: counted as a second read, no L2 hit credited.
    reads = (Operand("dY", (M, N), dtype), Operand("dY, again for dB", (M, N), dtype), Operand("W", (N, K), dtype),
             Operand("A", (r, K), dtype), Operand("B", (N, r), dtype), Operand("S", (M, r), dtype),
             Operand("X", (M, K), dtype))
    writes = (Operand("dX", (M, K), dtype), Operand("dS", (M, r), dtype), Operand("dB", (N, r), dtype),
              Operand("dA", (r, K), dtype))
    if dora:
        reads += (Operand("Z" if dropout else "Y", (M, N), dtype), *_dora_scale_operands(N, dtype))
        reads += (Operand("bias", (N,), dtype),) if bias else ()
        writes += (Operand("dm_parts", (m_blocks, N), torch.float32),)
    # The last arrival's sum of a row block's dS (as plan_lora_bwd_dy's): part of what its dS jobs take.
    ds_sum = min(M, DS_ROWS) * (R * 4 + r * dtype.itemsize)
    # A lone group stores its sums as the grads (the kernel's LONE_GROUP_STORES): no atomics, no final read.
    lone = groups == 1 and (cfg.BLOCK_M == DS_ROWS or dora or not dropout)
    final_sum = JOB_COLS * r * ((0 if lone else 4) + dtype.itemsize)

    sizes = cost.group_sizes(grid_m, cfg.GROUP_M)  # the schedule's (cost.Schedule.group_sizes)
    group_rows = [min(M - g * group_m * cfg.BLOCK_M, size * cfg.BLOCK_M) for g, size in enumerate(sizes)]

    def group_jobs(chunks: int, slots: int, wait_for_parts: bool) -> cost.SideJobs:
        """The dA or dB jobs: what one job of each group moves (its chunks of the group's rows, and their final sums,
        counted in every group: the last to arrive at a chunk is not known ahead) and computes (in 64-row slices)."""
        per_job = [_cdiv(chunks, slots * size) for size in sizes]
        return cost.SideJobs(slots, tuple(n * (rows * (JOB_COLS + R) * dtype.itemsize + final_sum)
                                          for n, rows in zip(per_job, group_rows)), wait_for_parts=wait_for_parts,
                             flops_by_group=tuple(2 * n * _cdiv(rows, 64) * 64 * JOB_COLS * R
                                                  for n, rows in zip(per_job, group_rows)))

    side_jobs = (group_jobs(k_chunks, da_slots, wait_for_parts=True), group_jobs(n_chunks, db_slots, False))
    constexprs = dict(R=R, R_CHUNK=configs.rank_chunk(R), APPLY_DROPOUT=dropout, DORA=dora, DS_IN_LAUNCH=True,
                      DY_BLOCK_N=dy_cfg.BLOCK_N, DS_ROWS=DS_ROWS, JOB_COLS=JOB_COLS, HAS_BIAS=bias,
                      **_block_constexprs(cfg))

    def launch(per_split: int, tiles_first: bool) -> Launch:
        splits = _cdiv(n_tiles, per_split)
        atomic = ((splits + 1) * M * R * 4  # dS over the N splits, and the last split's exchange with 0
                  + (0 if lone else groups + 1) * (N * r + r * K) * 4)  # dB and dA over the groups
        split_cols = min(N, per_split * dy_cfg.BLOCK_N)
        # One dS job (its dY columns, B's rows) and the sum the last of a row block's makes. The tiles wait for
        # their row block's after their main loop, but with LoRA's dropout on 128-row tiles before it
        # (dropout'(dS A) seeds their accumulator): _lora_bwd_dx_tile's DS_LATE.
        schedule = cost.Schedule(num_pid_m=grid_m, group_m=cfg.GROUP_M, parts=splits,
                                 part_bytes=cfg.BLOCK_M * split_cols * dtype.itemsize
                                 + split_cols * r * dtype.itemsize + ds_sum,
                                 tiles=grid_k, tiles_wait_at_start=dropout and not dora and cfg.BLOCK_M != DS_ROWS,
                                 side_jobs=side_jobs, tiles_first=tiles_first,
                                 part_flops=2 * cfg.BLOCK_M * split_cols * R)  # its dY B
        return Launch("_lora_bwd_dx_kernel", (grid_m * (splits + db_slots + grid_k + da_slots),), cfg, constexprs,
                      args=dict(n_per_split=per_split * dy_cfg.BLOCK_N, dy_splits=splits, db_slots=db_slots,
                                da_slots=da_slots, tiles_first=int(tiles_first)),
                      reads=reads, writes=writes, flops=flops, atomic_bytes=atomic, schedule=schedule)

    # The N split of the dS jobs trades dS's atomics (one (M, R) fp32 add per split) against the first tiles' wait
    # (one job's columns) and the slots the jobs take: every split count, with each job order, is weighed by its
    # modeled time (its schedule).
    candidates = {_cdiv(n_tiles, splits) for splits in range(1, n_tiles + 1)}
    return [min((launch(per_split, tiles_first) for per_split in sorted(candidates)
                 for tiles_first in (configs.IN_LAUNCH_TILES_FIRST if cfg.BLOCK_M == DS_ROWS else (False,))),
                key=lambda planned: cost.plan_seconds([planned], num_sms))]


def plan_lora_bwd(M: int, N: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool, deterministic: bool,
                  num_sms: int, need_dx: bool = True, one_launch: bool | None = None) -> list[Launch]:
    """The backward's launches: the whole of it in one _lora_bwd_dx_da_db_kernel launch (dA and dB stored in the
    inputs' dtype; with several row blocks summed over them by fp32 atomics, finished by the last program to
    arrive), or in one _lora_bwd_dx_kernel launch with the dS / dB jobs inside (plan_lora_bwd_in_launch), or
    plan_lora_bwd_dy, plan_lora_bwd_dx (with ``need_dx``) and plan_lora_bwd_da. For one row block the first, wherever
    configs.bwd_one_launch_config gives tiles; above it the one of the lowest modeled time (kernels/cost.py, at
    ``num_sms``, all with dX). Without ``need_dx`` COMPUTE_DX is off (no W read), and dA / dB are the same as with
    it; the in-launch plan needs the dX tiles, so without ``need_dx`` the other two are weighed. ``one_launch``
    forces the choice of _lora_bwd_dx_da_db_kernel or not where the tiles allow it."""
    def separate(need_dx: bool) -> list[Launch]:
        return (plan_lora_bwd_dy(M, N, r, dtype, deterministic=deterministic, num_sms=num_sms)
                + (plan_lora_bwd_dx(M, N, K, r, dtype, dropout=dropout) if need_dx else [])
                + plan_lora_bwd_da(M, K, r, dtype, dropout=dropout, deterministic=deterministic, num_sms=num_sms))

    cfg = configs.bwd_one_launch_config(M, K, configs.padded_rank(r), dtype, deterministic)
    in_launch = (configs.bwd_ds_in_launch(M, configs.padded_rank(r), dtype, deterministic) and need_dx and N > 0
                 and K > 0 and one_launch is None)
    if (cfg is None and not in_launch) or N == 0 or K == 0 or one_launch is False:
        return separate(need_dx)
    if one_launch is None and M > configs.FEW_TOKENS:
        candidates = [separate(True)]
        candidates += [_one_launch_plan(M, N, K, r, dtype, cfg, dropout=dropout, need_dx=True)] if cfg else []
        candidates += [plan_lora_bwd_in_launch(M, N, K, r, dtype, dropout=dropout, num_sms=num_sms)] if in_launch \
            else []
        best = min(candidates, key=lambda plan: cost.plan_seconds(plan, num_sms))
        if need_dx:
            return best
        if best is candidates[0]:
            return separate(False)
    return _one_launch_plan(M, N, K, r, dtype, cfg, dropout=dropout, need_dx=need_dx)


def _one_launch_plan(M, N, K, r, dtype, cfg, *, dropout, need_dx) -> list[Launch]:
    R = configs.padded_rank(r)
    side = configs.ONE_LAUNCH_SIDE
    m_blocks, k_blocks = _cdiv(M, cfg.BLOCK_M), _cdiv(K, cfg.BLOCK_K)
    Mp, Np, Kp = m_blocks * cfg.BLOCK_M, _cdiv(N, cfg.BLOCK_N) * cfg.BLOCK_N, k_blocks * cfg.BLOCK_K
    da_tiles, db_tiles = _cdiv(K, side), _cdiv(N, side)
    flops = (2 * Mp * Np * R * k_blocks  # dY B, recomputed by every program of a row block
             + (2 * Mp * Np * Kp + 2 * Mp * Kp * R if need_dx else 0)  # dY W and dS A
             + 2 * Mp * R * (da_tiles + db_tiles) * side)  # the dA and dB tiles
    reads = (Operand("dY", (M, N), dtype), Operand("X", (M, K), dtype),
             *((Operand("W", (N, K), dtype), Operand("A", (r, K), dtype)) if need_dx else ()),
             Operand("B", (N, r), dtype), Operand("S", (M, r), dtype))
    writes = ((Operand("dX", (M, K), dtype),) if need_dx else ()) + (Operand("dA", (r, K), dtype),
                                                                     Operand("dB", (N, r), dtype))
    reduce = m_blocks > 1
    atomic = tail = 0
    if reduce:
        # Every row block adds its dA and dB shares; the last of a K slice's programs (one per row block) to arrive
        # reads, re-zeroes and stores that slice's dA and dB tiles.
        atomic = (m_blocks + 1) * (r * K + N * r) * 4
        tail = (_cdiv(da_tiles, k_blocks) + _cdiv(db_tiles, k_blocks)) * side * R * (4 + dtype.itemsize)
    constexprs = dict(R=R, BLOCK_SIDE=side, COMPUTE_DX=need_dx, REDUCE=reduce, APPLY_DROPOUT=dropout,
                      **_block_constexprs(cfg))
    return [Launch("_lora_bwd_dx_da_db_kernel", (m_blocks * k_blocks,), cfg, constexprs, reads=reads,
                   writes=writes, flops=flops, atomic_bytes=atomic, tail_bytes=tail)]


def plan_dora_bwd(M: int, N: int, K: int, r: int, dtype: torch.dtype, *, dropout: bool, bias: bool,
                  deterministic: bool, num_sms: int, need_dx: bool = True) -> list[Launch]:
    """DoRA's backward (dX, dA, dB, then dm): the dS / dB pass on dZ = g dY (plan_lora_bwd_dy with dora), the dX
    (plan_lora_bwd_dx with dora) and dA launches and the magnitude's reduction; or, of the lower modeled time where
    configs.bwd_ds_in_launch allows (dX wanted), the dX launch with the dS / dB jobs inside
    (plan_lora_bwd_in_launch) and the reduction."""
    separate = (plan_lora_bwd_dy(M, N, r, dtype, deterministic=deterministic, dora=True, bias=bias, dropout=dropout,
                                 num_sms=num_sms)
                + (plan_lora_bwd_dx(M, N, K, r, dtype, dropout=dropout, dora=True) if need_dx else [])
                + plan_lora_bwd_da(M, K, r, dtype, dropout=dropout, deterministic=deterministic, num_sms=num_sms)
                + plan_dora_magnitude_grad(M, N, r, dtype, dropout=dropout))
    R = configs.padded_rank(r)
    if not (configs.bwd_ds_in_launch(M, R, dtype, deterministic, True, dropout) and need_dx and N > 0 and K > 0):
        return separate
    one = plan_lora_bwd_in_launch(M, N, K, r, dtype, dropout=dropout, num_sms=num_sms, dora=True, bias=bias)
    one += plan_dora_magnitude_grad(M, N, r, dtype, dropout=dropout, block_m=one[0].constexprs["DS_ROWS"])
    return min((separate, one), key=lambda plan: cost.plan_seconds(plan, num_sms))


def plan_dora_weight_norm(N: int, K: int, r: int, dtype: torch.dtype) -> list[Launch]:
    """n = ||W + s B A|| per row (N,) fp32 from W + s B A formed tile by tile in registers."""
    norm = Operand("norm", (N,), torch.float32)
    if N == 0:
        return []
    if K == 0:
        return _torch_op(ZERO_, writes=[norm])
    R = configs.padded_rank(r)
    cfg = configs.dora_norm_config(N, R, dtype)
    grid_n = _cdiv(N, cfg.BLOCK_N)
    flops = 2 * grid_n * cfg.BLOCK_N * R * _cdiv(K, cfg.BLOCK_K) * cfg.BLOCK_K  # B A, tile by tile
    r_chunk = configs.rank_chunk(R) if dtype == torch.float32 else R
    return [Launch("_dora_weight_norm_kernel", (grid_n,), cfg, dict(R=R, R_CHUNK=r_chunk, **cfg.constexprs()),
                   reads=(Operand("W", (N, K), dtype), Operand("A", (r, K), dtype), Operand("B", (N, r), dtype)),
                   writes=(norm,), flops=flops)]


def plan_dora_magnitude_grad(M: int, N: int, r: int, dtype: torch.dtype, *, dropout: bool = False,
                             block_m: int | None = None) -> list[Launch]:
    """dm (N,) from the dS / dB pass's per-row-block partials (plan_lora_bwd_dy with dora; ``block_m``: that pass's
    rows per block when it ran inside the dX launch, plan_lora_bwd_in_launch), reduced in a fixed order and divided
    by m (by n with ``dropout``, whose partials come from Z): deterministic. Modeled without the m == 0 recompute (a
    branch no trained magnitude takes)."""
    dm = Operand("dm", (N,), dtype)
    if N == 0:
        return []
    parts = _cdiv(M, block_m or configs.bwd_dy_config(configs.padded_rank(r), dtype, dora=True).BLOCK_M)
    if M == 0:
        return _torch_op(ZERO_, writes=[dm])
    cfg = configs.dora_magnitude_config(dtype)
    constexprs = dict(R_CHUNK=16, BLOCK_P=16, FROM_Z=dropout, **cfg.constexprs())
    return [Launch("_dora_magnitude_grad_kernel", (_cdiv(N, cfg.BLOCK_N),), cfg, constexprs,
                   args=dict(parts=parts),
                   reads=(Operand("dm_parts", (parts, N), torch.float32), *_dora_scale_operands(N, dtype)),
                   writes=(dm,))]


def find_launch(plan: list[Launch], kernel: str) -> Launch | None:
    """The plan's launch of ``kernel``; None when the plan does not launch it (empty sizes)."""
    found = [launch for launch in plan if launch.kernel == kernel]
    return found[0] if found else None
