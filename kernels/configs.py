"""Tile configurations the launchers choose from, per kernel, dtype, padded rank and token regime.

Every function here is pure (no CUDA queries): the plans (``plans.py``) call them, and the
ahead-of-time report enumerates the plans.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

MAX_RANK = 256
PADDED_RANKS = (16, 32, 64, 128, 256)
# At or below this many tokens the forward and dX GEMMs are bound by reading W (decode-like).
FEW_TOKENS = 64
# Up to this many tokens the forward and dX GEMMs take 64-row tiles (the grid of 128-row ones under-fills the SMs).
MID_TOKENS = 2048
# Programs a W-bound few-token grid should have: an H100 has 132 SMs (an A100 108).
FILL_PROGRAMS = 128
# Fusing the shrink into the forward GEMM re-reads A once per N tile (R / BLOCK_N of W's bytes, from L2) and
# recomputes S there (R / BLOCK_N more FLOPs): up to this rank in fp32 and in DoRA's tiles (fwd_choices); 16-bit
# LoRA tiles fuse up to ONE_LAUNCH_BWD_MAX_RANK where the plan's modeled time says it wins.
FUSE_SHRINK_MAX_RANK = 32
# The group sizes (row blocks) the dX launch with the dS jobs inside is weighed at (plans.plan_lora_bwd_in_launch):
# its dA and dB jobs sum a group's rows in registers, so a larger group means fewer fp32 adds over the groups and
# a longer last job. Its tiles take the same grouped order: per step along N a wave of 132 programs reads GROUP_M
# row slabs of dY and 132 / GROUP_M column slabs of W, 24.5 at 8 and 24.25 at 16 (the least is 2 sqrt(132) = 23);
# 32 would read 36.
IN_LAUNCH_GROUP_M = (8, 16)
# The orders of a group's jobs in that launch the plan weighs on 64-row tiles (the kernel's tiles_first): the dA
# and dB jobs ahead of the group's dX tiles (False) or after them (True). Ahead, the first group's dA jobs hold their
# slots while its dS jobs run; after, the last group's jobs end the launch. 4096 -> 1024 at 256 tokens, r = 64
# (bf16, one group): 11.23 us ahead, 9.46 after; 1024 tokens: 23.44 ahead, 24.59 after (cost.schedule_seconds).
IN_LAUNCH_TILES_FIRST = (False, True)
# The one-launch backward (_lora_bwd_dx_da_db_kernel) re-reads B (N x R) in every program to recompute dS: R /
# BLOCK_K of the program's W bytes from L2, which the roofline does not count. With one row block's 32-column K
# slices that is at most 2x at R = 64, the same as the program's re-read of dY at 64 tokens, which the separate dX
# launch makes too; several row blocks take 64- or 128-column slices (bwd_one_launch_config).
ONE_LAUNCH_BWD_MAX_RANK = 64


@dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int = 0  # unused by kernels without an N tile
    BLOCK_K: int = 0  # unused by kernels without a K tile
    GROUP_M: int = 0  # 0: the kernel has no grouped launch order
    num_warps: int = 4
    num_stages: int = 3

    def constexprs(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k.isupper() and v}

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def padded_rank(r: int) -> int:
    """Rank padded to a power of two >= 16: tl.dot needs every dimension >= 16."""
    return max(16, 1 << (max(r, 1) - 1).bit_length())


def rank_chunk(R: int) -> int:
    """Rank slice of the S B^T and dS A dots: 32 keeps their operand tiles at 16 KiB even in fp32.

    fp32 dots without tf32 run on FMA, which holds a whole K = R_CHUNK slice of both operands in
    registers: a 64 slice spilled there (kernel_report), a 32 slice does not. From R = 128 on, 16:
    the 128 x 128 dX tiles on sm_80 spilled 8 B with 32 slices and int64 pointer offsets.
    """
    return 16 if R >= 128 else min(R, 32)


def _is_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def fwd_choices(M: int, N: int, R: int, dtype: torch.dtype, dora: bool = False, dropout: bool = False
                ) -> tuple[tuple[TileConfig, bool], ...]:
    """The (config, fuse_shrink) pairs _lora_fwd_kernel may launch with: one, or two (the shrink fused and not: at
    65-2048 tokens, and for R = 64 on few-token 16-column tiles), which plans.plan_lora_fwd weighs by their modeled
    time (kernels/cost.py). ``dora`` with
    ``dropout``: the loop keeps x W^T and x' W^T in two accumulators; ``N`` (output features) narrows the tiles of
    a narrow layer."""
    if dora and _is_fp32(dtype):
        # FMA: with DoRA's epilogue the 64-wide tiles below spilled 8-136 B on sm_90 (16 B fused at R = 16;
        # 136 B with two accumulators on 4 warps); 32 columns do not, on 8 warps with two accumulators (4
        # spilled 8 B at R = 64; kernel_report).
        few = M <= FEW_TOKENS
        return (TileConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32 if few else 16, GROUP_M=0 if few else 8,
                           num_warps=8 if few or dropout else 4, num_stages=3), few and R <= FUSE_SHRINK_MAX_RANK),
    if dora and dropout and M > FEW_TOKENS:
        # Two 128 x 128 fp32 accumulators are 128 registers per thread on 8 warps; 128 x 64 halves them.
        return (TileConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3), False),
    if M <= FEW_TOKENS:
        # Few tokens: time is the read of W, so the grid must cover the SMs: BLOCK_N = 32 gives N / 32
        # programs (128 for N = 4096; 64 tiles left 52% of an H100's 132 SMs idle, modeled 25.0 -> 14.5 us
        # at 4096 -> 4096, 16 tokens). BLOCK_M = 64 is the smallest M tile one warpgroup's wgmma covers on
        # sm_90; 64 x 32 x 128 compiles to HGMMA with 0 spills on sm_80 / sm_90 (kernel_report).
        # One launch instead of two (shrink fused in) when the rank is small enough (see above).
        # 8 warps: with 4 the fused variant spilled on sm_80 (kernel_report); fp32 (FMA) needs K = 32.
        # Below FILL_PROGRAMS 32-column tiles, 16 columns (N = 1024: 64 programs instead of 32, modeled 14.3 ->
        # 9.2 us at 1 token on an H100). DoRA keeps 32: its narrow tiles are not in the AOT report's set.
        block_n = 32 if dora or -(-N // 32) >= FILL_PROGRAMS else 16
        # 4 warps on 16 columns: 8 spilled 8 B on sm_90 at R = 64 (r % 16 != 0; kernel_report).
        if _is_fp32(dtype):
            return (TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
                    R <= FUSE_SHRINK_MAX_RANK),
        # The shrink is fused while A's re-read per N tile, from L2, is at most twice W's bytes (R <= 2 BLOCK_N:
        # R = 64 with 32 columns, as the one-launch backward's B); a separate shrink of one row block fills no GPU.
        # DoRA's epilogue spilled 8 B fused at R = 64 on sm_80 (kernel_report): up to R = 32 there.
        max_fused = FUSE_SHRINK_MAX_RANK if dora else ONE_LAUNCH_BWD_MAX_RANK
        fuse = R <= min(2 * block_n, max_fused)
        # DoRA without dropout may split K (fwd_k_splits): on 8 warps ptxas held that to 128 registers and spilled 8 B
        # at R = 32 fused on sm_80; 4 warps do not (kernel_report).
        warps = 4 if block_n == 16 or (dora and not dropout) else 8
        choice = TileConfig(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=128, num_warps=warps, num_stages=3), fuse
        if fuse or block_n == 32 or R > max_fused:
            return choice,
        # A rank too large for 16 columns fuses at 32 (half the programs); the plan weighs that against a shrink
        # launch of one row block.
        return choice, (TileConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, num_warps=8, num_stages=3), True)
    if _is_fp32(dtype):
        # fp32 without tf32 runs on FMA: 128 x 128 x 32 spilled at every rank. With int64 pointer offsets
        # 64 x 64 x 32 on 8 warps spilled 8 B on sm_80, and 64 x 64 x 16 on 8 warps 8-32 B on sm_90 (ptxas
        # held those to 80 registers); on 4 warps it takes 160-168 and does not spill (kernel_report).
        return (TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3), False),
    if M <= MID_TOKENS and not dora:
        # Between the regimes 128-row tiles leave the SMs idle (256 tokens at N = 4096: 64 programs); 64 rows give
        # twice the programs (the smallest M tile of one warpgroup's wgmma), and narrower columns more still
        # (mid_fwd_block_n). Fusing the shrink recomputes S per N tile (R / BLOCK_N more FLOPs); a separate shrink
        # launch of cdiv(M, 64) row blocks fills no GPU either, so the plan weighs both, the shrink fused up to
        # ONE_LAUNCH_BWD_MAX_RANK.
        # 8 warps: 4 spilled 80-176 B at R = 64 (r % 16 != 0) on sm_80 / sm_90 (kernel_report).
        block_n = mid_fwd_block_n(M, N)
        unfused = TileConfig(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3), False
        if R > ONE_LAUNCH_BWD_MAX_RANK:
            return unfused,
        return unfused, (mid_fwd_fused_config(block_n, R), True)
    # Many tokens: compute-bound GEMM. 128 x 128 x 64 with 8 warps and 3 stages compiles to
    # HGMMA with no spills on sm_90; 128 x 256 spilled there (kernel_report).
    return (TileConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3), False),


def mid_fwd_block_n(M: int, N: int) -> int:
    """Columns of the 65-2048-token forward tiles: 128, halved down to 32 while the grid of 64-row tiles has fewer
    than FILL_PROGRAMS programs (4096 -> 1024 at 256 tokens: 32 programs of 128 columns, 128 of 32)."""
    return _width_to_fill(M, N, 128)


def _width_to_fill(M: int, cols: int, widest: int) -> int:
    """``widest``, halved down to 32 while a grid of 64-row tiles that wide over ``cols`` columns has fewer than
    FILL_PROGRAMS programs."""
    width = widest
    while width > 32 and -(-M // 64) * -(-cols // width) < FILL_PROGRAMS:
        width //= 2
    return width


def mid_fwd_fused_config(block_n: int, R: int) -> TileConfig:
    """The 65-2048-token forward's tiles with the shrink fused (R <= ONE_LAUNCH_BWD_MAX_RANK). At 128 columns and
    R = 64, 64 x 128 x 64 in 3 stages spilled 32-56 B on sm_80 (255 registers; 40-48 B in 2 stages); 64 x 128 x 32
    in 4 stages takes 180-224 registers there and 127-160 with wgmma on sm_90, 0 spills (kernel_report)."""
    block_k = 32 if block_n == 128 and R > FUSE_SHRINK_MAX_RANK else 64
    return TileConfig(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=8,
                      num_stages=4 if block_k == 32 else 3)


def shrink_config(R: int, dtype: torch.dtype) -> TileConfig:
    # The (64, R) fp32 accumulator is 64 registers per thread at R = 128 on 4 warps; 8 warps above 64.
    # fp32 (FMA) holds a K slice of both operands in registers: BLOCK_K = 32 spilled at R = 256.
    # fp32 with the K split: 4 warps spilled 16 B at R = 32 on sm_90, 8 do not (kernel_report).
    return TileConfig(BLOCK_M=64, BLOCK_K=16 if _is_fp32(dtype) else 64,
                      num_warps=8 if _is_fp32(dtype) or R > 64 else 4, num_stages=3)


def bwd_dy_config(R: int, dtype: torch.dtype, dora: bool = False) -> TileConfig:
    """``dora``: the pass also reads the saved output (or Z) tile and writes the magnitude's partials."""
    # Two (BLOCK_M, R) fp32 accumulators live at once (dS and the dB partial): 8 warps above R = 64.
    if dora and _is_fp32(dtype):
        # FMA with DoRA's y tile: 32 x 32 tiles spilled 336-424 B at R = 256; with the in-kernel sums 16 x 32
        # spilled 8-184 B (R = 32, 128, 256) and 32 x 16 16 B (R = 64) on sm_90; 16 x 16 does not (kernel_report).
        return TileConfig(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1)
    if dora and R >= 128:
        # 3 stages spilled 8 B on sm_80 at R = 256 with DoRA's y tile; with the in-kernel sums 32 columns spilled
        # 8-32 B at R = 256 (r % 16 != 0), 16 do not (kernel_report).
        return TileConfig(BLOCK_M=64, BLOCK_N=16 if R == 256 else 32, num_warps=8, num_stages=2)
    if dora and R == 64:
        # 4 warps spilled 24 B on sm_90 at R = 64 (r % 16 != 0) with DoRA's y tile; 8 do not, but 8 spilled 8 B
        # at R = 16 on sm_80 (r % 16 != 0), where 4 do not (kernel_report).
        return TileConfig(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)
    if _is_fp32(dtype):
        # FMA: the dB dot's K is BLOCK_M; 64 x 32 spilled from R = 64 on, 32 x 32 on 8 warps does not.
        # 1 stage: with int64 pointer offsets 3 stages spilled 8-16 B at R = 32-64 (r % 16 != 0), and 2
        # stages 144 B on sm_80 at R = 128 in the single-part launch (dB stored without atomics); with the in-kernel
        # sums 32 x 32 spilled 8 B at R = 256 on sm_90, 32 x 16 does not (kernel_report).
        return TileConfig(BLOCK_M=32, BLOCK_N=16 if R == 256 else 32, num_warps=8, num_stages=1)
    if R <= 64:
        # With the in-kernel sums 4 warps spilled 8-448 B at R = 32 and 64 on sm_80 / sm_90; 8 do not (kernel_report).
        return TileConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4 if R == 16 else 8, num_stages=3)
    # R >= 128: BLOCK_N = 64 spilled on sm_80 (16 B at R = 128 with r % 16 != 0; 136 B at R = 256) and
    # on sm_90 at R = 256 with r % 16 != 0 (232 B); 32 does not, but with the in-kernel sums spilled 24-56 B at
    # R = 256, where 16 does not. Cost on sm_90: the dB dot's M is BLOCK_N < 64, so it runs as mma.sync (HMMA)
    # next to the dS dot's wgmma (kernel_report).
    return TileConfig(BLOCK_M=64, BLOCK_N=16 if R == 256 else 32, num_warps=8, num_stages=3)


