"""Forward kernels: S = dropout(x) A^T, and y = x W^T + b + s * S B^T with S seeding the accumulator."""
import triton
import triton.language as tl

from ._common import (_dora_scale, _dropped, _grouped_tile_ids, _grouped_tile_of, _last_to_arrive, _load_tile,
                      _producers_first_job, _rank_chunked_dot, _shrink_step, _span, _sum_of_parts, _take_ticket,
                      _wait_for)


@triton.jit(do_not_specialize=["seed_ptr"])
def _lora_shrink_kernel(
    x_ptr,  # (M, K)
    a_ptr,  # (r, K)
    s_ptr,  # (M, r) output, x's dtype
    s_parts_ptr,  # (k_splits, M, R) fp32 scratch when SPLIT_K: each K split's share of dropout(x) A^T
    counters_ptr,  # int32, zero at rest: one per row block, when SPLIT_K and SUM_PARTS
    seed_ptr,  # () int64 dropout seed; loaded only when APPLY_DROPOUT
    M, K, r,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    drop_threshold, keep_scale,
    k_per_split,  # columns of K per program along axis 1, a multiple of BLOCK_K
    R: tl.constexpr,  # r padded to a power of two >= 16
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,  # several programs share a row block's K: S summed over them in the last to arrive, or
    # (SUM_PARTS off) by the forward GEMM
    APPLY_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # With SPLIT_K, False: the shares are left in s_parts_ptr for the forward GEMM to sum (its S_FROM_PARTS), and
    # s_ptr and counters_ptr are not touched.
    SUM_PARTS: tl.constexpr = True,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_m = _span(pid_m * BLOCK_M, BLOCK_M)
    offs_r = _span(0, R)
    acc = _shrink_share(x_ptr, a_ptr, seed_ptr, offs_m, offs_r, pid_k * k_per_split, k_per_split, M, K, r,
                        stride_xm, stride_xk, stride_ar, stride_ak, drop_threshold, BLOCK_K, APPLY_DROPOUT,
                        INPUT_PRECISION)
    in_s = (offs_m[:, None] < M) & (offs_r[None, :] < r)
    if SPLIT_K:
        parts_ptrs = s_parts_ptr + offs_m[:, None] * R + offs_r[None, :]  # (BLOCK_M, R) of split 0
        tl.store(parts_ptrs + pid_k * M * R, acc, mask=in_s)
        if SUM_PARTS and _last_to_arrive(counters_ptr + pid_m, tl.num_programs(1)):
            acc = _sum_of_parts(tl.zeros_like(acc), parts_ptrs, tl.cast(M, tl.int64) * R, tl.num_programs(1), in_s,
                                False)
            if APPLY_DROPOUT:
                acc = acc * keep_scale
            tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty),
                     mask=in_s)
    else:
        if APPLY_DROPOUT:
            acc = acc * keep_scale
        tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty),
                 mask=in_s)


