"""The same numerics on a CUDA device with the compiled kernels: `pytest -m gpu` on a GPU runner.

Skipped at run time (never at import) when there is no CUDA device or the interpreter is on.
"""
import os

import pytest
import torch

from numerics import compare_with_reference, lora_grads, make_inputs

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [
    ((0,), 77, 53, 8, 0.1, True),
    ((1,), 4096, 4096, 16, 0.0, True),
    ((3,), 77, 53, 7, 0.1, False),
    ((127,), 77, 53, 256, 0.1, False),
    ((4, 33), 48, 72, 1, 0.1, True),
    ((727,), 577, 859, 64, 0.1, True),
    ((2048,), 1024, 3072, 16, 0.1, False),
]


@pytest.fixture
def cuda():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: run `pytest -m gpu` to test the compiled kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"x{c[0]}-K{c[1]}-N{c[2]}-r{c[3]}-p{c[4]}")
def test_matches_reference_on_gpu(cuda, case, dtype):
    lead, K, N, r, p, bias = case
    inputs = make_inputs(lead, K, N, r, dtype, bias=bias, device=cuda)
    compare_with_reference(inputs, scaling=1.7, dropout_p=p, seed=2024, grad_weight=True)


def test_deterministic_grads_on_gpu(cuda):
    inputs = make_inputs((4096,), 1024, 1024, 16, torch.bfloat16, device=cuda)
    first, second = lora_grads(inputs, deterministic=True), lora_grads(inputs, deterministic=True)
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)