def bwd_dx_config(M: int, dtype: torch.dtype, two_products: bool = False, dora: bool = False) -> TileConfig:
    """``two_products``: DoRA with dropout, whose loop keeps dY W and (g - 1) dY W in two accumulators."""
    if two_products and M > FEW_TOKENS:
        if _is_fp32(dtype):
            # FMA: 128 x 32 x 32 spilled 160-176 B on sm_90 with two accumulators (kernel_report).
            return TileConfig(BLOCK_M=64, BLOCK_K=32, BLOCK_N=32, GROUP_M=8, num_warps=8, num_stages=3)
        # Two 128 x 128 fp32 accumulators are 128 registers per thread on 8 warps; 128 x 64 halves them.
        return TileConfig(BLOCK_M=128, BLOCK_K=64, BLOCK_N=64, GROUP_M=8, num_warps=8, num_stages=3)
    if _is_fp32(dtype):
        # fp32 without tf32 runs on FMA: 64 x 64 x 64 (4 warps) and 128 x 128 x 32 spilled; these do not.
        if M <= FEW_TOKENS:
            # BLOCK_K = 64 spilled 8 B on sm_80 with triton 3.7.1 (torch 2.13's pin); 32 does not.
            return TileConfig(BLOCK_M=64, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=3)
        # 128 x 64 x 32 spilled 32 B on sm_90 with int64 pointer offsets (r % 16 != 0); 128 x 32 x 32 does not.
        return TileConfig(BLOCK_M=128, BLOCK_K=32, BLOCK_N=32, GROUP_M=8, num_warps=8, num_stages=3)
    if M <= FEW_TOKENS:
        # Few tokens: bound by reading W; narrow K tiles spread W over K / 32 programs (128 for K = 4096,
        # against 64 with BLOCK_K = 64; 0 spills, HGMMA on sm_90: kernel_report).
        return TileConfig(BLOCK_M=64, BLOCK_K=32, BLOCK_N=128, num_warps=4, num_stages=3)
    if M <= MID_TOKENS and not dora:
        # As the forward's: 64-row tiles double the programs between the regimes (128 at 256 tokens, K = 4096).
        # 4 warps spilled 8-888 B on sm_80 / sm_90 (kernel_report); 8 do not.
        return TileConfig(BLOCK_M=64, BLOCK_K=128, BLOCK_N=64, GROUP_M=8, num_warps=8, num_stages=4)
    # 4 stages: with int64 pointer offsets, 3 stages spilled 136-360 B on sm_90 at R <= 32 (kernel_report).
    return TileConfig(BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, GROUP_M=8, num_warps=8, num_stages=4)


