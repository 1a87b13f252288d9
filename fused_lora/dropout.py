"""The LoRA-branch dropout mask, as a pure function of (seed, row, column).

The kernels draw the keep-mask with Philox-4x32-10 (``tl.philox``) using the counter
(column, row, 0, 0) and the 64-bit seed as key, and keep an element when the top 24 bits of
the first output word are >= ``drop_threshold(p)``.  Because the mask depends only on the
element's coordinates, forward and backward kernels with different tilings draw the same
mask, and this module reproduces it bit for bit (numpy uint64 on CPU, torch int64 elsewhere).
"""
from __future__ import annotations

import numpy as np
import torch

from .kernels.dropout_args import drop_threshold, keep_scale, seed_on  # noqa: F401 (keep_scale: part of this API)

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
# Rows per chunk when building a mask: bounds the int64 temporaries to ~8 MiB each.
_ELEMENTS_PER_CHUNK = 1 << 20
# numpy path: 64K-element chunks keep the uint64 temporaries near L2; a 2048 x 4096 mask measured
# 223 ms this way against 550 ms in 1M-element chunks (median of 5, 2-core x86_64).
_CPU_ELEMENTS_PER_CHUNK = 1 << 16
_U64_ROUND_A = np.uint64(_PHILOX_ROUND_A)
_U64_ROUND_B = np.uint64(_PHILOX_ROUND_B)
_U64_MASK32 = np.uint64(_MASK32)
_U64_32 = np.uint64(32)
MAX_SEED = (1 << 63) - 1


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a 32-bit constant a and uint32 values b (in int64)."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    p_hi = a * b_hi  # < 2**48
    p_lo = a * b_lo  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox_first_word(seed: int, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """First output word of Philox-4x32-10 with counter (c0, c1, 0, 0), as int64 in [0, 2**32).

    Matches ``tl.philox(seed, c0, c1, 0, 0)[0]`` for uint32 counters.
    """
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def _philox_first_word_numpy(seed: int, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """philox_first_word in numpy uint64: a 32 x 32-bit product fits, so each round is two multiplies
    and no 16-bit splitting. Measured ~4x faster than the torch int64 version on CPU (256 x 1024
    mask, whole dropout_keep_mask: 12 ms against 57 ms, one thread, median of 7, a 2-core x86_64 machine)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    # C order for all four words: astype of a broadcast column index came out column-major, and
    # mixed layouts made every ufunc here ~2.5x slower (whole mask, 256 x 1024: 30 ms against 12 ms).
    c0, c1 = np.array(c0, dtype=np.uint64, order="C"), np.array(c1, dtype=np.uint64, order="C")
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    prod_a, prod_b = np.empty_like(c0), np.empty_like(c0)
    for _ in range(_PHILOX_ROUNDS):
        np.multiply(c2, _U64_ROUND_B, out=prod_b)
        np.multiply(c0, _U64_ROUND_A, out=prod_a)
        # c0' = hi(prod_b) ^ c1 ^ k0, built in c2's buffer; c2' = hi(prod_a) ^ c3 ^ k1, in c0's.
        np.right_shift(prod_b, _U64_32, out=c2)
        c2 ^= c1
        c2 ^= np.uint64(k0)
        np.bitwise_and(prod_b, _U64_MASK32, out=c1)
        np.right_shift(prod_a, _U64_32, out=c0)
        c0 ^= c3
        c0 ^= np.uint64(k1)
        np.bitwise_and(prod_a, _U64_MASK32, out=c3)
        c0, c2 = c2, c0
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def _keep_mask_numpy(seed: int, rows: int, cols: int, threshold: int) -> np.ndarray:
    mask = np.empty((rows, cols), dtype=np.bool_)
    if rows == 0 or cols == 0:
        return mask
    col = np.arange(cols, dtype=np.uint64)
    step = max(1, _CPU_ELEMENTS_PER_CHUNK // cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        row = np.arange(start, stop, dtype=np.uint64)
        word = _philox_first_word_numpy(seed, np.broadcast_to(col, (stop - start, cols)),
                                        np.broadcast_to(row[:, None], (stop - start, cols)))
        mask[start:stop] = (word >> np.uint64(8)) >= np.uint64(threshold)
    return mask


def dropout_keep_mask(seed, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean (rows, cols) keep-mask, identical to the one the kernels draw for this seed and p.

    CPU: numpy uint64 arithmetic; other devices: torch int64 arithmetic on the device (same bits).
    ``seed``: an int, or a 0-dim integer tensor (its 64 bits).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "meta":  # shapes only (saved-bytes measurements): no values, no seed to read
        return torch.empty(rows, cols, dtype=torch.bool, device=device)
    seed = seed_value(seed)
    threshold = drop_threshold(p)
    if device.type == "cpu":
        return torch.from_numpy(_keep_mask_numpy(seed, rows, cols, threshold))
    mask = torch.empty(rows, cols, dtype=torch.bool, device=device)
    if rows == 0 or cols == 0:
        return mask
    col = torch.arange(cols, dtype=torch.int64, device=device)
    step = max(1, _ELEMENTS_PER_CHUNK // cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        row = torch.arange(start, stop, dtype=torch.int64, device=device)
        c0 = col.expand(stop - start, cols)
        c1 = row[:, None].expand(stop - start, cols)
        word = philox_first_word(seed, c0, c1)
        mask[start:stop] = (word >> 8) >= threshold
    return mask


def draw_seed(device=None) -> torch.Tensor:
    """A fresh seed, a 0-dim int64 tensor on ``device`` (default CPU) drawn from that device's default
    generator: torch.manual_seed makes runs repeatable, checkpointing's recompute (which restores the RNG
    state) draws the same seed, and inside a CUDA graph each replay draws a new one."""
    return torch.randint(0, 1 << 62, (), dtype=torch.int64, device=device)


_NO_SEED = torch.zeros((), dtype=torch.int64)


def seed_tensor(seed, dropout_p: float, device) -> torch.Tensor:
    """The seed as the 0-dim int64 tensor the custom ops take: ``seed`` if it is one, an int placed on
    ``device``, drawn there when None; a shared CPU zero without dropout (the kernels do not read it).

    A tensor, not a Python int: a seed drawn inside torch.compile stays in the graph, and kernels that
    load it from memory see a new value on each CUDA graph replay.
    """
    if dropout_p <= 0.0:
        return _NO_SEED
    if seed is None:
        return draw_seed(device)
    return seed_on(device, seed)


def seed_value(seed) -> int:
    """The seed as a Python int (a tensor seed's 64 bits, read back: a device sync for CUDA tensors)."""
    return int(seed) & ((1 << 64) - 1) if isinstance(seed, torch.Tensor) else int(seed)
