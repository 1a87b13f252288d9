"""The interpreter fixes in kernels/_interpreter.py: bf16 tl.dot and fp32 -> bf16 rounding match the GPU's."""
import pytest
import torch

from fused_lora.functional import interpreting
from numerics import assert_within_torch_error


@pytest.fixture(scope="module")
def kernels():
    assert interpreting(), "tests/conftest.py sets TRITON_INTERPRET=1"
    import triton
    import triton.language as tl

    from fused_lora.kernels._interpreter import install_bf16_fixes
    install_bf16_fixes()

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(y_ptr.dtype.element_ty))

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        a = tl.load(a_ptr + offs[:, None] * N + offs[None, :])
        b = tl.load(b_ptr + offs[:, None] * N + offs[None, :])
        tl.store(c_ptr + offs[:, None] * N + offs[None, :], tl.dot(a, b))

    return cast_kernel, dot_kernel


def test_fp32_to_bf16_rounds_to_nearest_even(kernels):
    cast_kernel, _ = kernels
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-42, 38, 4096)
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38])  # 3.4e38 rounds up to inf
    x[4:6] = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])  # ties: to even, down and up
    y = torch.empty(4096, dtype=torch.bfloat16)
    cast_kernel[(1,)](x, y, N=4096)
    expected = x.to(torch.bfloat16)  # torch rounds to nearest even, as cvt.rn.bf16.f32 does
    same_bits = y.view(torch.int16) == expected.view(torch.int16)
    assert bool((same_bits | (y.isnan() & expected.isnan())).all())


def test_bf16_dot(kernels):
    _, dot_kernel = kernels
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(32, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(32, 32)
    dot_kernel[(1,)](a, b, c, N=32)
    # bf16 products are exact in fp32 and in fp64: the errors are those of the fp32 sums.
    assert_within_torch_error("c", c, a.float() @ b.float(), a.double() @ b.double(), torch.float32)