def bwd_ds_in_launch(M: int, R: int, dtype: torch.dtype, deterministic: bool, dora: bool = False,
                     dropout: bool = False) -> bool:
    """Whether the backward may run as one dX launch with the dS, dB and dA jobs inside it
    (plans.plan_lora_bwd_in_launch): fp16 / bf16 above FEW_TOKENS, not deterministic (its sums are fp32 atomics), up
    to R = 64 (ONE_LAUNCH_BWD_MAX_RANK), DoRA to R = 32. The dS jobs sum 64 rows at a time with one (64, R) fp32
    accumulator: with dB's beside it, 128 rows at R = 64 spilled 40-152 B on sm_80, with one (128, R) 8-32 B, and
    DoRA's 128-row tiles without dropout still spill 8 B at R = 64 on sm_80 in bf16 (kernel_report)."""
    if M <= FEW_TOKENS or _is_fp32(dtype) or deterministic:
        return False
    return R <= (32 if dora else ONE_LAUNCH_BWD_MAX_RANK)


def bwd_one_launch_config(M: int, K: int, R: int, dtype: torch.dtype, deterministic: bool) -> TileConfig | None:
    """_lora_bwd_dx_da_db_kernel's tiles, or None where the backward can only run as separate dS / dB, dX and dA
    launches: a rank above ONE_LAUNCH_BWD_MAX_RANK (32 in fp32), or above FEW_TOKENS (one row block) fp32,
    ``deterministic`` or more than MID_TOKENS. Above FEW_TOKENS plans.plan_lora_bwd weighs it against those."""
    if not 0 < M <= MID_TOKENS or R > ONE_LAUNCH_BWD_MAX_RANK:
        return None
    if _is_fp32(dtype):
        # FMA holds a whole K slice of both operands of the 64 x 64 x R dA / dB dots in registers: at R = 64 it
        # spilled 1480-1920 B on sm_80 (with 16- or 32-column N tiles); up to R = 32 it does not (kernel_report).
        if R > 32 or M > FEW_TOKENS:
            return None
        return TileConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3)
    if M > FEW_TOKENS:
        # Several row blocks: dA and dB are sums over them, by fp32 atomics (the deterministic mode keeps the
        # separate launches' fixed-order sums). 128-column K slices as the middle-token dX tiles (bwd_dx_config),
        # halved down to 32 while the grid has fewer than FILL_PROGRAMS programs; each of a row block's K slices
        # recomputes its dS = dY B (R / BLOCK_K more FLOPs). 32-column slices take the few-token tiles below.
        # sm_80 (kernel_report, every BLOCK_N 32 / 64 x 4 / 8 warps x 2-4 stages tried): 128-column slices spilled
        # 24-224 B at R = 64 in every variant, and up to R = 32 all but 32-column N tiles on 8 warps with 3-4
        # stages. 64-column slices, compiled with the fp32 accumulator they add into: 64-column N tiles on 4 warps
        # spilled 8-16 B at R = 32 / 64 (1 or 2 stages), 32-column ones on 4 warps 8 B at R = 64; 8 warps did not
        # (64 columns, 2 stages; 32 columns, 3 stages).
        if deterministic:
            return None
        block_k = _width_to_fill(M, K, 128 if R <= 32 else 64)
        if block_k == 128:
            return TileConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
        if block_k == 64:
            return TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2)
    # As the few-token dX launch: 32-column K slices give K / 32 programs (128 for K = 4096), every one reading
    # its W slice once. 0 spills and HGMMA on sm_90; at R = 64 4 warps spilled 16-120 B on sm_80, 8 do not
    # (kernel_report).
    return TileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8 if R >= 64 else 4, num_stages=3)


