"""TRITON_INTERPRET=1: whether it is on, and making it compute bf16 and fp32 exchanges as the GPU does.

Three gaps of the interpreter (measured: triton 3.9.0):
- It stores bf16 as uint16 bit patterns and hands them to np.matmul unchanged, so a bf16 tl.dot
  returns garbage. Widening bf16 dot operands to fp32 (bits << 16) fixes it; our kernels do no
  other bf16 arithmetic.
- Its fp32 -> bf16 cast (`.to(tl.bfloat16)`) truncates, while compiled Triton rounds to nearest
  even (cvt.rn.bf16.f32): 510 of 1024 randn values came out one ulp off. The cast below rounds to
  nearest even, so every bf16 store of a kernel (y, S, dS, dX, dA, dB) matches the GPU's.
- It has no fp32 atomic exchange ("Unsupported data type"), which the sums finished in the kernels read and
  re-zero their accumulators with (_common._sum_of_parts). The exchange below runs on the words' int32 bits, which
  is what the GPU's 32-bit atom.exch does.
"""
import os

import numpy as np


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter; parsed as triton's getenv_bool does."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _round_fp32_to_bf16_bits(data: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    rounded = rounded.astype(np.uint16)
    return np.where(np.isnan(data), np.uint16(0x7FC0), rounded)  # NaN stays a (quiet) NaN


def install_fixes() -> None:
    from triton.runtime import interpreter
    import triton.language as tl

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls.create_dot, "_fused_lora_bf16", False):
        return
    original_dot = builder_cls.create_dot
    original_cast = builder_cls.cast_impl

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_round_fp32_to_bf16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    original_rmw = builder_cls.create_atomic_rmw

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        if rmwOp == interpreter._ir.ATOMIC_OP.XCHG and val.dtype.scalar == tl.float32:
            bits = interpreter.TensorHandle(np.ascontiguousarray(val.data).view(np.int32), tl.int32)
            old = original_rmw(self, rmwOp, ptr, bits, mask, sem, scope)
            return interpreter.TensorHandle(np.ascontiguousarray(old.data).view(np.float32), tl.float32)
        return original_rmw(self, rmwOp, ptr, val, mask, sem, scope)

    create_dot._fused_lora_bf16 = True
    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl
    builder_cls.create_atomic_rmw = create_atomic_rmw
