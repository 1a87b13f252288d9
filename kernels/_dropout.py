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
