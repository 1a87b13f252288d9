"""The dropout keep-mask: the numpy (CPU) and torch (other devices) versions agree bit for bit, and the
kernels draw the same mask."""
import pytest
import torch

from fused_lora import dropout
from fused_lora.kernels import launchers

SEEDS = [0, 31, 2**32 - 1, 2**32 + 5, 2**62 + 3, dropout.MAX_SEED]


def _torch_mask(seed, rows, cols, p):
    """The torch int64 path, which non-CPU devices take (run here on CPU tensors)."""
    col = torch.arange(cols, dtype=torch.int64)
    row = torch.arange(rows, dtype=torch.int64)
    word = dropout.philox_first_word(seed, col.expand(rows, cols), row[:, None].expand(rows, cols))
    return (word >> 8) >= dropout.drop_threshold(p)


@pytest.mark.parametrize("seed", SEEDS)
def test_numpy_and_torch_paths_agree(seed):
    # 70 x 1000: several numpy chunks of 65 rows, the last one partial.
    mask = dropout.dropout_keep_mask(seed, 70, 1000, 0.3)
    assert mask.dtype == torch.bool and mask.shape == (70, 1000)
    assert torch.equal(mask, _torch_mask(seed, 70, 1000, 0.3))
    assert abs(mask.float().mean().item() - 0.7) < 0.01


def test_meta_and_empty_masks():
    assert dropout.dropout_keep_mask(1, 8, 4, 0.5, device="meta").shape == (8, 4)
    assert dropout.dropout_keep_mask(1, 0, 4, 0.5).shape == (0, 4)
    assert dropout.dropout_keep_mask(1, 4, 0, 0.5).shape == (4, 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_kernel_draws_the_same_mask(seed):
    """S = dropout(ones) I = keep / (1 - p): the shrink kernel's mask read back exactly."""
    M, K, p = 45, 64, 0.25
    s = launchers.lora_shrink(torch.ones(M, K), torch.eye(K), dropout_p=p, seed=seed)
    expected = dropout.dropout_keep_mask(seed, M, K, p).float() / (1 - p)
    assert torch.equal(s, expected)