@triton.jit
def _shrink_share(x_ptr, a_ptr, seed_ptr, offs_m, offs_r, k_start, k_per_split, M, K, r, stride_xm, stride_xk,
                  stride_ar, stride_ak, drop_threshold, BLOCK_K: tl.constexpr, APPLY_DROPOUT: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """(len(offs_m), R) fp32: dropout(x) A^T over K columns [k_start, k_start + k_per_split), rows offs_m, unscaled."""
    seed = tl.load(seed_ptr) if APPLY_DROPOUT else 0
    acc = tl.zeros((offs_m.shape[0], offs_r.shape[0]), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = _span(k0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        acc = _shrink_step(acc, x, a_ptr, offs_m, offs_k, offs_r, stride_ar, stride_ak, K, r, seed, drop_threshold,
                           APPLY_DROPOUT, INPUT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["seed_ptr", "s_splits"])
def _lora_fwd_kernel(
    x_ptr,  # (M, K)
    w_ptr,  # (N, K)
    bias_ptr,  # (N,); unused when HAS_BIAS is False
    s_ptr,  # (M, r): read, or written by the pid_n == 0 programs when FUSE_SHRINK or S_FROM_PARTS
    a_ptr,  # (r, K); read only when FUSE_SHRINK
    b_ptr,  # (N, r)
    y_ptr,  # (M, N) output
    seed_ptr,  # () int64 dropout seed; loaded only when FUSE_SHRINK and APPLY_DROPOUT
    mag_ptr,  # (N,) DoRA magnitude m, any float dtype; read only when DORA
    norm_ptr,  # (N,) fp32 DoRA norm n = ||W + s B A|| per row; read only when DORA
    z_ptr,  # (M, N) output when DORA and APPLY_DROPOUT: z' = x' W^T + s S' B^T, saved for the magnitude's grad
    y_parts_ptr,  # (k_splits, M, N) fp32 scratch when SPLIT_K_PARTIALS: each K split's share of x W^T
    # fp32 shares of x' A^T: (N tiles, k_splits, M, R) scratch when SPLIT_K_PARTIALS and FUSE_SHRINK; with
    # S_FROM_PARTS the shrink launch's (s_splits, M, R)
    s_parts_ptr,
    # int32, zero at rest: one per output tile when SPLIT_K_PARTIALS; with SHRINK_IN_LAUNCH one per row block, then
    # the ticket counter
    counters_ptr,
    M, N, K, r,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_bias_n,
    stride_sm, stride_sr,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    stride_mag_n,
    stride_zm, stride_zn,
    scaling, drop_threshold, keep_scale,
    k_per_split,  # columns of K per program along axis 1: a multiple of BLOCK_K, all of K without a split
    s_splits,  # the K splits of S, whose shares s_parts_ptr holds when S_FROM_PARTS
    R: tl.constexpr,  # r padded to a power of two >= 16
    R_CHUNK: tl.constexpr,  # rank slice per S B^T dot; bounds its shared memory
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, APPLY_DROPOUT: tl.constexpr,
    # DoRA, g = m / n per column: y = g * (x W^T + s S B^T) + b; with APPLY_DROPOUT (x' = dropout(x), S = x' A^T)
    # y = x W^T + b + (g - 1) * x' W^T + g * s S B^T, both base products from the same W tiles.
    DORA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    # Several programs (axis 1) share a tile's K: each stores its fp32 shares of x W^T (and of x' A^T), and the last
    # to arrive sums them in split order (the same bits whichever arrives last) and runs the epilogue. Not with DORA
    # and APPLY_DROPOUT (x' W^T would need its own shares).
    SPLIT_K_PARTIALS: tl.constexpr = False,
    # Not FUSE_SHRINK: S is the sum of the shrink launch's s_splits shares (in split order, as that launch's last
    # split would sum them, so the same bits), stored by the pid_n == 0 programs; no program sums a row block alone.
    S_FROM_PARTS: tl.constexpr = False,
    # With S_FROM_PARTS: the shares are made in this launch, by num_pid_m x s_splits jobs of k_per_split columns
    # beside the tiles (_producers_first_job: each row block's jobs take lower tickets than its tiles, one group of
    # row blocks ahead); a tile waits for its row block's shares before its epilogue sums them. No shrink launch.
    SHRINK_IN_LAUNCH: tl.constexpr = False,
):
    tl.static_assert(not (SPLIT_K_PARTIALS and DORA and APPLY_DROPOUT), "DoRA with dropout has no K split")
    tl.static_assert(not (FUSE_SHRINK and S_FROM_PARTS), "a fused shrink has no shares to sum")
    tl.static_assert(not SHRINK_IN_LAUNCH or (S_FROM_PARTS and not SPLIT_K_PARTIALS),
                     "the shrink in the launch leaves shares for an unsplit S_FROM_PARTS epilogue")
    if SHRINK_IN_LAUNCH:
        num_pid_m = tl.cdiv(M, BLOCK_M).to(tl.int64)
        num_pid_n = tl.cdiv(N, BLOCK_N).to(tl.int64)
        ticket = _take_ticket(counters_ptr + num_pid_m, num_pid_m * (s_splits + num_pid_n))
        is_share, job = _producers_first_job(ticket, num_pid_m, num_pid_n, s_splits, GROUP_M)
        if is_share:
            _lora_shrink_share_job(x_ptr, a_ptr, seed_ptr, s_parts_ptr, counters_ptr, job // s_splits,
                                   job % s_splits, M, K, r, stride_xm, stride_xk, stride_ar, stride_ak,
                                   drop_threshold, k_per_split, s_splits + num_pid_n, R, BLOCK_M, BLOCK_K,
                                   APPLY_DROPOUT, INPUT_PRECISION)
        else:
            pid_m, pid_n = _grouped_tile_of(job, num_pid_m, num_pid_n, GROUP_M)
            _lora_fwd_tile(
                pid_m, pid_n, 0, x_ptr, w_ptr, bias_ptr, s_ptr, a_ptr, b_ptr, y_ptr, seed_ptr, mag_ptr, norm_ptr,
                z_ptr, y_parts_ptr, s_parts_ptr, counters_ptr, M, N, K, r, stride_xm, stride_xk, stride_wn, stride_wk,
                stride_bias_n, stride_sm, stride_sr, stride_ar, stride_ak, stride_bn, stride_br, stride_ym,
                stride_yn, stride_mag_n, stride_zm, stride_zn, scaling, drop_threshold, keep_scale, K, s_splits, R,
                R_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, FUSE_SHRINK, APPLY_DROPOUT, DORA, INPUT_PRECISION,
                SPLIT_K_PARTIALS, S_FROM_PARTS, SHRINK_IN_LAUNCH)
    else:
        pid_m, pid_n = _grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _lora_fwd_tile(
            pid_m, pid_n, tl.program_id(1).to(tl.int64), x_ptr, w_ptr, bias_ptr, s_ptr, a_ptr, b_ptr, y_ptr, seed_ptr,
            mag_ptr, norm_ptr, z_ptr, y_parts_ptr, s_parts_ptr, counters_ptr, M, N, K, r, stride_xm, stride_xk,
            stride_wn, stride_wk, stride_bias_n, stride_sm, stride_sr, stride_ar, stride_ak, stride_bn, stride_br,
            stride_ym, stride_yn, stride_mag_n, stride_zm, stride_zn, scaling, drop_threshold, keep_scale,
            k_per_split, s_splits, R, R_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, FUSE_SHRINK, APPLY_DROPOUT, DORA,
            INPUT_PRECISION, SPLIT_K_PARTIALS, S_FROM_PARTS, SHRINK_IN_LAUNCH)


@triton.jit
def _lora_shrink_share_job(x_ptr, a_ptr, seed_ptr, s_parts_ptr, counters_ptr, pid_m, pid_k, M, K, r, stride_xm,
                           stride_xk, stride_ar, stride_ak, drop_threshold, k_per_split, arrivals,
                           R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           APPLY_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A share job of SHRINK_IN_LAUNCH: stores split pid_k's fp32 share of row block pid_m's dropout(x) A^T, as a
    _lora_shrink_kernel split does, and counts in at the row block's counter, which its tiles wait on. ``arrivals``:
    the counter's count-ins in all (shares and tiles); the last, a tile, sets it back to 0."""
    offs_m = _span(pid_m * BLOCK_M, BLOCK_M)
    offs_r = _span(0, R)
    acc = _shrink_share(x_ptr, a_ptr, seed_ptr, offs_m, offs_r, pid_k * k_per_split, k_per_split, M, K, r,
                        stride_xm, stride_xk, stride_ar, stride_ak, drop_threshold, BLOCK_K, APPLY_DROPOUT,
                        INPUT_PRECISION)
    tl.store(s_parts_ptr + pid_k * M * R + offs_m[:, None] * R + offs_r[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < r))
    _last_to_arrive(counters_ptr + pid_m, arrivals)


@triton.jit
def _lora_fwd_tile(pid_m, pid_n, pid_k, x_ptr, w_ptr, bias_ptr, s_ptr, a_ptr, b_ptr, y_ptr, seed_ptr, mag_ptr,
                   norm_ptr, z_ptr, y_parts_ptr, s_parts_ptr, counters_ptr, M, N, K, r, stride_xm, stride_xk,
                   stride_wn, stride_wk, stride_bias_n, stride_sm, stride_sr, stride_ar, stride_ak, stride_bn,
                   stride_br, stride_ym, stride_yn, stride_mag_n, stride_zm, stride_zn, scaling, drop_threshold,
                   keep_scale, k_per_split, s_splits, R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr,
                   APPLY_DROPOUT: tl.constexpr, DORA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   SPLIT_K_PARTIALS: tl.constexpr, S_FROM_PARTS: tl.constexpr, SHRINK_IN_LAUNCH: tl.constexpr):
    """Output tile (pid_m, pid_n), K split pid_k, of _lora_fwd_kernel (its arguments)."""
    offs_m = _span(pid_m * BLOCK_M, BLOCK_M)
    offs_n = _span(pid_n * BLOCK_N, BLOCK_N)

    DORA_DROPOUT: tl.constexpr = DORA and APPLY_DROPOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DORA_DROPOUT:
        acc_drop = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # (x * keep) W^T
        seed = tl.load(seed_ptr)
    if FUSE_SHRINK:
        offs_r = _span(0, R)
        s_acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        if not DORA_DROPOUT:
            seed = tl.load(seed_ptr) if APPLY_DROPOUT else 0
    if SPLIT_K_PARTIALS:
        # This program's K columns, walked from 0: a loop from k_start to min(k_start + k_per_split, K) took up to 255
        # registers and spilled 8-16 B (64 x 16 x 128 on sm_90, 64 x 32 x 128 at R = 64 on sm_80; kernel_report).
        k_start = pid_k * k_per_split
        k_len = tl.minimum(k_per_split, K - k_start)
    else:
        k_start = 0
        k_len = K
    for k0 in range(0, k_len, BLOCK_K):
        offs_k = _span(k_start + k0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        w = _load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, K, N)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        if DORA_DROPOUT:
            x_kept = _dropped(x, seed, offs_m, offs_k, drop_threshold)  # one mask for both products
            acc_drop = tl.dot(x_kept, w, acc_drop, input_precision=INPUT_PRECISION)
            if FUSE_SHRINK:
                s_acc = _shrink_step(s_acc, x_kept, a_ptr, offs_m, offs_k, offs_r, stride_ar, stride_ak, K, r, 0,
                                     drop_threshold, False, INPUT_PRECISION)
        elif FUSE_SHRINK:
            s_acc = _shrink_step(s_acc, x, a_ptr, offs_m, offs_k, offs_r, stride_ar, stride_ak, K, r, seed,
                                 drop_threshold, APPLY_DROPOUT, INPUT_PRECISION)

    finish = True
    if SPLIT_K_PARTIALS:
        splits = tl.num_programs(1)
        in_y = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        y_step = tl.cast(M, tl.int64) * N
        y_parts = (y_parts_ptr + offs_m[:, None] * N) + offs_n[None, :]  # (BLOCK_M, BLOCK_N) of split 0
        tl.store(y_parts + pid_k * y_step, acc, mask=in_y)
        if FUSE_SHRINK:
            in_s = (offs_m[:, None] < M) & (offs_r[None, :] < r)
            s_step = tl.cast(M, tl.int64) * R
            s_parts = (s_parts_ptr + pid_n * splits * s_step + offs_m[:, None] * R) + offs_r[None, :]  # split 0
            tl.store(s_parts + pid_k * s_step, s_acc, mask=in_s)
        finish = _last_to_arrive(counters_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n, splits)
        if finish:
            acc = _sum_of_parts(tl.zeros_like(acc), y_parts, y_step, splits, in_y, False)
            if FUSE_SHRINK:
                s_acc = _sum_of_parts(tl.zeros_like(s_acc), s_parts, s_step, splits, in_s, False)
    if SHRINK_IN_LAUNCH:
        _wait_for(counters_ptr + pid_m, s_splits)  # the row block's shares, stored by lower tickets
    if finish:
        _lora_fwd_epilogue(acc, acc_drop if DORA_DROPOUT else acc, s_acc if FUSE_SHRINK else acc, pid_n, offs_m,
                           offs_n, s_ptr, b_ptr, bias_ptr, y_ptr, mag_ptr, norm_ptr, z_ptr, M, N, r, stride_bias_n,
                           stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, stride_mag_n, stride_zm,
                           stride_zn, scaling, keep_scale, s_parts_ptr, s_splits, R, R_CHUNK, HAS_BIAS, FUSE_SHRINK,
                           APPLY_DROPOUT, DORA, INPUT_PRECISION, S_FROM_PARTS)
    if SHRINK_IN_LAUNCH:  # done with the shares: the last of the row block's count-ins re-zeroes its counter
        _last_to_arrive(counters_ptr + pid_m, s_splits + tl.cdiv(N, BLOCK_N))


@triton.jit
def _lora_fwd_epilogue(acc, acc_drop, s_acc, pid_n, offs_m, offs_n, s_ptr, b_ptr, bias_ptr, y_ptr, mag_ptr, norm_ptr,
                       z_ptr, M, N, r, stride_bias_n, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
                       stride_mag_n, stride_zm, stride_zn, scaling, keep_scale, s_parts_ptr, s_splits,
                       R: tl.constexpr, R_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr,
                       APPLY_DROPOUT: tl.constexpr, DORA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       S_FROM_PARTS: tl.constexpr):
    """Stores y's tile (rows offs_m, columns offs_n) from ``acc`` = x W^T (fp32, all of K): plus s S B^T (S from
    ``s_acc`` = x' A^T when FUSE_SHRINK, or summed from the shrink's shares when S_FROM_PARTS, and then stored by the
    pid_n == 0 tiles; else read from s_ptr), DoRA's scale (``acc_drop`` = x' W^T with dropout) and the bias.
    ``acc_drop`` / ``s_acc`` are unused without those flags."""
    dtype = y_ptr.dtype.element_ty
    DORA_DROPOUT: tl.constexpr = DORA and APPLY_DROPOUT
    if FUSE_SHRINK:
        offs_r = _span(0, R)
        if APPLY_DROPOUT:
            s_acc = s_acc * keep_scale
        # Columns r..R of s_acc are x . 0, which is NaN where x is inf; zeroed, so that the S B^T dot
        # over the padded rank cannot turn one inf of x into a row of NaN.
        s = tl.where(offs_r[None, :] < r, s_acc, 0.0).to(dtype)
        if pid_n == 0:
            tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, s,
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < r))
        b = _load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, r, N)  # (R, BLOCK_N)
        lora = tl.dot(s, b, input_precision=INPUT_PRECISION)
    elif S_FROM_PARTS:
        lora = _s_from_parts_dot(tl.zeros_like(acc), s_parts_ptr, s_splits, s_ptr, b_ptr, pid_n, offs_m, offs_n,
                                 stride_sm, stride_sr, stride_br, stride_bn, M, N, r, keep_scale, R, APPLY_DROPOUT,
                                 INPUT_PRECISION)
    else:
        lora = _rank_chunked_dot(tl.zeros_like(acc), s_ptr, b_ptr, offs_m, offs_n,
                                 stride_sm, stride_sr, stride_br, stride_bn, M, N, r, R, R_CHUNK, INPUT_PRECISION)
    lora = lora * scaling
    if DORA_DROPOUT:
        base_drop = acc_drop * keep_scale
        z = base_drop + lora
        tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, z.to(dtype),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
        # (g - 1) x' W^T + g s S B^T, as PEFT orders it: g z - x' W^T would cancel where g is near 1 (m is
        # initialised to n) and doubled the fp32 error of y in a tiny Llama's gate_proj.
        g = _dora_scale(mag_ptr, norm_ptr, offs_n, stride_mag_n, N)[None, :]
        acc += (g - 1.0) * base_drop + g * lora
    elif DORA:
        acc = (acc + lora) * _dora_scale(mag_ptr, norm_ptr, offs_n, stride_mag_n, N)[None, :]
    else:
        acc += lora
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(dtype),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _s_from_parts_dot(acc, s_parts_ptr, s_splits, s_ptr, b_ptr, pid_n, offs_m, offs_n, stride_sm, stride_sr,
                      stride_br, stride_bn, M, N, r, keep_scale, R: tl.constexpr,
                      APPLY_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + S B over the padded rank, with each 16-rank slice of S (rows offs_m) the sum of the shrink's
    ``s_splits`` fp32 shares (s_parts_ptr, (s_splits, M, R)) in split order, times the dropout scale, in the output
    dtype: _lora_shrink_kernel's own sum, so the same S. The pid_n == 0 tiles store it.

    16-rank slices: with R_CHUNK ones the 128 x 128 x 64 tiles spilled 80 B at R = 64 on sm_80 (kernel_report)."""
    dtype = s_ptr.dtype.element_ty
    for r0 in tl.range(0, R, 16, num_stages=1):
        offs_r = _span(r0, 16)
        # Outside (M, r) the shares were not stored: loaded as 0, so an inf of x stays in its own columns of S.
        in_s = (offs_m[:, None] < M) & (offs_r[None, :] < r)
        parts = (s_parts_ptr + offs_m[:, None] * R) + offs_r[None, :]  # (BLOCK_M, 16) of split 0
        s32 = _sum_of_parts(tl.zeros((offs_m.shape[0], 16), dtype=tl.float32), parts, tl.cast(M, tl.int64) * R,
                            s_splits, in_s, False)
        if APPLY_DROPOUT:
            s32 = s32 * keep_scale
        s = s32.to(dtype)
        if pid_n == 0:
            tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, s, mask=in_s)
        b = _load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, r, N)  # (16, BLOCK_N)
        acc = tl.dot(s, b, acc, input_precision=INPUT_PRECISION)
    return acc
