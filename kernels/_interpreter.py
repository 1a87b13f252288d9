"""Make TRITON_INTERPRET=1 correct for bf16 tl.dot.

The interpreter stores bf16 as uint16 bit patterns and hands them to np.matmul unchanged, so a
bf16 dot returns garbage (measured: triton 3.9.0). Casts are correct, and our kernels do no bf16
elementwise math, so widening bf16 dot operands to fp32 (bits << 16) is enough.
"""
import numpy as np


def install_bf16_dot_fix() -> None:
    from triton.runtime import interpreter
    import triton.language as tl

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls.create_dot, "_fused_lora_bf16", False):
        return
    original = builder_cls.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, *args, **kwargs):
        return original(self, widen(a), widen(b), *args, **kwargs)

    create_dot._fused_lora_bf16 = True
    builder_cls.create_dot = create_dot
