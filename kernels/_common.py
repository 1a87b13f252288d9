"""@triton.jit helpers shared by the forward and backward kernels."""
import triton
import triton.language as tl


@triton.jit
def _span(start, BLOCK: tl.constexpr):
    """start + [0, BLOCK) as int64. Every pointer offset is built from these spans, so its products with
    the (int32) strides are int64 and cannot wrap (N * K >= 2**31 for a 262144 x 8192 output head)."""
    return tl.cast(start, tl.int64) + tl.arange(0, BLOCK)


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols, CACHE: tl.constexpr = ""):
    """(len(rows), len(cols)) tile of the (n_rows, n_cols) matrix at ptr; zeros outside it. CACHE ".cg": from L2, for
    data another program of the same launch stored."""
    # Two pointer adds of broadcast int64 vectors: a single add of the (rows x cols) int64 offset tile
    # kept that tile live next to the pointers and spilled (dX at 128 x 128 on sm_90, kernel_report).
    return tl.load((ptr + rows[:, None] * stride_row) + cols[None, :] * stride_col,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0, cache_modifier=CACHE)


@triton.jit
def _dropout_keep(seed, rows, cols, drop_threshold):
    """(len(rows), len(cols)) keep-mask: Philox-4x32-10 on counter (col, row, 0, 0).

    Reproduced in plain torch by fused_lora.dropout.dropout_keep_mask.
    """
    rows32 = rows.to(tl.int32)
    cols32 = cols.to(tl.int32)
    c0 = (cols32[None, :] + rows32[:, None] * 0).to(tl.uint32, bitcast=True)
    c1 = (rows32[:, None] + cols32[None, :] * 0).to(tl.uint32, bitcast=True)
    zero = c0 * 0
    word, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return (word >> 8).to(tl.int32) >= drop_threshold


@triton.jit
def _dropped(tile, seed, rows, cols, drop_threshold):
    """tile * keep (keep in {0, 1}), as the reference's x * mask: NaN and inf at a dropped position give
    NaN, as in PEFT, instead of vanishing as tl.where would make them."""
    # The product is taken in fp32: exact for keep in {0, 1}, and the interpreter cannot multiply bf16.
    keep = _dropout_keep(seed, rows, cols, drop_threshold).to(tl.float32)
    return (tile.to(tl.float32) * keep).to(tile.dtype)


