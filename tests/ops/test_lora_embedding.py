"""fused_lora.lora_embedding, the whole op: forward and every grad against the reference at the same dtype
and in fp64 (tests/numerics.py's rule), input handling, errors, determinism and torch.compile."""
import pytest
import torch

import fused_lora
from fused_lora import reference
from numerics import assert_within_torch_error, lora_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, V, D, r, dtype, *, seed=0, ids_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, shape, generator=g)
    ids.view(-1)[: ids.numel() // 2] = 1  # repeated ids
    E = torch.randn(V, D, generator=g).to(dtype)
    A = torch.randn(r, V, generator=g).to(dtype)
    B = (torch.randn(D, r, generator=g) / r**0.5).to(dtype)
    dy = torch.randn(*shape, D, generator=g).to(dtype)
    return ids.to(ids_dtype), E, A, B, dy


def _run(fn, ids, E, A, B, scaling, dy, *, grad_E=False, **kwargs):
    E, A, B = (t.detach().clone().requires_grad_(need) for t, need in ((E, grad_E), (A, True), (B, True)))
    y = fn(ids, E, A, B, scaling, **kwargs)
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "dA": A.grad, "dB": B.grad}
    if grad_E:
        out["dE"] = E.grad
    return out


def _compare(ids, E, A, B, scaling, dy, **kwargs):
    got = _run(fused_lora.lora_embedding, ids, E, A, B, scaling, dy, **kwargs)
    low = _run(reference.lora_embedding, ids, E, A, B, scaling, dy, **kwargs)
    ref = _run(reference.lora_embedding, ids, E.double(), A.double(), B.double(), scaling, dy.double(), **kwargs)
    for name in ref:
        assert_within_torch_error(name, got[name], low[name], ref[name], E.dtype)
    return got, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,r", [((2, 9), 1), ((37,), 7), ((3, 4, 5), 16), ((70,), 48)])
def test_matches_reference(dtype, shape, r):
    _compare(*_inputs(shape, 29, 40, r, dtype)[:4], 1.25, _inputs(shape, 29, 40, r, dtype)[4], grad_E=True)


@pytest.mark.parametrize("padding_idx", [0, 5, -2])
@pytest.mark.parametrize("freq", [False, True])
def test_padding_idx_and_scale_grad_by_freq(padding_idx, freq):
    V = 12
    ids, E, A, B, dy = _inputs((6, 7), V, 24, 3, torch.float32)
    ids[0] = padding_idx % V
    got, _ = _compare(ids, E, A, B, 0.5, dy, grad_E=True, padding_idx=padding_idx, scale_grad_by_freq=freq)
    column = padding_idx % V
    # padding_idx's row of E and column of A get no gradient: never written after zeroing.
    assert torch.equal(got["dA"][:, column], torch.zeros(3)) and torch.equal(got["dE"][column], torch.zeros(24))


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
def test_int32_and_int64_ids(ids_dtype):
    ids, E, A, B, dy = _inputs((4, 6), 20, 16, 4, torch.float32, ids_dtype=ids_dtype)
    got, _ = _compare(ids, E, A, B, 2.0, dy)
    other = _run(fused_lora.lora_embedding, ids.long() if ids_dtype == torch.int32 else ids.int(), E, A, B, 2.0, dy)
    for name in got:
        assert torch.equal(got[name], other[name])  # same kernels on the same values


def test_torch_backend_matches_reference():
    ids, E, A, B, dy = _inputs((5, 7), 23, 18, 6, torch.float32)
    with lora_backend("torch"):
        got = _run(fused_lora.lora_embedding, ids, E, A, B, 0.3, dy, grad_E=True, padding_idx=1)
    low = _run(reference.lora_embedding, ids, E, A, B, 0.3, dy, grad_E=True, padding_idx=1)
    ref = _run(reference.lora_embedding, ids, E.double(), A.double(), B.double(), 0.3, dy.double(), grad_E=True,
               padding_idx=1)
    for name in ref:
        assert_within_torch_error(name, got[name], low[name], ref[name], torch.float32)


