"""Forward kernels: S = dropout(x) A^T, and y = x W^T + b + s * S B^T with S seeding the accumulator."""
import triton
import triton.language as tl

from ._common import _dropout_keep, _grouped_tile_ids


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # (M, K)
    a_ptr,  # (r, K)
    s_ptr,  # (M, r) output, x's dtype
    M, K, r,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    seed, drop_threshold, keep_scale,
    R: tl.constexpr,  # r padded to a power of two >= 16
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    APPLY_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if APPLY_DROPOUT:
            x = tl.where(_dropout_keep(seed, offs_m, offs_k, drop_threshold), x, 0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=(offs_r[None, :] < r) & mask_k[:, None], other=0.0)  # (BLOCK_K, R)
        acc = tl.dot(x, a, acc, input_precision=INPUT_PRECISION)
    if APPLY_DROPOUT:
        acc = acc * keep_scale
    tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
             acc.to(s_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_r[None, :] < r))


@triton.jit
def _lora_fwd_kernel(
    x_ptr,  # (M, K)
    w_ptr,  # (N, K)
    bias_ptr,  # (N,); unused when HAS_BIAS is False
    s_ptr,  # (M, r): read, or written by the pid_n == 0 programs when FUSE_SHRINK
    a_ptr,  # (r, K); read only when FUSE_SHRINK
    b_ptr,  # (N, r)
    y_ptr,  # (M, N) output
    M, N, K, r,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_sm, stride_sr,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling, seed, drop_threshold, keep_scale,
    R: tl.constexpr,  # r padded to a power of two >= 16
    R_CHUNK: tl.constexpr,  # rank slice per S B^T dot; bounds its shared memory
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, APPLY_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_SHRINK:
        offs_r = tl.arange(0, R)
        s_acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        if FUSE_SHRINK:
            if APPLY_DROPOUT:
                x = tl.where(_dropout_keep(seed, offs_m, offs_k, drop_threshold), x, 0.0)
            a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                        mask=(offs_r[None, :] < r) & mask_k[:, None], other=0.0)  # (BLOCK_K, R)
            s_acc = tl.dot(x, a, s_acc, input_precision=INPUT_PRECISION)

    if FUSE_SHRINK:
        if APPLY_DROPOUT:
            s_acc = s_acc * keep_scale
        s = s_acc.to(dtype)
        if pid_n == 0:
            tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, s,
                     mask=mask_m[:, None] & (offs_r[None, :] < r))
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                    mask=mask_n[None, :] & (offs_r[:, None] < r), other=0.0)  # (R, BLOCK_N)
        lora = tl.dot(s, b, input_precision=INPUT_PRECISION)
    else:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # A runtime loop, not pipelined: one rank slice's operands are live at a time (an unrolled
        # static_range kept every slice's loads in flight and spilled at R = 256).
        for r0 in tl.range(0, R, R_CHUNK, num_stages=1):
            offs_r = r0 + tl.arange(0, R_CHUNK)
            s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                        mask=mask_m[:, None] & (offs_r[None, :] < r), other=0.0)  # (BLOCK_M, R_CHUNK)
            b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                        mask=mask_n[None, :] & (offs_r[:, None] < r), other=0.0)  # (R_CHUNK, BLOCK_N)
            lora = tl.dot(s, b, lora, input_precision=INPUT_PRECISION)
    acc += lora * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(dtype),
             mask=mask_m[:, None] & mask_n[None, :])
