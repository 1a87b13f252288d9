"""The embedding launchers (fused_lora.kernels.lora_embedding) against their formulas in fused_lora.reference:
plain torch at the same dtype and fp64; their plans; bit-identical dA from run to run."""
import pytest
import torch

from fused_lora import reference
from fused_lora.kernels import lora_embedding as le
from fused_lora.kernels import plans
from numerics import assert_within_torch_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(M, V, D, r, dtype, *, seed=0, ids_dtype=torch.int64, repeats=True):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, D, generator=g).to(dtype)
    A = torch.randn(r, V, generator=g).to(dtype)
    B = (torch.randn(D, r, generator=g) / r**0.5).to(dtype)
    ids = torch.randint(0, V, (M,), generator=g)
    if repeats and M >= 8:
        ids[: M // 3] = 5  # a run of one id longer than a dA block covers, and ids appearing once
    return ids.to(ids_dtype), E, A, B


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,r", [(1, 1), (5, 7), (70, 16), (131, 37), (20, 256)])
def test_fwd(dtype, M, r):
    ids, E, A, B = _inputs(M, 53, 150, r, dtype)  # D = 150: two D tiles and an edge tile
    y, s = le.lora_embedding_fwd(ids, E, A, B, 0.7)
    (y_low, s_low), (y_ref, s_ref) = (reference.lora_embedding_fwd(ids, E, A, B, 0.7, upcast=u) for u in (False, True))
    assert torch.equal(s, s_low)  # S is a gather: the same elements, exactly
    assert_within_torch_error("y", y, y_low, y_ref, dtype)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
def test_fwd_int32_and_int64_ids_agree(ids_dtype):
    ids, E, A, B = _inputs(40, 30, 20, 3, torch.float32, ids_dtype=ids_dtype)
    y, s = le.lora_embedding_fwd(ids, E, A, B, 1.5)
    y64, s64 = le.lora_embedding_fwd(ids.long(), E, A, B, 1.5)
    assert torch.equal(y, y64) and torch.equal(s, s64)  # same kernel arithmetic, only the ids' width differs


def test_fwd_masks_ids_outside_the_table():
    """The launcher itself never reads outside E or A: an out-of-range id gives a zero row (the op raises
    before it gets there, fused_lora._validation.check_ids_in_range)."""
    ids, E, A, B = _inputs(4, 10, 16, 2, torch.float32)
    ids = torch.tensor([1, -3, 10, 2**40])
    y, s = le.lora_embedding_fwd(ids, E, A, B, 1.0)
    assert torch.equal(y[1:], torch.zeros(3, 16)) and torch.equal(s[1:], torch.zeros(3, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 7, 64, 256])
@pytest.mark.parametrize("padding_idx,freq", [(-1, False), (5, False), (3, True)])
def test_da(dtype, r, padding_idx, freq):
    M, V = 150, 40
    ids, _, _, _ = _inputs(M, V, 8, r, dtype)
    ds = torch.randn(M, r, generator=torch.Generator().manual_seed(3)).to(dtype)
    da = le.lora_embedding_da(ids, ds, V, padding_idx=padding_idx, scale_grad_by_freq=freq)
    low, ref = (reference.lora_embedding_bwd_da(ids, ds, V, padding_idx=padding_idx, scale_grad_by_freq=freq,
                                                upcast=u) for u in (False, True))
    assert_within_torch_error("dA", da, low, ref, dtype)
    if padding_idx >= 0:
        assert torch.equal(da[:, padding_idx], torch.zeros(r, dtype=dtype))  # never written after the zeroing
    absent = torch.ones(V, dtype=torch.bool)
    absent[ids] = False
    assert torch.equal(da[:, absent], torch.zeros(r, int(absent.sum()), dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bwd_against_reference(dtype):
    M, V, D, r = 90, 33, 70, 5
    ids, E, A, B = _inputs(M, V, D, r, dtype)
    dy = torch.randn(M, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    _, s = le.lora_embedding_fwd(ids, E, A, B, 0.5)
    da, db = le.lora_embedding_bwd(dy, ids, B, s, 0.5, V, padding_idx=2)
    for u in (False, True):
        ds_u, db_u = reference.lora_bwd_dy(dy, B, s, 0.5, upcast=u)
        da_u = reference.lora_embedding_bwd_da(ids, ds_u, V, padding_idx=2, upcast=u)
        if u:
            da_ref, db_ref = da_u, db_u
        else:
            da_low, db_low = da_u, db_u
    assert_within_torch_error("dB", db, db_low, db_ref, dtype)
    assert_within_torch_error("dA", da, da_low, da_ref, dtype)


def test_da_bit_identical_twice_and_deterministic_mode():
    M, V, r = 300, 17, 9
    ids = torch.randint(0, V, (M,), generator=torch.Generator().manual_seed(5))
    ds = torch.randn(M, r, generator=torch.Generator().manual_seed(6))
    first = le.lora_embedding_da(ids, ds, V)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        second = le.lora_embedding_da(ids, ds, V)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second)  # each column summed by one program in sorted (stable) order: no atomics


def test_empty_sizes():
    ids, E, A, B = _inputs(0, 10, 16, 3, torch.float32)
    y, s = le.lora_embedding_fwd(ids, E, A, B, 1.0)
    assert y.shape == (0, 16) and s.shape == (0, 3)
    da, db = le.lora_embedding_bwd(torch.empty(0, 16), ids, B, s, 1.0, 10)
    assert torch.equal(da, torch.zeros(3, 10)) and torch.equal(db, torch.zeros(16, 3))


def test_plans():
    fwd, = le.plan_lora_embedding_fwd(4096, 128256, 4096, 16, torch.bfloat16)
    assert fwd.kernel == le.FWD_KERNEL and fwd.grid == (64, 32)
    # Bytes: ids, gathered E rows and A^T rows, B, y and S; the rest of the table is not read.
    assert fwd.hbm_bytes == 4096 * 8 + 2 * (2 * 4096 * 4096 + 2 * 4096 * 16 + 4096 * 16)
    bwd = le.plan_lora_embedding_bwd(4096, 128256, 4096, 16, torch.bfloat16, deterministic=True)
    kernels = [launch.kernel for launch in bwd]
    assert kernels == [k.kernel for k in plans.plan_lora_bwd_dy(4096, 4096, 16, torch.bfloat16, deterministic=True)] \
        + [le.SORT, le.SEARCHSORTED, plans.ZEROS, le.DA_KERNEL]
    assert le.plan_lora_embedding_fwd(0, 10, 16, 4, torch.float32) == []
    assert [launch.kernel for launch in le.plan_lora_embedding_da(0, 10, 4, torch.float32)] == [plans.ZEROS]
    assert le.modeled_launches(8, 10, 16, 4, torch.float32, "fwd") == le.plan_lora_embedding_fwd(8, 10, 16, 4,
                                                                                                 torch.float32)
    with pytest.raises(ValueError, match="direction"):
        le.modeled_launches(8, 10, 16, 4, torch.float32, "both")
