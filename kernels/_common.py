"""@triton.jit helpers shared by the forward and backward kernels."""
import triton
import triton.language as tl


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
def _grouped_tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, int64, in grouped order: GROUP_M row blocks walk the
    column blocks together, so each column block of the weight is reused from L2."""
    pid = tl.program_id(0).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    return pid_m, pid_n
