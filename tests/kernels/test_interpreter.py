"""The interpreter fixes in kernels/_interpreter.py: bf16 tl.dot, fp32 -> bf16 rounding and the fp32 atomic exchange
match the GPU's."""
import pytest
import torch

from fused_lora.functional import interpreting
from numerics import assert_within_torch_error


@pytest.fixture(scope="module")
def kernels():
    assert interpreting(), "tests/conftest.py sets TRITON_INTERPRET=1"
    import triton
    import triton.language as tl

    from fused_lora.kernels._interpreter import install_fixes
    install_fixes()

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

    @triton.jit
    def xchg_kernel(x_ptr, old_ptr, n, N: tl.constexpr):
        offs = tl.arange(0, N)
        mask = offs < n
        tl.store(old_ptr + offs, tl.atomic_xchg(x_ptr + offs, tl.zeros((N,), tl.float32), mask=mask), mask=mask)

    return cast_kernel, dot_kernel, xchg_kernel


def test_fp32_to_bf16_rounds_to_nearest_even(kernels):
    cast_kernel, _, _ = kernels
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-42, 38, 4096)
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38])  # 3.4e38 rounds up to inf
    x[4:6] = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])  # ties: to even, down and up
    y = torch.empty(4096, dtype=torch.bfloat16)
    cast_kernel[(1,)](x, y, N=4096)
    expected = x.to(torch.bfloat16)  # torch rounds to nearest even, as cvt.rn.bf16.f32 does
    same_bits = y.view(torch.int16) == expected.view(torch.int16)
    assert bool((same_bits | (y.isnan() & expected.isnan())).all())


def test_bf16_dot(kernels):
    _, dot_kernel, _ = kernels
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(32, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(32, 32)
    dot_kernel[(1,)](a, b, c, N=32)
    # bf16 products are exact in fp32 and in fp64: the errors are those of the fp32 sums.
    assert_within_torch_error("c", c, a.float() @ b.float(), a.double() @ b.double(), torch.float32)


def test_fp32_atomic_exchange_returns_the_old_bits_and_leaves_zeros(kernels):
    """What _common._sum_of_parts reads its accumulator with: every old value back bit for bit (NaN, inf, -0.0
    too), zeros left behind, masked-off words untouched."""
    _, _, xchg_kernel = kernels
    x = torch.tensor([1.5, -2.0, float("nan"), float("inf"), -0.0, 3.0e-39, 7.0])
    before = x.clone()
    old = torch.full((7,), 5.0)
    xchg_kernel[(1,)](x, old, 6, N=8)
    assert torch.equal(old[:6].view(torch.int32), before[:6].view(torch.int32)) and old[6] == 5.0
    assert torch.equal(x[:6], torch.zeros(6)) and x[6] == 7.0
