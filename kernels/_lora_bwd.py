"""Backward kernels: one pass over dY for (dS, dB); dX = dY W + dS A fused; dA = dS^T dropout(x); and the whole
backward (dX, dA, dB) in one launch, dS recomputed per K slice."""
import triton
import triton.language as tl

from ._common import (_dora_scale, _dropped, _grouped_tile_ids, _grouped_tile_of, _last_to_arrive, _load_tile,
                      _producers_first_job, _rank_chunked_dot, _span, _sum_of_parts, _take_ticket, _wait_for)


@triton.jit
def _lora_bwd_dy_kernel(
    dy_ptr,  # (M, N)
    b_ptr,  # (N, r)
    s_ptr,  # (M, r), saved from forward
    ds_ptr,  # (M, r) output: s * dY B, x's dtype
    ds_parts_ptr,  # (n_splits, M, R) fp32 scratch, when SPLIT_N without USE_ATOMICS: each N split's share of s dY B
    db_ptr,  # (N, r) output: s * dY^T S, in dY's dtype (B's, under lora_linear)
    db_work_ptr,  # fp32 scratch: USE_ATOMICS a zero-at-rest accumulator, (N, r) for dB then (M, R) for dS; else
                  # when REDUCE (m_blocks, N, r) per-row-block partials of dB
    counters_ptr,  # int32, zero at rest: one dB counter per N split, then m_blocks dS row-block counters
    mag_ptr,  # (N,) DoRA magnitude m; this and the next four are read or written only when DORA
    norm_ptr,  # (N,) fp32 DoRA norm n
    y_ptr,  # (M, N) the forward's output, saved: y - b = g z
    bias_ptr,  # (N,); read only when DORA and HAS_BIAS
    dm_parts_ptr,  # (cdiv(M, BLOCK_M), N) fp32 output: per row block, sum_i dY_ij (y_ij - b_j)
    M, N, r,
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_dsm, stride_dsr,
    stride_ym, stride_yn,
    stride_bias_n,
    stride_mag_n,
    scaling,
    n_per_split,  # columns per program along axis 1, a multiple of BLOCK_N
    R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_N: tl.constexpr,  # several programs share a row block's N: dS summed over them in the last to arrive
    REDUCE: tl.constexpr,  # several row blocks: dB summed over them, tile by tile, in the last to arrive
    USE_ATOMICS: tl.constexpr,  # both sums by fp32 atomics (else by partials in a fixed order: deterministic)
    DORA: tl.constexpr,  # dS and dB from dZ = g * dY (g = m / n per column), and the magnitude's partials
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Program (pid_m, pid_n) owns BLOCK_M rows of dY and n_per_split of its columns, so each dY element is read
    # once. Both sums across programs end in the kernel: no memset before it and no sum or cast after it.
    _lora_bwd_dy_job(tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.num_programs(0),
                     tl.num_programs(1), dy_ptr, b_ptr, s_ptr, ds_ptr, ds_parts_ptr, db_ptr, db_work_ptr, counters_ptr,
                     mag_ptr, norm_ptr, y_ptr, bias_ptr, dm_parts_ptr, M, N, r, stride_dym, stride_dyn, stride_bn,
                     stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr, stride_ym, stride_yn, stride_bias_n,
                     stride_mag_n, scaling, n_per_split, counters_ptr + tl.num_programs(1).to(tl.int64), counters_ptr,
                     0, R, BLOCK_M, BLOCK_N, SPLIT_N, REDUCE, USE_ATOMICS, DORA, HAS_BIAS, INPUT_PRECISION, False, True)


@triton.jit
def _lora_bwd_dy_job(pid_m, pid_n, m_blocks, splits, dy_ptr, b_ptr, s_ptr, ds_ptr, ds_parts_ptr, db_ptr, db_work_ptr,
                     counters_ptr, mag_ptr, norm_ptr, y_ptr, bias_ptr, dm_parts_ptr, M, N, r, stride_dym, stride_dyn,
                     stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr, stride_ym, stride_yn,
                     stride_bias_n, stride_mag_n, scaling, n_per_split, ds_counters_ptr, ready_ptr, ready_arrivals,
                     R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
                     REDUCE: tl.constexpr, USE_ATOMICS: tl.constexpr, DORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, READY: tl.constexpr, DB: tl.constexpr):
    """Program (pid_m, pid_n) of the (m_blocks, splits) dS / dB pass (_lora_bwd_dy_kernel's arguments; dS's
    counters, one per row block, at ``ds_counters_ptr``, dB's per N split at ``counters_ptr``). READY: the program
    that stores row block pid_m's dS then counts in at ``ready_ptr`` (of ``ready_arrivals``), which the dX tiles of
    a DS_IN_LAUNCH backward wait on. Without DB only dS (the DS_IN_LAUNCH backward's dB jobs, _lora_db_group_job,
    make dB): no S read and no dB dot."""
    n_start = pid_n * n_per_split
    n_stop = tl.minimum(n_start + n_per_split, N)
    offs_m = _span(pid_m * BLOCK_M, BLOCK_M)
    offs_r = _span(0, R)
    if DB:
        s = _load_tile(s_ptr, offs_m, offs_r, stride_sm, stride_sr, M, r)  # (BLOCK_M, R)
    ds_acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    # Pointer tiles advanced by an int64 step per N block (recomputing them from int64 offsets each
    # iteration kept the offset tiles live and spilled, kernel_report).
    offs_n = _span(n_start, BLOCK_N)
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn  # (BLOCK_M, BLOCK_N)
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br  # (BLOCK_N, R)
    db_ptrs = db_ptr + offs_n[:, None] * r + offs_r[None, :]  # (BLOCK_N, R)
    work_ptrs = db_work_ptr + pid_m * N * r * (1 - USE_ATOMICS) + offs_n[:, None] * r + offs_r[None, :]
    if DORA:
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn  # (BLOCK_M, BLOCK_N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        mask_n = offs_n < N - n0 + n_start
        dy = tl.load(dy_ptrs, mask=(offs_m[:, None] < M) & mask_n[None, :], other=0.0)
        if DORA:
            cols = n0 + offs_n - n_start
            y = tl.load(y_ptrs, mask=(offs_m[:, None] < M) & mask_n[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:
                y -= tl.load(bias_ptr + cols * stride_bias_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(dm_parts_ptr + pid_m * N + cols, tl.sum(dy.to(tl.float32) * y, axis=0), mask=mask_n)
            dy = (dy.to(tl.float32) * _dora_scale(mag_ptr, norm_ptr, cols, stride_mag_n, N)[None, :]).to(dy.dtype)
            y_ptrs += tl.cast(stride_yn, tl.int64) * BLOCK_N
        b = tl.load(b_ptrs, mask=mask_n[:, None] & (offs_r[None, :] < r), other=0.0)
        ds_acc = tl.dot(dy, b, ds_acc, input_precision=INPUT_PRECISION)
        if DB:
            db = tl.dot(tl.trans(dy), s, input_precision=INPUT_PRECISION) * scaling  # (BLOCK_N, R)
            db_mask = mask_n[:, None] & (offs_r[None, :] < r)
            if REDUCE and USE_ATOMICS:
                tl.atomic_add(work_ptrs, db, mask=db_mask, sem="relaxed", scope="gpu")
            elif REDUCE:
                tl.store(work_ptrs, db, mask=db_mask)
            else:
                tl.store(db_ptrs, db.to(db_ptr.dtype.element_ty), mask=db_mask)
        dy_ptrs += tl.cast(stride_dyn, tl.int64) * BLOCK_N
        b_ptrs += tl.cast(stride_bn, tl.int64) * BLOCK_N
        db_ptrs += tl.cast(r, tl.int64) * BLOCK_N
        work_ptrs += tl.cast(r, tl.int64) * BLOCK_N
    ds_acc = ds_acc * scaling
    in_ds = (offs_m[:, None] < M) & (offs_r[None, :] < r)
    if SPLIT_N:
        if USE_ATOMICS:  # the accumulator's (M, R) after dB's (N, r)
            parts_ptrs = db_work_ptr + tl.cast(N, tl.int64) * r + offs_m[:, None] * R + offs_r[None, :]
            tl.atomic_add(parts_ptrs, ds_acc, mask=in_ds, sem="relaxed", scope="gpu")
        else:
            parts_ptrs = ds_parts_ptr + offs_m[:, None] * R + offs_r[None, :]  # (BLOCK_M, R) of split 0
            tl.store(parts_ptrs + pid_n * M * R, ds_acc, mask=in_ds)
        if _last_to_arrive(ds_counters_ptr + pid_m, splits):
            ds_acc = _sum_of_parts(tl.zeros_like(ds_acc), parts_ptrs, tl.cast(M, tl.int64) * R, splits,
                                   in_ds, USE_ATOMICS)
            tl.store(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                     ds_acc.to(ds_ptr.dtype.element_ty), mask=in_ds)
            if READY:  # the row block's dS is stored: release it to the tiles waiting on ready_ptr
                _last_to_arrive(ready_ptr, ready_arrivals)
    else:
        tl.store(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                 ds_acc.to(ds_ptr.dtype.element_ty), mask=in_ds)
        if READY:
            _last_to_arrive(ready_ptr, ready_arrivals)
    # One arrival per program (a per-tile one would stall each tile on an L2 round trip): the last row block to
    # finish this N split sums and stores all of the split's dB tiles.
    if REDUCE and DB:
        if _last_to_arrive(counters_ptr + pid_n, m_blocks):
            offs_n = _span(n_start, BLOCK_N)
            for n0 in range(n_start, n_stop, BLOCK_N):
                db_mask = (offs_n[:, None] < N) & (offs_r[None, :] < r)
                work_ptrs = db_work_ptr + offs_n[:, None] * r + offs_r[None, :]
                db = _sum_of_parts(tl.zeros((BLOCK_N, R), dtype=tl.float32), work_ptrs, tl.cast(N, tl.int64) * r,
                                   m_blocks, db_mask, USE_ATOMICS)
                tl.store(db_ptr + offs_n[:, None] * r + offs_r[None, :], db.to(db_ptr.dtype.element_ty),
                         mask=db_mask)
                offs_n += BLOCK_N


@triton.jit(do_not_specialize=["seed_ptr", "dy_splits", "db_slots", "da_slots", "tiles_first"])
def _lora_bwd_dx_kernel(
    dy_ptr,  # (M, N)
    w_ptr,  # (N, K)
    ds_ptr,  # (M, r): read; with DS_IN_LAUNCH written by the launch's dS / dB jobs
    a_ptr,  # (r, K)
    dx_ptr,  # (M, K) output
    seed_ptr,  # () int64 dropout seed; loaded only when APPLY_DROPOUT
    mag_ptr,  # (N,) DoRA magnitude m; read only when DORA
    norm_ptr,  # (N,) fp32 DoRA norm n; read only when DORA
    b_ptr,  # (N, r); this and the next four only with DS_IN_LAUNCH
    s_ptr,  # (M, r), saved from forward
    db_ptr,  # (N, r) output: s dY^T S, in dY's dtype
    x_ptr,  # (M, K)
    da_ptr,  # (r, K) output in x's dtype: dS^T dropout(x)
    y_ptr,  # (M, N) with DS_IN_LAUNCH and DORA: the forward's saved output (Z with APPLY_DROPOUT)
    bias_ptr,  # (N,) with DS_IN_LAUNCH, DORA and HAS_BIAS
    dm_parts_ptr,  # (cdiv(M, BLOCK_M) x BLOCK_M / DS_ROWS, N) fp32 output with DS_IN_LAUNCH and DORA: dm's partials
    # fp32, zero at rest: the (N, r) dB, (M, R) dS and (r, K) dA accumulators of the fp32 atomics
    work_ptr,
    # int32, zero at rest: dS per row block, dS ready per row block, dA and dB per JOB_COLS columns of K and N, ticket
    counters_ptr,
    M, N, K, r,
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_dsm, stride_dsr,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    stride_mag_n,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_xm, stride_xk,
    stride_ym, stride_yn,
    stride_bias_n,
    drop_threshold, keep_scale, scaling,
    n_per_split,  # with DS_IN_LAUNCH: columns of N per dS / dB job, a multiple of DY_BLOCK_N
    dy_splits,  # with DS_IN_LAUNCH: dS jobs per row block (N splits)
    db_slots,  # with DS_IN_LAUNCH: dB jobs per row block (_lora_db_group_job), after its dA jobs
    da_slots,  # with DS_IN_LAUNCH: dA jobs per row block (_lora_da_group_job)
    tiles_first,  # with DS_IN_LAUNCH on 64-row tiles: 1 puts a group's dX tiles before its dA and dB jobs, 0 after
    R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    APPLY_DROPOUT: tl.constexpr,
    # DoRA, g = m / n per column of dY: dX = (g dY) W + dS A; with APPLY_DROPOUT
    # dX = dY W + dropout'((g - 1) dY W + dS A), both products from the same W tiles.
    DORA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    # The whole backward in this launch (_producers_first_job's order, per row block dy_splits parts and
    # da_slots + db_slots + cdiv(K, BLOCK_K) tiles): dS jobs (_lora_bwd_dy_job on DS_ROWS rows at a time and
    # DY_BLOCK_N columns, summed over the N splits by fp32 atomics) as the parts; dA jobs (_lora_da_group_job), then
    # dB jobs (_lora_db_group_job), before or after (tiles_first) their group's dX tiles; a dX tile adds
    # dropout'(dS A) once its row block's dS is stored. dB and dA are summed over the groups of GROUP_M row blocks by
    # fp32 atomics, JOB_COLS columns a chunk. Only dS jobs run ahead of a group's tiles: nothing waits on dB.
    DS_IN_LAUNCH: tl.constexpr = False,
    DY_BLOCK_N: tl.constexpr = 64,
    DS_ROWS: tl.constexpr = 64,  # with DS_IN_LAUNCH: the rows a dS job sums at a time (dm's partials' rows with DORA)
    JOB_COLS: tl.constexpr = 64,  # with DS_IN_LAUNCH: the columns of N or K a dB or dA job sums at a time
    HAS_BIAS: tl.constexpr = False,  # DS_IN_LAUNCH with DORA and no APPLY_DROPOUT: the dS / dB jobs subtract b from y
):
    if DS_IN_LAUNCH:
        num_pid_m = tl.cdiv(M, BLOCK_M).to(tl.int64)
        num_pid_k = tl.cdiv(K, BLOCK_K).to(tl.int64)
        num_groups = tl.cdiv(num_pid_m, GROUP_M)
        DS_HALVES: tl.constexpr = BLOCK_M // DS_ROWS
        ready_ptr = counters_ptr + num_pid_m * DS_HALVES  # after dS's counters, one per DS_ROWS rows
        da_counters_ptr = ready_ptr + num_pid_m
        db_counters_ptr = da_counters_ptr + tl.cdiv(K, JOB_COLS).to(tl.int64)
        jobs = da_slots + db_slots  # per row block, ahead of its dX tiles
        ticket = _take_ticket(db_counters_ptr + tl.cdiv(N, JOB_COLS).to(tl.int64),
                              num_pid_m * (dy_splits + jobs + num_pid_k))
        is_part, job = _producers_first_job(ticket, num_pid_m, jobs + num_pid_k, dy_splits, GROUP_M)
        # For a dS job (is_part) this is discarded, and past the last group its % divides by a group size of 0 (no
        # trap on NVIDIA GPUs). Passing tl.where(is_part, 0, job) instead moved sm_80's registers by up to +67 and
        # spilled 16-40 B in 4 of the 128 records (128-row tiles with dropout; kernel_report).
        tile_m, col = _grouped_tile_of(job, num_pid_m, jobs + num_pid_k, GROUP_M)
        pid_m = tl.where(is_part, job // dy_splits, tile_m)
        first_m = pid_m // GROUP_M * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        # A lone group's dA / dB jobs store their sums without atomics. With LoRA's dropout on 128-row tiles that
        # store beside the atomic path spilled 16 B on sm_80 (kernel_report); those tiles start above MID_TOKENS
        # (more than 16 row blocks: never one group of IN_LAUNCH_GROUP_M), so they keep the atomics.
        LONE_GROUP_STORES: tl.constexpr = BLOCK_M == DS_ROWS or DORA or not APPLY_DROPOUT
        # ready's arrivals: dS's count-ins (one per DS_ROWS rows), then each reader's count-out
        readers = DS_HALVES + num_pid_k + da_slots * group_size
        da_work_ptr = work_ptr + (tl.cast(N, tl.int64) * r + tl.cast(M, tl.int64) * R)
        # A group's columns: its dA jobs, its dB jobs, then its dX tiles, or with tiles_first the tiles first, as the
        # columns rotated by the jobs (either order waits only on lower tickets: the dS jobs, issued a group ahead).
        # 64-row tiles only: on the 128-row tiles with LoRA's dropout (254-255 registers on sm_80) the rotation
        # spilled 16-48 B, as did dB jobs ahead of dA jobs (kernel_report); plans.plan_lora_bwd_in_launch keeps
        # tiles_first at 0 there.
        if BLOCK_M == DS_ROWS:
            col = (col + tiles_first * jobs) % (jobs + num_pid_k)
        if is_part:
            # DS_ROWS at a time: one (128, 64) fp32 dS accumulator beside the 128 x 128 tiles' code spilled 8-32 B
            # on sm_80 at R = 64 (kernel_report).
            for h in tl.static_range(DS_HALVES):
                _lora_bwd_dy_job(pid_m * DS_HALVES + h, job % dy_splits, num_pid_m, dy_splits, dy_ptr, b_ptr, s_ptr,
                                 ds_ptr, work_ptr, db_ptr, work_ptr, counters_ptr, mag_ptr, norm_ptr, y_ptr, bias_ptr,
                                 dm_parts_ptr, M, N, r, stride_dym, stride_dyn, stride_bn, stride_br, stride_sm,
                                 stride_sr, stride_dsm, stride_dsr, stride_ym, stride_yn, stride_bias_n, stride_mag_n,
                                 scaling, n_per_split, counters_ptr, ready_ptr + pid_m, readers, R, DS_ROWS,
                                 DY_BLOCK_N, True, False, True, DORA, HAS_BIAS, INPUT_PRECISION, True, False)
        elif col < da_slots:
            _lora_da_group_job(pid_m - first_m, col, da_slots, first_m, group_size, num_groups, readers, ds_ptr,
                               x_ptr, da_ptr, da_work_ptr, ready_ptr, da_counters_ptr, seed_ptr, M, K, r, stride_dsm,
                               stride_dsr, stride_xm, stride_xk, drop_threshold, keep_scale, R, BLOCK_M, JOB_COLS,
                               APPLY_DROPOUT, INPUT_PRECISION, DS_ROWS, LONE_GROUP_STORES)
        elif col < jobs:
            _lora_db_group_job(pid_m - first_m, col - da_slots, db_slots, first_m, group_size, num_groups, dy_ptr,
                               s_ptr, db_ptr, work_ptr, db_counters_ptr, mag_ptr, norm_ptr, M, N, r, stride_dym,
                               stride_dyn, stride_sm, stride_sr, stride_mag_n, scaling, R, BLOCK_M, JOB_COLS, DORA,
                               INPUT_PRECISION, LONE_GROUP_STORES)
        else:
            _lora_bwd_dx_tile(pid_m, col - jobs, dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, seed_ptr, mag_ptr,
                              norm_ptr, ready_ptr, readers, M, N, K, r, stride_dym, stride_dyn, stride_wn, stride_wk,
                              stride_dsm, stride_dsr, stride_ar, stride_ak, stride_dxm, stride_dxk, stride_mag_n,
                              drop_threshold, keep_scale, R, R_CHUNK, BLOCK_M, BLOCK_K, BLOCK_N, APPLY_DROPOUT, DORA,
                              INPUT_PRECISION, True, DS_ROWS)
    else:
        pid_m, pid_k = _grouped_tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
        _lora_bwd_dx_tile(pid_m, pid_k, dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, seed_ptr, mag_ptr, norm_ptr,
                          counters_ptr, 0, M, N, K, r, stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm,
                          stride_dsr, stride_ar, stride_ak, stride_dxm, stride_dxk, stride_mag_n, drop_threshold,
                          keep_scale, R, R_CHUNK, BLOCK_M, BLOCK_K, BLOCK_N, APPLY_DROPOUT, DORA, INPUT_PRECISION,
                          False)


@triton.jit
def _lora_bwd_dx_tile(pid_m, pid_k, dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, seed_ptr, mag_ptr, norm_ptr, ready_ptr,
                      readers, M, N, K, r, stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr,
                      stride_ar, stride_ak, stride_dxm, stride_dxk, stride_mag_n, drop_threshold, keep_scale,
                      R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, APPLY_DROPOUT: tl.constexpr, DORA: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, DS_IN_LAUNCH: tl.constexpr, DS_ROWS: tl.constexpr = 64):
    """dX tile (pid_m, pid_k) of _lora_bwd_dx_kernel (its arguments). DS_IN_LAUNCH: the row block's dS is waited for
    at ready_ptr[pid_m] (BLOCK_M / DS_ROWS count-ins), before the main loop with LoRA's dropout and after it
    otherwise (DS_LATE), and the tile counts out there (of ``readers``) once it has read it."""
    offs_m = _span(pid_m * BLOCK_M, BLOCK_M)
    offs_k = _span(pid_k * BLOCK_K, BLOCK_K)

    DORA_DROPOUT: tl.constexpr = DORA and APPLY_DROPOUT
    # The LoRA term dropout'(dS A) seeds the accumulator, so dX is written in one pass. DoRA with dropout masks
    # dS A + (g - 1) dY W, so that sum gets its own accumulator, masked after the loop.
    # DS_LATE: dS A is added after the main loop, so the first wave's tiles run their main loop while the dS jobs
    # make dS: into an accumulator the loop keeps anyway (dX's, or DoRA's masked one), or with LoRA's dropout, which
    # masks dS A alone, into a second (BLOCK_M, BLOCK_K) fp32 accumulator after the loop. That one spilled 8-504 B on
    # the 128 x 128 tiles on sm_80 / sm_90 at every rank (kernel_report), so there the tiles wait before the loop;
    # plans.plan_lora_bwd_in_launch's tiles_wait_at_start is this condition's twin.
    DS_LATE: tl.constexpr = DS_IN_LAUNCH and (DORA or not APPLY_DROPOUT or BLOCK_M == DS_ROWS)
    if DS_LATE:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    elif DS_IN_LAUNCH:
        _wait_for(ready_ptr + pid_m, BLOCK_M // DS_ROWS)  # the row block's dS, stored by lower tickets
        acc = _rank_chunked_dot(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), ds_ptr, a_ptr, offs_m, offs_k,
                                stride_dsm, stride_dsr, stride_ar, stride_ak, M, K, r, R, R_CHUNK, INPUT_PRECISION,
                                ".cg")
        _last_to_arrive(ready_ptr + pid_m, readers)  # dS is not written again in the launch: no later hazard
    else:
        acc = _rank_chunked_dot(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), ds_ptr, a_ptr, offs_m, offs_k,
                                stride_dsm, stride_dsr, stride_ar, stride_ak, M, K, r, R, R_CHUNK, INPUT_PRECISION)
    if DORA_DROPOUT:
        acc_kept = acc
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    elif APPLY_DROPOUT and not DS_LATE:
        seed = tl.load(seed_ptr)
        acc = _dropped(acc, seed, offs_m, offs_k, drop_threshold) * keep_scale

    offs_n = _span(0, BLOCK_N)
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn  # (BLOCK_M, BLOCK_N)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # (BLOCK_N, BLOCK_K)
    # Advanced by an int64 step per N block: recomputing the pointer tiles from int64 offsets each
    # iteration spilled 144-376 B at 128 x 128 on sm_90 (kernel_report).
    dy_step = tl.cast(stride_dyn, tl.int64) * BLOCK_N
    w_step = tl.cast(stride_wn, tl.int64) * BLOCK_N
    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=(offs_m[:, None] < M) & mask_n[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k[None, :] < K), other=0.0)
        if DORA_DROPOUT:
            g = _dora_scale(mag_ptr, norm_ptr, n0 + offs_n, stride_mag_n, N)
            dy_kept = (dy.to(tl.float32) * (g - 1.0)[None, :]).to(dy.dtype)
            acc_kept = tl.dot(dy_kept, w, acc_kept, input_precision=INPUT_PRECISION)
        elif DORA:
            g = _dora_scale(mag_ptr, norm_ptr, n0 + offs_n, stride_mag_n, N)
            dy = (dy.to(tl.float32) * g[None, :]).to(dy.dtype)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
        dy_ptrs += dy_step
        w_ptrs += w_step
    if DS_LATE:
        _wait_for(ready_ptr + pid_m, BLOCK_M // DS_ROWS)  # the row block's dS, stored by lower tickets
        if DORA_DROPOUT:
            acc_kept = _rank_chunked_dot(acc_kept, ds_ptr, a_ptr, offs_m, offs_k, stride_dsm, stride_dsr, stride_ar,
                                         stride_ak, M, K, r, R, R_CHUNK, INPUT_PRECISION, ".cg")
        elif APPLY_DROPOUT:
            lora = _rank_chunked_dot(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), ds_ptr, a_ptr, offs_m, offs_k,
                                     stride_dsm, stride_dsr, stride_ar, stride_ak, M, K, r, R, R_CHUNK,
                                     INPUT_PRECISION, ".cg")
            acc += _dropped(lora, tl.load(seed_ptr), offs_m, offs_k, drop_threshold) * keep_scale
        else:
            acc = _rank_chunked_dot(acc, ds_ptr, a_ptr, offs_m, offs_k, stride_dsm, stride_dsr, stride_ar, stride_ak,
                                    M, K, r, R, R_CHUNK, INPUT_PRECISION, ".cg")
        _last_to_arrive(ready_ptr + pid_m, readers)  # dS is not written again in the launch: no later hazard
    if DORA_DROPOUT:
        seed = tl.load(seed_ptr)
        acc += _dropped(acc_kept, seed, offs_m, offs_k, drop_threshold) * keep_scale
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def _group_rows(first_m, group_size, M, BLOCK_M: tl.constexpr):
    """The rows [start, stop) of the group of row blocks first_m .. first_m + group_size - 1."""
    return first_m * BLOCK_M, tl.minimum((first_m + group_size) * BLOCK_M, M)


@triton.jit
def _add_to_sum_over_groups(acc, offs, mask, work_ptr, out_ptr, counter_ptr, num_groups,
                            LONE_GROUP_STORES: tl.constexpr):
    """Adds a group's fp32 share ``acc`` into the zero-at-rest accumulator at work_ptr + offs; the last of the
    num_groups groups to arrive at ``counter_ptr`` stores the sum at out_ptr + offs in out_ptr's dtype and re-zeroes
    the accumulator (_last_to_arrive, _sum_of_parts). LONE_GROUP_STORES: a lone group (num_groups == 1) stores its
    share as the sum: no atomics, the counter untouched."""
    if LONE_GROUP_STORES and num_groups == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(work_ptr + offs, acc, mask=mask, sem="relaxed", scope="gpu")
        if _last_to_arrive(counter_ptr, num_groups):
            total = _sum_of_parts(tl.zeros_like(acc), work_ptr + offs, 0, 1, mask, True)
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_db_group_job(j, slot, db_slots, first_m, group_size, num_groups, dy_ptr, s_ptr, db_ptr, db_work_ptr,
                       db_counters_ptr, mag_ptr, norm_ptr, M, N, r, stride_dym, stride_dyn, stride_sm, stride_sr,
                       stride_mag_n, scaling, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       DORA: tl.constexpr, INPUT_PRECISION: tl.constexpr, LONE_GROUP_STORES: tl.constexpr,
                       ROWS: tl.constexpr = 64):
    """A DS_IN_LAUNCH dB job: dB = s dY^T S (DORA: s (g dY)^T S) over a group's rows (row blocks first_m ..
    first_m + group_size - 1) for the chunks of BLOCK_C columns of N numbered slot x group_size + j, then every
    db_slots x group_size further; each chunk's (BLOCK_C, R) sum is added into the fp32 (N, r) accumulator
    ``db_work_ptr``, and the last of the num_groups groups to arrive at a chunk (its counter at db_counters_ptr)
    stores it in dY's dtype (_add_to_sum_over_groups). One add per group, not per row block: the group's rows are
    summed in registers."""
    row_start, row_stop = _group_rows(first_m, group_size, M, BLOCK_M)
    offs_r = _span(0, R)
    for c in range(slot * group_size + j, tl.cdiv(N, BLOCK_C), db_slots * group_size):
        cols = _span(c * BLOCK_C, BLOCK_C)
        acc = tl.zeros((BLOCK_C, R), dtype=tl.float32)
        for m0 in tl.range(row_start, row_stop, ROWS):
            rows = _span(m0, ROWS)
            dy = _load_tile(dy_ptr, rows, cols, stride_dym, stride_dyn, row_stop, N)  # (ROWS, BLOCK_C)
            if DORA:  # rounded as _lora_bwd_dy_job rounds g dY
                dy = (dy.to(tl.float32) * _dora_scale(mag_ptr, norm_ptr, cols, stride_mag_n, N)[None, :]).to(dy.dtype)
            s = _load_tile(s_ptr, rows, offs_r, stride_sm, stride_sr, row_stop, r)  # (ROWS, R)
            acc = tl.dot(tl.trans(dy), s, acc, input_precision=INPUT_PRECISION)
        acc = acc * scaling
        offs = cols[:, None] * r + offs_r[None, :]  # (BLOCK_C, R) of the (N, r) grad
        _add_to_sum_over_groups(acc, offs, (cols[:, None] < N) & (offs_r[None, :] < r), db_work_ptr, db_ptr,
                                db_counters_ptr + c, num_groups, LONE_GROUP_STORES)


@triton.jit
def _lora_da_group_job(j, slot, da_slots, first_m, group_size, num_groups, readers, ds_ptr, x_ptr, da_ptr,
                       da_work_ptr, ready_ptr, da_counters_ptr, seed_ptr, M, K, r, stride_dsm, stride_dsr, stride_xm,
                       stride_xk, drop_threshold, keep_scale, R: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_C: tl.constexpr, APPLY_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       DS_ROWS: tl.constexpr, LONE_GROUP_STORES: tl.constexpr, ROWS: tl.constexpr = 64):
    """A DS_IN_LAUNCH dA job: once the group's dS is stored (its row blocks' ready counters, BLOCK_M / DS_ROWS
    count-ins each), dA^T = dropout(x)^T dS over the group's rows for the chunks of BLOCK_C columns of K numbered
    slot x group_size + j, then every da_slots x group_size further; each (BLOCK_C, R) sum is added into the fp32
    (r, K) accumulator ``da_work_ptr``, and the last of the num_groups groups to arrive at a chunk (its counter at
    da_counters_ptr) stores it in x's dtype. The job then counts out of each row block's ready counter (of
    ``readers``)."""
    row_start, row_stop = _group_rows(first_m, group_size, M, BLOCK_M)
    for m in range(first_m, first_m + group_size):
        _wait_for(ready_ptr + m, BLOCK_M // DS_ROWS)  # stored by lower tickets: the group's dS jobs
    offs_r = _span(0, R)
    if APPLY_DROPOUT:
        seed = tl.load(seed_ptr)
    for c in range(slot * group_size + j, tl.cdiv(K, BLOCK_C), da_slots * group_size):
        offs_k = _span(c * BLOCK_C, BLOCK_C)
        acc = tl.zeros((BLOCK_C, R), dtype=tl.float32)
        for m0 in tl.range(row_start, row_stop, ROWS):
            rows = _span(m0, ROWS)
            x = _load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, row_stop, K)  # (ROWS, BLOCK_C)
            if APPLY_DROPOUT:
                x = _dropped(x, seed, rows, offs_k, drop_threshold)
            ds = _load_tile(ds_ptr, rows, offs_r, stride_dsm, stride_dsr, row_stop, r, ".cg")  # (ROWS, R)
            acc = tl.dot(tl.trans(x), ds, acc, input_precision=INPUT_PRECISION)
        if APPLY_DROPOUT:
            acc = acc * keep_scale
        offs = offs_r[None, :] * K + offs_k[:, None]  # (BLOCK_C, R) of the (r, K) grad
        _add_to_sum_over_groups(acc, offs, (offs_k[:, None] < K) & (offs_r[None, :] < r), da_work_ptr, da_ptr,
                                da_counters_ptr + c, num_groups, LONE_GROUP_STORES)
    for m in range(first_m, first_m + group_size):
        _last_to_arrive(ready_ptr + m, readers)  # done with the group's dS


@triton.jit(do_not_specialize=["seed_ptr"])
def _lora_bwd_da_kernel(
    ds_ptr,  # (M, r)
    x_ptr,  # (M, K)
    da_ptr,  # (r, K) output in x's dtype (A's, under lora_linear)
    da_work_ptr,  # fp32 scratch when REDUCE: USE_ATOMICS a zero-at-rest (r, K) accumulator, else (SPLIT_M, r, K)
                  # per-slice partials
    counters_ptr,  # int32, zero at rest: one per K tile, when REDUCE
    seed_ptr,  # () int64 dropout seed; loaded only when APPLY_DROPOUT
    M, K, r,
    stride_dsm, stride_dsr,
    stride_xm, stride_xk,
    drop_threshold, keep_scale,
    m_blocks_per_split,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    REDUCE: tl.constexpr,  # several slices of M: dA summed over them in the last to arrive per K tile
    USE_ATOMICS: tl.constexpr,  # that sum by fp32 atomics (else by partials in a fixed order: deterministic)
    APPLY_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Computes dA^T = dropout(x)^T dS as (BLOCK_K, R) tiles: BLOCK_K >= 64 is the MMA's M
    # dimension, which wgmma needs; R itself can be 16.
    pid_k = tl.program_id(0).to(tl.int64)
    pid_split = tl.program_id(1).to(tl.int64)
    offs_k = _span(pid_k * BLOCK_K, BLOCK_K)
    offs_r = _span(0, R)
    if APPLY_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_K, R), dtype=tl.float32)
    m_start = pid_split * m_blocks_per_split * BLOCK_M
    m_stop = tl.minimum(m_start + m_blocks_per_split * BLOCK_M, M)
    for m0 in range(m_start, m_stop, BLOCK_M):
        offs_m = _span(m0, BLOCK_M)
        x = _load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, m_stop, K)  # (BLOCK_M, BLOCK_K)
        if APPLY_DROPOUT:
            x = _dropped(x, seed, offs_m, offs_k, drop_threshold)
        ds = _load_tile(ds_ptr, offs_m, offs_r, stride_dsm, stride_dsr, m_stop, r)  # (BLOCK_M, R)
        acc = tl.dot(tl.trans(x), ds, acc, input_precision=INPUT_PRECISION)
    if APPLY_DROPOUT:
        acc = acc * keep_scale
    da_offs = offs_r[None, :] * K + offs_k[:, None]  # (BLOCK_K, R) of the (r, K) grad
    da_mask = (offs_k[:, None] < K) & (offs_r[None, :] < r)
    if REDUCE:
        work_ptrs = da_work_ptr + da_offs
        if USE_ATOMICS:
            tl.atomic_add(work_ptrs, acc, mask=da_mask, sem="relaxed", scope="gpu")
        else:
            tl.store(work_ptrs + pid_split * r * K, acc, mask=da_mask)
        if _last_to_arrive(counters_ptr + pid_k, tl.num_programs(1)):
            acc = _sum_of_parts(tl.zeros_like(acc), work_ptrs, tl.cast(r, tl.int64) * K, tl.num_programs(1), da_mask,
                                USE_ATOMICS)
            tl.store(da_ptr + da_offs, acc.to(da_ptr.dtype.element_ty), mask=da_mask)
    else:
        tl.store(da_ptr + da_offs, acc.to(da_ptr.dtype.element_ty), mask=da_mask)


@triton.jit(do_not_specialize=["seed_ptr"])
def _lora_bwd_dx_da_db_kernel(
    dy_ptr,  # (M, N)
    x_ptr,  # (M, K)
    w_ptr,  # (N, K)
    a_ptr,  # (r, K)
    b_ptr,  # (N, r)
    s_ptr,  # (M, r), saved from forward
    dx_ptr,  # (M, K) output: dY W + dropout'(dS A)
    da_ptr,  # (r, K) output in x's dtype: dS^T dropout(x)
    db_ptr,  # (N, r) output in dY's dtype: s dY^T S
    work_ptr,  # fp32, zero at rest, when REDUCE: the (r, K) dA accumulator, then the (N, r) dB accumulator
    counters_ptr,  # int32, zero at rest, when REDUCE: one per K slice
    seed_ptr,  # () int64 dropout seed; loaded only when APPLY_DROPOUT
    M, N, K, r,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_dxm, stride_dxk,
    stride_dar, stride_dak,
    stride_dbn, stride_dbr,
    scaling, drop_threshold, keep_scale,
    R: tl.constexpr,  # r padded to a power of two >= 16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_SIDE: tl.constexpr,  # columns of the dA and dB tiles (the M side of their dots: 64 for wgmma)
    COMPUTE_DX: tl.constexpr,  # False: no W read and no dX (an input without grad); dS, dA, dB the same bits
    REDUCE: tl.constexpr,  # several row blocks: dA and dB summed over them by fp32 atomics, in the last to arrive
    APPLY_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # The whole backward in one launch. Program (pid_m, pid_k) owns a (BLOCK_M, BLOCK_K) tile of dX and walks all
    # of N, so it can recompute its row block's whole dS = s dY B in the same loop (R / BLOCK_K of the loop's
    # FLOPs) instead of waiting for another launch. The dA and dB tiles (BLOCK_SIDE columns of K and of N) are
    # dealt round-robin to the K slices; with one row block each is stored directly (no atomics: the result does
    # not depend on the order programs run in); with several every row block adds its share into an fp32
    # accumulator, and the last row block to arrive at a K slice sums, stores and re-zeroes that slice's tiles.
    pid_m, pid_k = _grouped_tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    k_slices = tl.cdiv(K, BLOCK_K)
    dtype = dy_ptr.dtype.element_ty
    offs_m = _span(pid_m * BLOCK_M, BLOCK_M)
    offs_r = _span(0, R)
    offs_k = _span(pid_k * BLOCK_K, BLOCK_K)
    seed = tl.load(seed_ptr) if APPLY_DROPOUT else 0

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    ds_acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    offs_n = _span(0, BLOCK_N)
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn  # (BLOCK_M, BLOCK_N)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # (BLOCK_N, BLOCK_K)
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br  # (BLOCK_N, R)
    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=(offs_m[:, None] < M) & mask_n[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[:, None] & (offs_r[None, :] < r), other=0.0)
        if COMPUTE_DX:
            w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k[None, :] < K), other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
        ds_acc = tl.dot(dy, b, ds_acc, input_precision=INPUT_PRECISION)
        dy_ptrs += tl.cast(stride_dyn, tl.int64) * BLOCK_N
        w_ptrs += tl.cast(stride_wn, tl.int64) * BLOCK_N
        b_ptrs += tl.cast(stride_bn, tl.int64) * BLOCK_N
    # dS in x's dtype, as the separate dS / dB launch stores it; zero outside (M, r): an inf of dY times a padded
    # zero of B is NaN there, and the products below would spread it to every row.
    in_ds = (offs_m[:, None] < M) & (offs_r[None, :] < r)
    ds = tl.where(in_ds, ds_acc * scaling, 0.0).to(dtype)

    if COMPUTE_DX:
        a = _load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, r, K)  # (R, BLOCK_K)
        lora = tl.dot(ds, a, input_precision=INPUT_PRECISION)
        if APPLY_DROPOUT:
            lora = _dropped(lora, seed, offs_m, offs_k, drop_threshold) * keep_scale
        acc += lora
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))

    offs_side = _span(0, BLOCK_SIDE)
    db_work_ptr = work_ptr + tl.cast(r, tl.int64) * K
    for t in range(pid_k, tl.cdiv(K, BLOCK_SIDE), k_slices):  # dA^T tiles, (BLOCK_SIDE, R)
        cols, da_mask, da_work, da_out = _side_tile(t, offs_side, offs_r, work_ptr, da_ptr, K, r, stride_dak,
                                                    stride_dar, True, BLOCK_SIDE)
        x = _load_tile(x_ptr, offs_m, cols, stride_xm, stride_xk, M, K)  # (BLOCK_M, BLOCK_SIDE)
        if APPLY_DROPOUT:
            x = _dropped(x, seed, offs_m, cols, drop_threshold)
        da = tl.dot(tl.trans(x), ds, input_precision=INPUT_PRECISION)
        if APPLY_DROPOUT:
            da = da * keep_scale
        if REDUCE:
            tl.atomic_add(da_work, da, mask=da_mask, sem="relaxed", scope="gpu")
        else:
            tl.store(da_out, da.to(da_ptr.dtype.element_ty), mask=da_mask)
    s = _load_tile(s_ptr, offs_m, offs_r, stride_sm, stride_sr, M, r)  # (BLOCK_M, R)
    for t in range(pid_k, tl.cdiv(N, BLOCK_SIDE), k_slices):  # dB tiles, (BLOCK_SIDE, R)
        cols, db_mask, db_work, db_out = _side_tile(t, offs_side, offs_r, db_work_ptr, db_ptr, N, r, stride_dbn,
                                                    stride_dbr, False, BLOCK_SIDE)
        dy = _load_tile(dy_ptr, offs_m, cols, stride_dym, stride_dyn, M, N)  # (BLOCK_M, BLOCK_SIDE)
        db = tl.dot(tl.trans(dy), s, input_precision=INPUT_PRECISION) * scaling
        if REDUCE:
            tl.atomic_add(db_work, db, mask=db_mask, sem="relaxed", scope="gpu")
        else:
            tl.store(db_out, db.to(db_ptr.dtype.element_ty), mask=db_mask)
    # One arrival per program (a per-tile one would stall each tile on an L2 round trip): the last row block to
    # finish this K slice sums and stores all of the slice's dA and dB tiles.
    if REDUCE:
        if _last_to_arrive(counters_ptr + pid_k, tl.cdiv(M, BLOCK_M)):
            zeros = tl.zeros((BLOCK_SIDE, R), dtype=tl.float32)
            for t in range(pid_k, tl.cdiv(K, BLOCK_SIDE), k_slices):
                _, da_mask, da_work, da_out = _side_tile(t, offs_side, offs_r, work_ptr, da_ptr, K, r, stride_dak,
                                                         stride_dar, True, BLOCK_SIDE)
                da = _sum_of_parts(zeros, da_work, 0, 1, da_mask, True)
                tl.store(da_out, da.to(da_ptr.dtype.element_ty), mask=da_mask)
            for t in range(pid_k, tl.cdiv(N, BLOCK_SIDE), k_slices):
                _, db_mask, db_work, db_out = _side_tile(t, offs_side, offs_r, db_work_ptr, db_ptr, N, r, stride_dbn,
                                                         stride_dbr, False, BLOCK_SIDE)
                db = _sum_of_parts(zeros, db_work, 0, 1, db_mask, True)
                tl.store(db_out, db.to(db_ptr.dtype.element_ty), mask=db_mask)


@triton.jit
def _side_tile(t, offs_side, offs_r, work_ptr, out_ptr, cols_len, r, stride_out_col, stride_out_r,
               TRANSPOSED_WORK: tl.constexpr, BLOCK_SIDE: tl.constexpr):
    """The one-launch backward's dA^T or dB tile ``t`` (BLOCK_SIDE columns of K or N, by R): its columns, mask,
    fp32 accumulator pointers (dA's accumulator is (r, K), TRANSPOSED_WORK; dB's (N, r)) and output pointers. The
    share loops and the last program's sums address the same tiles through this one function."""
    cols = offs_side + t * BLOCK_SIDE
    mask = (cols[:, None] < cols_len) & (offs_r[None, :] < r)
    if TRANSPOSED_WORK:
        work = work_ptr + offs_r[None, :] * cols_len + cols[:, None]
    else:
        work = work_ptr + cols[:, None] * r + offs_r[None, :]
    return cols, mask, work, out_ptr + cols[:, None] * stride_out_col + offs_r[None, :] * stride_out_r