@triton.jit
def _shrink_step(acc, x, a_ptr, offs_m, offs_k, offs_r, stride_ar, stride_ak, K, r, seed, drop_threshold,
                 APPLY_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + dropout(x) A^T over one K tile: x is the (BLOCK_M, BLOCK_K) tile, A's (BLOCK_K, R) tile is
    loaded here; ``seed`` is read only when APPLY_DROPOUT."""
    if APPLY_DROPOUT:
        x = _dropped(x, seed, offs_m, offs_k, drop_threshold)
    a = _load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, r)  # (BLOCK_K, R)
    return tl.dot(x, a, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _rank_chunked_dot(acc, s_ptr, b_ptr, offs_m, offs_n, stride_sm, stride_sr, stride_br, stride_bn, M, N, r,
                      R: tl.constexpr, R_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      S_CACHE: tl.constexpr = ""):
    """acc + S B over the padded rank: S (M, r) rows offs_m (loaded with S_CACHE, _load_tile), B (r, N) columns
    offs_n, in R_CHUNK slices.

    A runtime loop, not pipelined: one rank slice's operands are live at a time (an unrolled
    static_range kept every slice's loads in flight and spilled at R = 256).
    """
    for r0 in tl.range(0, R, R_CHUNK, num_stages=1):
        offs_r = _span(r0, R_CHUNK)
        s = _load_tile(s_ptr, offs_m, offs_r, stride_sm, stride_sr, M, r, S_CACHE)  # (BLOCK_M, R_CHUNK)
        b = _load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, r, N)  # (R_CHUNK, BLOCK_N)
        acc = tl.dot(s, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _grouped_tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, int64, in grouped order: GROUP_M row blocks walk the
    column blocks together, so each column block of the weight is reused from L2."""
    return _grouped_tile_of(tl.program_id(0).to(tl.int64), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)


@triton.jit
def _grouped_tile_of(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of the ``pid``-th tile (int64) of a num_pid_m x num_pid_n grid in grouped order."""
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    return pid_m, pid_n


@triton.jit
def _dora_scale(mag_ptr, norm_ptr, offs_n, stride_mag_n, N):
    """(len(offs_n),) fp32 DoRA column scale g = m / n, 0 where n == 0 (such a row of W + s B A is 0, so its
    pre-scale output is 0 whatever the scale) and outside N."""
    m = tl.load(mag_ptr + offs_n * stride_mag_n, mask=offs_n < N, other=0.0).to(tl.float32)
    n = tl.load(norm_ptr + offs_n, mask=offs_n < N, other=0.0)
    return tl.where(n > 0, m / tl.where(n > 0, n, 1.0), 0.0)


@triton.jit
def _last_to_arrive(counter_ptr, parts):
    """Counts this program in at ``counter_ptr`` (int32, zero at rest) once its stores and atomics are done; True
    in the last of ``parts`` programs to arrive, which also sets the counter back to 0 for the next launch.

    The barrier orders every thread's writes before the one acq_rel atomic (release: other programs that see the
    count see those writes; acquire: the last program sees everyone's), the pattern of CUDA's threadFenceReduction
    sample. Reads of other programs' data after it are atomics or .cg loads. Where Triton pipelines a .cg load into
    cp.async.ca (it keeps .cg only on 16-byte copies: dS and S at r = 16, bf16, sm_90), the acquire still keeps
    stale lines out: in the SASS the acq_rel / acquire atomic is followed by an L1 invalidate (CCTL.IVALL), and no
    program touches a row block's dS or S lines before they are ready.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == parts - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    return last


@triton.jit
def _sum_of_parts(zeros, work_ptrs, part_step, parts, mask, USE_ATOMICS: tl.constexpr):
    """In the last program to arrive (_last_to_arrive), the sum of the fp32 tiles that ``parts`` programs left at
    ``work_ptrs`` (``zeros`` gives the tile's shape).

    USE_ATOMICS: ``work_ptrs`` is a zero-at-rest accumulator the parts added into; one atomic exchange with 0 reads
    it (at L2, where the parts' atomics landed) and zeroes it again. Otherwise part p stored its tile at
    ``work_ptrs + p * part_step``, and the tiles are summed in the order p = 0, 1, ...: the same bits whichever
    program arrives last.
    """
    if USE_ATOMICS:
        # fp32 itself: through an int32 view of the pointers it spilled 16-32 B (the dy kernel at R = 64 on sm_80,
        # DS_IN_LAUNCH's 128-row tiles with dropout on sm_90; kernel_report). The interpreter's xchg is patched
        # (_interpreter.install_fixes).
        total = tl.atomic_xchg(work_ptrs, zeros, mask=mask, sem="relaxed", scope="gpu")
    else:
        total = zeros
        for p in range(0, parts):
            total += tl.load(work_ptrs + p * part_step, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _take_ticket(ticket_ptr, tickets):
    """This program's place (int64) in the order programs started: an atomic count at ``ticket_ptr`` (int32, zero at
    rest), set back to 0 by the program that takes the last of ``tickets``. A program waits only on work of lower
    tickets, whose programs are already running and never wait: no deadlock, whatever order the GPU starts programs
    in. The interpreter runs programs one after another, so there ticket order is program order."""
    ticket = tl.atomic_add(ticket_ptr, 1, sem="relaxed", scope="gpu")
    if ticket == tickets - 1:
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")
    return ticket.to(tl.int64)


@triton.jit
def _wait_for(counter_ptr, count):
    """Spins until the int32 at ``counter_ptr`` reaches ``count``: the producers' _last_to_arrive count-ins, whose
    release makes their stores visible to this program's later L2 (.cg) loads (acquire)."""
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < count:
        pass
    tl.debug_barrier()


@triton.jit
def _producers_first_job(ticket, num_pid_m, num_pid_n, parts, GROUP_M: tl.constexpr):
    """(is_part, index) of the job ``ticket`` runs in a launch of num_pid_m x parts producer jobs (index: row block
    x parts + part, row-block-major) and num_pid_m x num_pid_n tiles (index in grouped order, _grouped_tile_of),
    where every tile needs the parts of its row block.

    The order: the parts of the first group of GROUP_M row blocks; then per group g, the parts of group g + 1
    followed by the tiles of group g. Every tile's parts thus hold lower tickets (_take_ticket), issued one group
    ahead, so they run beside the tiles of the group before. plans.producers_first_order is the same order in
    Python (the tests compare them)."""
    groups = tl.cdiv(num_pid_m, GROUP_M)
    lead = tl.minimum(num_pid_m, GROUP_M) * parts
    # Blocks before the last have GROUP_M (parts + num_pid_n) tickets (the last but one may have fewer parts).
    last_block = num_pid_m * parts + (groups - 1) * GROUP_M * num_pid_n
    g = tl.where(ticket >= last_block, groups - 1, tl.maximum(ticket - lead, 0) // (GROUP_M * (parts + num_pid_n)))
    parts_before = tl.minimum(num_pid_m, (g + 1) * GROUP_M) * parts  # of groups 0..g
    offset = ticket - (parts_before + g * GROUP_M * num_pid_n)
    block_parts = tl.maximum(tl.minimum(GROUP_M, num_pid_m - (g + 1) * GROUP_M), 0) * parts  # of group g + 1
    is_part = (ticket < lead) | (offset < block_parts)
    tile = g * GROUP_M * num_pid_n + offset - block_parts
    index = tl.where(ticket < lead, ticket, tl.where(offset < block_parts, parts_before + offset, tile))
    return is_part, index
