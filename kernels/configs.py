"""Tile configurations the launchers choose from, per kernel, dtype, padded rank and token regime.

Every function here is pure (no CUDA queries): the plans (``plans.py``) call them, and the
ahead-of-time report enumerates the plans.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

MAX_RANK = 256
PADDED_RANKS = (16, 32, 64, 128, 256)
# At or below this many tokens the forward and dX GEMMs are bound by reading W (decode-like).
FEW_TOKENS = 64
# Programs a W-bound few-token grid should have: an H100 has 132 SMs (an A100 108).
FILL_PROGRAMS = 128
# Fusing the shrink into the forward GEMM re-reads A once per N tile: R / BLOCK_N of W's bytes.
# With BLOCK_N = 64 and R <= 32 that is at most half of W's traffic, and A (<= 32 x K) stays in L2.
FUSE_SHRINK_MAX_RANK = 32
# The one-launch backward of a single row block (_lora_bwd_dx_da_db_kernel) re-reads B (N x R) in every program
# to recompute dS: R / BLOCK_K of the program's W bytes from L2, which the roofline does not count. With
# BLOCK_K = 32 that is at most 2x at R = 64, the same as the program's re-read of dY at 64 tokens, which the
# separate dX launch makes too.
ONE_BLOCK_BWD_MAX_RANK = 64


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


def fwd_config(M: int, R: int, dtype: torch.dtype, dora: bool = False, dropout: bool = False, N: int = 4096
               ) -> tuple[TileConfig, bool]:
    """(config, fuse_shrink) for _lora_fwd_kernel; ``dora`` with ``dropout``: the loop keeps x W^T and x' W^T in
    two accumulators; ``N`` (output features) narrows the few-token tiles of a narrow layer."""
    if dora and _is_fp32(dtype):
        # FMA: with DoRA's epilogue the 64-wide tiles below spilled 8-136 B on sm_90 (16 B fused at R = 16;
        # 136 B with two accumulators on 4 warps); 32 columns do not, on 8 warps with two accumulators (4
        # spilled 8 B at R = 64; kernel_report).
        few = M <= FEW_TOKENS
        return TileConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32 if few else 16, GROUP_M=0 if few else 8,
                          num_warps=8 if few or dropout else 4, num_stages=3), few and R <= FUSE_SHRINK_MAX_RANK
    if dora and dropout and M > FEW_TOKENS:
        # Two 128 x 128 fp32 accumulators are 128 registers per thread on 8 warps; 128 x 64 halves them.
        return TileConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3), False
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
        return TileConfig(BLOCK_M=64, BLOCK_N=64 if _is_fp32(dtype) else block_n,
                          BLOCK_K=32 if _is_fp32(dtype) else 128, num_warps=8, num_stages=3), R <= FUSE_SHRINK_MAX_RANK
    if _is_fp32(dtype):
        # fp32 without tf32 runs on FMA: 128 x 128 x 32 spilled at every rank. With int64 pointer offsets
        # 64 x 64 x 32 on 8 warps spilled 8 B on sm_80, and 64 x 64 x 16 on 8 warps 8-32 B on sm_90 (ptxas
        # held those to 80 registers); on 4 warps it takes 160-168 and does not spill (kernel_report).
        return TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3), False
    # Many tokens: compute-bound GEMM. 128 x 128 x 64 with 8 warps and 3 stages compiles to
    # HGMMA with no spills on sm_90; 128 x 256 spilled there (kernel_report).
    return TileConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3), False


def shrink_config(R: int, dtype: torch.dtype) -> TileConfig:
    # The (64, R) fp32 accumulator is 64 registers per thread at R = 128 on 4 warps; 8 warps above 64.
    # fp32 (FMA) holds a K slice of both operands in registers: BLOCK_K = 32 spilled at R = 256.
    return TileConfig(BLOCK_M=64, BLOCK_K=16 if _is_fp32(dtype) else 64,
                      num_warps=4 if R <= 64 else 8, num_stages=3)


def bwd_dy_config(R: int, dtype: torch.dtype, dora: bool = False) -> TileConfig:
    """``dora``: the pass also reads the saved output (or Z) tile and writes the magnitude's partials."""
    # Two (BLOCK_M, R) fp32 accumulators live at once (dS and the dB partial): 8 warps above R = 64.
    if dora and _is_fp32(dtype):
        # FMA with DoRA's y tile: the 32 x 32 tiles below spilled 336-424 B at R = 256; 32 x 16 spilled 8 B at
        # R = 32 and 16 x 32 8 B at R = 64 (sm_90); these do not (kernel_report).
        return TileConfig(BLOCK_M=32 if R == 64 else 16, BLOCK_N=16 if R == 64 else 32, num_warps=8, num_stages=1)
    if dora and R >= 128:
        # 3 stages spilled 8 B on sm_80 at R = 256 with DoRA's y tile (kernel_report).
        return TileConfig(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if dora and R == 64:
        # 4 warps spilled 24 B on sm_90 at R = 64 (r % 16 != 0) with DoRA's y tile; 8 do not, but 8 spilled 8 B
        # at R = 16 on sm_80 (r % 16 != 0), where 4 do not (kernel_report).
        return TileConfig(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)
    if _is_fp32(dtype):
        # FMA: the dB dot's K is BLOCK_M; 64 x 32 spilled from R = 64 on, 32 x 32 on 8 warps does not.
        # 1 stage: with int64 pointer offsets 3 stages spilled 8-16 B at R = 32-64 (r % 16 != 0), and 2
        # stages 144 B on sm_80 at R = 128 in the single-part launch (dB stored without atomics; kernel_report).
        return TileConfig(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
    if R <= 64:
        return TileConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    # R >= 128: BLOCK_N = 64 spilled on sm_80 (16 B at R = 128 with r % 16 != 0; 136 B at R = 256) and
    # on sm_90 at R = 256 with r % 16 != 0 (232 B); 32 does not. Cost on sm_90: the dB dot's M is
    # BLOCK_N = 32 < 64, so it runs as mma.sync (HMMA) next to the dS dot's wgmma (kernel_report).
    return TileConfig(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3)


def bwd_dx_config(M: int, dtype: torch.dtype, two_products: bool = False) -> TileConfig:
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
    # 4 stages: with int64 pointer offsets, 3 stages spilled 136-360 B on sm_90 at R <= 32 (kernel_report).
    return TileConfig(BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, GROUP_M=8, num_warps=8, num_stages=4)


def bwd_one_block_config(M: int, R: int, dtype: torch.dtype) -> TileConfig | None:
    """_lora_bwd_dx_da_db_kernel's tiles, or None where the backward runs as separate dS / dB, dX and dA launches:
    more tokens than one BLOCK_M row block, or a rank above ONE_BLOCK_BWD_MAX_RANK (32 in fp32)."""
    if not 0 < M <= FEW_TOKENS or R > ONE_BLOCK_BWD_MAX_RANK:
        return None
    if _is_fp32(dtype):
        # FMA holds a whole K slice of both operands of the 64 x 64 x R dA / dB dots in registers: at R = 64 it
        # spilled 1480-1920 B on sm_80 (with 16- or 32-column N tiles); up to R = 32 it does not (kernel_report).
        if R > 32:
            return None
        return TileConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3)
    # As the few-token dX launch: 32-column K slices give K / 32 programs (128 for K = 4096), every one reading
    # its W slice once. 0 spills and HGMMA on sm_90; at R = 64 4 warps spilled 16-120 B on sm_80, 8 do not
    # (kernel_report).
    return TileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8 if R >= 64 else 4, num_stages=3)


# Columns of the one-launch backward's dA and dB tiles: the M side of their dots, 64 for wgmma.
ONE_BLOCK_SIDE = 64


def bwd_da_config(R: int, dtype: torch.dtype) -> TileConfig:
    # (64, R) fp32 accumulator per program, as in the shrink kernel. fp32 (FMA): 4 warps spilled
    # from R = 64 on (kernel_report), so always 8.
    return TileConfig(BLOCK_M=32 if _is_fp32(dtype) else 64, BLOCK_K=64,
                      num_warps=8 if _is_fp32(dtype) or R > 64 else 4, num_stages=3)


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