# Columns of the one-launch backward's dA and dB tiles: the M side of their dots, 64 for wgmma.
ONE_LAUNCH_SIDE = 64


def bwd_da_config(R: int, dtype: torch.dtype) -> TileConfig:
    # (64, R) fp32 accumulator per program, as in the shrink kernel. fp32 (FMA): 4 warps spilled
    # from R = 64 on (kernel_report), so always 8.
    # fp32 at R = 256: with the in-kernel sum BLOCK_K = 64 spilled 104-112 B on sm_80; 32 does not.
    return TileConfig(BLOCK_M=32 if _is_fp32(dtype) else 64, BLOCK_K=32 if _is_fp32(dtype) and R == 256 else 64,
                      num_warps=8 if _is_fp32(dtype) or R > 64 else 4, num_stages=3)


def dy_split(m_blocks: int, n_tiles: int, num_sms: int, block_n: int, M: int) -> tuple[int, int]:
    """(splits over N, N tiles per split) for the dS / dB pass: at least one program per SM, and with several row
    blocks about sqrt(2.5 N num_sms / M) splits. Splits cost an fp32 sum of dS over them (splits x M x R x 4 bytes
    of atomics at about the HBM rate), while the last row block to arrive at a split then sums its dB alone
    (N / splits x R x 10 bytes at one SM's share of the bandwidth, HBM / num_sms); that many splits makes the two
    equal. One row block stores dB directly: no such tail."""
    N = n_tiles * block_n
    balanced = math.ceil(math.sqrt(2.5 * N * num_sms / max(1, M))) if m_blocks > 1 else 1
    splits = min(n_tiles, max(-(-num_sms // m_blocks), balanced))
    per_split = -(-n_tiles // max(1, splits))
    return -(-n_tiles // per_split), per_split


# The last K split to arrive at a row block sums every split's (BLOCK_M, R) fp32 share alone: at most 8 of them.
SHRINK_MAX_SPLITS = 8
# Likewise the last K split to arrive at a few-token forward tile: its (BLOCK_M, BLOCK_N) and (BLOCK_M, R) shares.
FWD_MAX_SPLITS = 8


def fwd_may_split(M: int, dora: bool, dropout: bool) -> bool:
    """Whether the forward's configs at these sizes may be launched with a K split (fwd_k_splits): not DoRA with
    dropout, whose second base product x' W^T would need a third set of shares."""
    return M <= FEW_TOKENS and not (dora and dropout)


def fwd_k_splits(M: int, tiles: int, k_tiles: int, dora: bool, dropout: bool) -> tuple[int, ...]:
    """The K split counts the forward may launch with at ``tiles`` output tiles of ``k_tiles`` K tiles, which
    plans.plan_lora_fwd weighs by their modeled time: (1,), or with few tokens and fewer than FILL_PROGRAMS tiles
    also as many splits as fill FILL_PROGRAMS (4096 -> 1024 at 16 tokens, R = 64 fused: 32 tiles of 32 columns, 4
    splits; every tile alone reads its slice of W on one SM). The tiles fill the GPU above FEW_TOKENS."""
    if not fwd_may_split(M, dora, dropout) or tiles >= FILL_PROGRAMS:
        return (1,)
    splits = min(k_tiles, FWD_MAX_SPLITS, FILL_PROGRAMS // max(1, tiles))
    if splits <= 1:
        return (1,)
    return 1, -(-k_tiles // -(-k_tiles // splits))


# A shrink whose K splits the forward GEMM sums (plans.plan_lora_shrink with to_consumer) may take more than
# SHRINK_MAX_SPLITS while each split keeps at least this many K tiles (512 columns): each forward program re-reads
# its row block's max(8, K / 512) (64, R) fp32 shares from L2; from K = 4096 on that is R / 768 of the x and W bytes
# a 64 x 128 program streams (1/12 at R = 64).
SHRINK_MIN_TILES_PER_PART = 8


def fwd_sums_shrink_parts(M: int, dtype: torch.dtype) -> bool:
    """Whether the forward GEMM may sum the shrink's K splits (_lora_fwd_kernel's S_FROM_PARTS) instead of the
    shrink's last split (fwd_shrink_in_launch narrows where those shares may be made inside the forward launch):
    fp16 / bf16 above FEW_TOKENS (kernel_report, every config with that epilogue: 0 spills).
    In fp32 (FMA holds both operands of the S B^T dot in registers) it spilled 8-16 B on sm_90, where ptxas held 8
    warps to 128 registers (64 x 64 x 32 few-token tiles at R = 128 / 256 with the K split, DoRA with dropout at
    64 x 32 x 16); the few-token 64 x 16 x 128 tiles with the K split spilled 16 B at R = 128 / 256 on sm_80."""
    return M > FEW_TOKENS and not _is_fp32(dtype)


def fwd_shrink_in_launch(M: int, R: int, dtype: torch.dtype, dora: bool) -> bool:
    """Whether the forward may make the shrink's K-split shares inside its own launch (_lora_fwd_kernel's
    SHRINK_IN_LAUNCH: share jobs beside the tiles, which wait for their row block's shares) instead of a shrink
    launch: where the GEMM sums shares (fwd_sums_shrink_parts), up to R = 128, not DoRA. The share job's
    (BLOCK_M, R) fp32 accumulator spilled 120-136 B at R = 256 on the 128-row tiles on sm_80, and DoRA's 128-row
    tiles (all of its 16-bit ones above FEW_TOKENS) spilled 8 B on sm_90 at R = 32-128 with 128 or 64 columns, 3 or
    2 stages (kernel_report)."""
    return fwd_sums_shrink_parts(M, dtype) and R <= 128 and not dora


# K tiles per share job of the forward's in-launch shrink (SHRINK_IN_LAUNCH), weighed by the plan: a short job
# delays the first tiles' epilogue less, more jobs take more of the launch's slots and fp32 shares. 4096 -> 1024 at 256
# tokens, r = 64 (bf16): 9.3 us in 64 x 64 tiles with jobs of 4 K tiles, 9.8 with 8 (cost.schedule_seconds).
IN_LAUNCH_SHARE_TILES = (4, SHRINK_MIN_TILES_PER_PART)


def in_launch_shrink_split(k_tiles: int, per_split: int) -> tuple[int, int]:
    """(splits over K, K tiles per split) of the forward's in-launch share jobs of ``per_split`` K tiles each (one
    job, 64-128 rows x 256-512 columns of x, is short beside a tile's main loop)."""
    per_split = min(k_tiles, per_split)
    return -(-k_tiles // per_split), per_split


def fwd_in_launch_tiles(cfg: TileConfig) -> tuple[TileConfig, ...]:
    """The forward tiles the plan weighs with the shares made in its launch: the unfused config, and twice as wide
    where that stays within 128 columns (the share jobs fill the slots the fewer tiles leave: 4096 -> 1024 at 256
    tokens, r = 64 (bf16), 64 tiles of 64 columns and 64 jobs of 4 K tiles model 9.3 us, 128 tiles of 32 columns
    with the same jobs 9.9, cost.schedule_seconds)."""
    if cfg.BLOCK_N * 2 > 128:
        return cfg,
    return cfg, replace(cfg, BLOCK_N=2 * cfg.BLOCK_N)


def shrink_split(m_blocks: int, k_tiles: int, num_sms: int, to_consumer: bool = False) -> tuple[int, int]:
    """(splits over K, K tiles per split) for the shrink: up to one program per SM (a row block of few tokens alone
    would read A and its x rows on one SM). At most SHRINK_MAX_SPLITS where the last split to arrive sums them;
    ``to_consumer`` (the forward GEMM sums them, no program does alone): more where each keeps at least
    SHRINK_MIN_TILES_PER_PART K tiles."""
    most = max(SHRINK_MAX_SPLITS, k_tiles // SHRINK_MIN_TILES_PER_PART) if to_consumer else SHRINK_MAX_SPLITS
    splits = min(k_tiles, most, max(1, num_sms // m_blocks))
    per_split = -(-k_tiles // splits)
    return -(-k_tiles // per_split), per_split


def da_split(M: int, K: int, block_m: int, block_k: int, num_sms: int) -> tuple[int, int]:
    """(splits over M, row blocks per split) for dA: about two programs per SM in total."""
    m_blocks = max(1, -(-M // block_m))
    k_blocks = max(1, -(-K // block_k))
    splits = max(1, min(m_blocks, (2 * num_sms) // k_blocks))
    per_split = -(-m_blocks // splits)
    return -(-m_blocks // per_split), per_split


def dora_norm_config(N: int, R: int, dtype: torch.dtype) -> TileConfig:
    """_dora_weight_norm_kernel: BLOCK_N rows of W per program (the dot's N side), BLOCK_K its K tile (the
    dot's M side, 64 for wgmma). It reads all of W, so the grid must cover the SMs: 32-row tiles give 128
    programs at N = 4096; below 4096 rows, 16 (64 programs of 64 rows at N = 4096 left the modeled H100 under
    one wave: 24.8 us for a 32 MiB read)."""
    block_n = 32 if N >= 4096 else 16
    if _is_fp32(dtype):
        # FMA holds both operands' R-long slices in registers: 32 x 64 tiles spilled from R = 64 on (320-7576 B),
        # 16 x 16 104-120 B at R = 256 with the whole rank in one dot; rank_chunk slices do not (kernel_report).
        # 8 warps spilled 8 B on sm_80 from R = 128 on; 4 do not.
        return TileConfig(BLOCK_M=0, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)
    return TileConfig(BLOCK_M=0, BLOCK_N=block_n, BLOCK_K=64, num_warps=4, num_stages=3)


def dora_magnitude_config(dtype: torch.dtype) -> TileConfig:
    """_dora_magnitude_grad_kernel: BLOCK_N columns per program; BLOCK_M x BLOCK_K tiles only in the
    recompute for m == 0 columns."""
    if _is_fp32(dtype):
        return TileConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=1)
    return TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=1)