def test_float64_on_torch_backend_and_refused_on_kernels():
    ids, E, A, B, dy = _inputs((9,), 11, 8, 2, torch.float64)
    with lora_backend("torch"):
        got = _run(fused_lora.lora_embedding, ids, E, A, B, 1.0, dy)
    ref = _run(reference.lora_embedding, ids, E, A, B, 1.0, dy)
    for name in ref:
        assert_within_torch_error(name, got[name], ref[name], ref[name], torch.float64)
    with lora_backend("triton"), pytest.raises(TypeError, match="float64 runs with FUSED_LORA_BACKEND=torch"):
        fused_lora.lora_embedding(ids, E, A, B, 1.0)


def test_empty_input():
    ids, E, A, B, _ = _inputs((0, 3), 10, 8, 2, torch.float32)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = fused_lora.lora_embedding(ids, E, A, B, 1.0)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))


@pytest.mark.parametrize("bad", [-1, 10, 2**31])
def test_out_of_range_ids_raise(bad):
    ids, E, A, B, _ = _inputs((4,), 10, 8, 2, torch.float32)
    ids[2] = bad
    with pytest.raises(IndexError, match=rf"ids contains {bad}, out of range .* num_embeddings=10"):
        fused_lora.lora_embedding(ids, E, A, B, 1.0)
    with lora_backend("torch"), pytest.raises(IndexError, match="out of range"):
        fused_lora.lora_embedding(ids, E, A, B, 1.0)


def test_deterministic_mode_bit_identical_twice():
    ids, E, A, B, dy = _inputs((300,), 40, 24, 5, torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (_run(fused_lora.lora_embedding, ids, E, A, B, 1.0, dy) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(previous)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("args,error,match", [
    (dict(ids=torch.zeros(3)), TypeError, "ids has dtype torch.float32; expected torch.int64 or torch.int32"),
    (dict(weight=torch.randn(10)), ValueError, r"weight must be 2-D \(num_embeddings, embedding_dim\)"),
    (dict(lora_A=torch.randn(2, 9)), ValueError, r"lora_A \(lora_embedding_A\) must have shape \(r, 10\)"),
    (dict(lora_B=torch.randn(2, 8)), ValueError, r"lora_B \(lora_embedding_B\) must have shape \(8, 2\)"),
    (dict(lora_A=torch.randn(2, 10).half()), TypeError, "lora_A has dtype torch.float16 but weight has dtype"),
    (dict(lora_A=torch.randn(257, 10), lora_B=torch.randn(8, 257)), ValueError, "1 <= r <= 256"),
    (dict(scaling=float("inf")), TypeError, "scaling must be a finite Python float"),
    (dict(padding_idx=10), ValueError, r"padding_idx must be None or an int in \[-10, 10\)"),
])
def test_errors_name_the_argument(args, error, match):
    kwargs = dict(ids=torch.tensor([1, 2]), weight=torch.randn(10, 8), lora_A=torch.randn(2, 10),
                  lora_B=torch.randn(8, 2), scaling=1.0)
    padding_idx = args.pop("padding_idx", None)
    kwargs.update(args)
    with pytest.raises(error, match=match):
        fused_lora.lora_embedding(*kwargs.values(), padding_idx=padding_idx)


def test_compile_fullgraph_matches_eager():
    ids, E, A, B, dy = _inputs((2, 6), 20, 16, 4, torch.float32)
    eager = _run(fused_lora.lora_embedding, ids, E, A, B, 0.5, dy, padding_idx=1)
    torch._dynamo.reset()
    compiled = torch.compile(fused_lora.lora_embedding, fullgraph=True)
    got = _run(compiled, ids, E, A, B, 0.5, dy, padding_idx=1)
    for name in eager:
        assert torch.equal(got[name], eager[name]), name  # the custom ops run the same kernels as eager
    ids[0, 0] = 20
    with pytest.raises(IndexError, match="out of range"):  # the check runs inside the op, compiled too
        compiled(ids, E, A, B, 0.5, padding_idx=1)


def test_custom_ops_pass_opcheck():
    ids, E, A, B, dy = _inputs((7,), 13, 16, 3, torch.float32)
    from fused_lora.ops import embedding as op
    torch.library.opcheck(op.lora_embedding_fwd, (ids, E, A.requires_grad_(), B.requires_grad_(), 0.5, -1, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    _, s = op.lora_embedding_fwd(ids, E, A, B, 0.5, -1, False)
    torch.library.opcheck(op.lora_embedding_bwd, (torch.randn(7, 16), ids, B.detach(), s, 0.5, 13, -1, False,
                                                   True, True, True),
                          test_utils=("test_schema", "test_faketensor"))
