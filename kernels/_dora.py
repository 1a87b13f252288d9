"""DoRA kernels beside the LoRA ones: the row norms of W + s B A, and the magnitude's gradient.

The forward and the dS / dB and dX passes are the LoRA kernels with DORA on (_lora_fwd.py, _lora_bwd.py).
"""
import triton
import triton.language as tl

from ._common import _load_tile, _rank_chunked_dot, _span


@triton.jit
def _dora_weight_norm_kernel(
    w_ptr,  # (N, K)
    a_ptr,  # (r, K)
    b_ptr,  # (N, r)
    norm_ptr,  # (N,) fp32 output: ||W_i + s (B A)_i||_2
    N, K, r,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    scaling,
    R: tl.constexpr,
    R_CHUNK: tl.constexpr,  # rank slice per B A dot; R (one dot) except where FMA must hold less (fp32)
    BLOCK_N: tl.constexpr,  # rows of W per program: the dot's N side, so 16 or 32 still compile to wgmma
    BLOCK_K: tl.constexpr,  # >= 64: the dot's M side (wgmma's warpgroup tile)
    INPUT_PRECISION: tl.constexpr,
):
    # (W + s B A)^T is formed one (BLOCK_K, BLOCK_N) tile at a time in registers: no N x K tensor exists, and
    # the sum of squares has no cancellation (the expanded ||W||^2 + 2 s B.(W A^T) + s^2 B A A^T B^T has).
    pid_n = tl.program_id(0).to(tl.int64)
    offs_n = _span(pid_n * BLOCK_N, BLOCK_N)
    if R_CHUNK == R:
        offs_r = _span(0, R)
        b = _load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, r, N)  # (R, BLOCK_N): B^T
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = _span(k0, BLOCK_K)
        w = _load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, K, N)  # (BLOCK_K, BLOCK_N): W^T
        if R_CHUNK == R:
            a = _load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, r)  # (BLOCK_K, R): A^T
            ba = tl.dot(a, b, input_precision=INPUT_PRECISION)
        else:
            ba = _rank_chunked_dot(tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32), a_ptr, b_ptr, offs_k, offs_n,
                                   stride_ak, stride_ar, stride_br, stride_bn, K, N, r, R, R_CHUNK,
                                   INPUT_PRECISION)
        v = w.to(tl.float32) + scaling * ba
        acc += tl.sum(v * v, axis=0)
    tl.store(norm_ptr + offs_n, tl.sqrt(acc), mask=offs_n < N)


@triton.jit
def _dora_magnitude_grad_kernel(
    dm_parts_ptr,  # (parts, N) fp32: per row block of the dS / dB pass, sum_i dY_ij (y_ij - b_j), or with
                   # FROM_Z sum_i dY_ij z'_ij
    mag_ptr,  # (N,) magnitude m
    norm_ptr,  # (N,) fp32 norm n
    dm_ptr,  # (N,) output, m's dtype: dm_j = sum_i dY_ij z_ij / n_j
    dy_ptr,  # (M, N); with x, W, S and B below, read only for columns whose m is 0
    x_ptr,  # (M, K)
    w_ptr,  # (N, K)
    s_ptr,  # (M, r)
    b_ptr,  # (N, r)
    M, N, K, r,
    stride_mag_n,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    scaling,
    parts,
    R_CHUNK: tl.constexpr,  # rank slice of the recompute's S B^T (looped to r at run time: one config per rank)
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    FROM_Z: tl.constexpr,  # the partials come from the saved z' (DoRA with dropout): dm = total / n
    INPUT_PRECISION: tl.constexpr,
):
    # y - b = g z with g = m / n, so sum_i dY (y - b) / m = sum_i dY z / n: exact wherever m != 0. Where
    # m == 0 (a zero row of W gets m = 0 at PEFT's initialisation) y = b holds no trace of z, and this
    # program recomputes z = x W^T + s S B^T for its columns: a branch no other magnitude takes.
    pid_n = tl.program_id(0).to(tl.int64)
    offs_n = _span(pid_n * BLOCK_N, BLOCK_N)
    mask_n = offs_n < N
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, parts, BLOCK_P):  # fixed order: the same sum in every run
        offs_p = _span(p0, BLOCK_P)
        total += tl.sum(_load_tile(dm_parts_ptr, offs_p, offs_n, N, 1, parts, N), axis=0)
    n = tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0)
    if FROM_Z:
        dm = tl.where(n > 0, total / tl.where(n > 0, n, 1.0), 0.0)
    else:
        m = tl.load(mag_ptr + offs_n * stride_mag_n, mask=mask_n, other=1.0).to(tl.float32)
        dm = tl.where(m != 0, total / tl.where(m != 0, m, 1.0), 0.0)
        lost = (m == 0) & (n > 0)
        dm = _recompute_lost_columns(dm, lost, n, dy_ptr, x_ptr, w_ptr, s_ptr, b_ptr, offs_n, M, N, K, r,
                                     stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk,
                                     stride_sm, stride_sr, stride_bn, stride_br, scaling, R_CHUNK,
                                     BLOCK_M, BLOCK_K, INPUT_PRECISION)
    tl.store(dm_ptr + offs_n, dm.to(dm_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _recompute_lost_columns(dm, lost, n, dy_ptr, x_ptr, w_ptr, s_ptr, b_ptr, offs_n, M, N, K, r,
                            stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk,
                            stride_sm, stride_sr, stride_bn, stride_br, scaling,
                            R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dm with sum_i dY z / n where ``lost`` (m == 0), z = x W^T + s S B^T recomputed for this column tile."""
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    if tl.max(lost.to(tl.int32), axis=0) > 0:
        q = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = _span(m0, BLOCK_M)
            z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = _span(k0, BLOCK_K)
                x = _load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)  # (BLOCK_M, BLOCK_K)
                w = _load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, K, N)  # (BLOCK_K, BLOCK_N)
                z = tl.dot(x, w, z, input_precision=INPUT_PRECISION)
            lora = _rank_chunked_dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), s_ptr, b_ptr, offs_m, offs_n,
                                     stride_sm, stride_sr, stride_br, stride_bn, M, N, r, r, R_CHUNK,
                                     INPUT_PRECISION)
            z += lora * scaling
            dy = _load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, M, N).to(tl.float32)
            q += tl.sum(dy * z, axis=0)
        dm = tl.where(lost, q / tl.where(n > 0, n, 1.0), dm)
    return dm
