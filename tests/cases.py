"""The shapes the whole-op tests run: tests/ops/test_lora_linear.py on CPU, tests/test_gpu.py (with its
GPU-only large cases added) on a CUDA device."""
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading shape of x, K, N, r, dropout_p, bias): every rank in {1, 7, 8, 16, 64, 256}, M in
# {0, 1, 3, 127, 3-D}, K and N not multiples of 16 (and 0), both token regimes, fused and unfused shrink.
CASES = [
    ((0,), 77, 53, 8, 0.1, True),
    ((1,), 77, 53, 1, 0.0, True),
    ((3,), 77, 53, 7, 0.1, False),
    ((3,), 40, 24, 64, 0.1, True),
    ((127,), 77, 53, 16, 0.0, True),
    ((127,), 77, 53, 256, 0.1, False),
    ((4, 33), 48, 72, 8, 0.1, True),
    ((127,), 33, 129, 64, 0.0, False),
    ((5,), 0, 24, 4, 0.1, True),  # K = 0: y is the bias
    ((2, 3), 40, 0, 4, 0.1, True),  # N = 0
]


def case_id(case):
    lead, K, N, r, p, bias = case
    return f"x{lead}-K{K}-N{N}-r{r}-p{p}-bias{bias}"
