"""DoRA: fused_lora.dora_linear (forward and every grad, the magnitude's included) and dora_weight_norm against
the pure-torch reference (PEFT's DoraLinearLayer math) at the same dtype and in fp64."""
import pytest
import torch

import fused_lora
from fused_lora import reference
from cases import CASES, DTYPES, case_id
from numerics import assert_within_torch_error, lora_backend, make_inputs


def _magnitude(N, dtype, seed=1, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    m = (0.5 + torch.rand(N, generator=g)).to(dtype)
    m[list(zero_rows)] = 0.0
    return m


def _run(fn, inputs, m, scaling, dy, *, dropout_p, seed, grad_weight=False):
    x, w, b, a, bb = (None if t is None else t.detach().clone() for t in inputs)
    m = m.detach().clone().requires_grad_(True)
    leaves = {"dx": x, "dA": a, "dB": bb, "dm": m}
    if grad_weight:
        leaves["dW"] = w
        if b is not None:
            leaves["db"] = b
    for t in leaves.values():
        t.requires_grad_(True)
    y = fn(x, w, b, a, bb, scaling, m, dropout_p=dropout_p, training=True, seed=seed)
    y.backward(dy.to(y.dtype))
    return {"y": y.detach(), **{name: t.grad for name, t in leaves.items()}}


def compare_dora(inputs, m, scaling, *, dropout_p=0.0, seed=5, grad_weight=False, fn=None):
    """fn (default fused_lora.dora_linear) against reference.dora_linear at the inputs' dtype and in fp64."""
    fn = fn or fused_lora.dora_linear
    x, w = inputs[0], inputs[1]
    dtype = x.dtype
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=torch.Generator().manual_seed(123))
    kw = dict(dropout_p=dropout_p, seed=seed, grad_weight=grad_weight)
    got = _run(fn, inputs, m, scaling, dy, **kw)
    low = _run(reference.dora_linear, inputs, m, scaling, dy, **kw)
    ref = _run(reference.dora_linear, [None if t is None else t.double() for t in inputs], m.double(), scaling,
               dy.double(), **kw)
    for name in ref:
        want = m.dtype if name == "dm" else dtype
        assert_within_torch_error(name, got[name], low[name], ref[name], want)
    return got, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    lead, K, N, r, p, bias = case
    inputs = make_inputs(lead, K, N, r, dtype, bias=bias)
    compare_dora(inputs, _magnitude(N, dtype), 1.7, dropout_p=p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_zero_norm_rows_and_zero_magnitudes(dtype, p):
    # Row 3 of W and B is 0 (n = 0, m = 0, as PEFT initialises a pruned row); row 8 has m = 0 but n > 0 (y = b
    # there holds no trace of z: dm needs the recompute); row 11 has n = 0 and m > 0.
    x, w, b, a, bb = make_inputs((70,), 45, 37, 5, dtype)
    for row in (3, 11):
        w[row] = 0.0
        bb[row] = 0.0
    m = _magnitude(37, torch.float32, zero_rows=(3, 8))
    got, ref = compare_dora((x, w, b, a, bb), m, 0.8, dropout_p=p)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert got["dm"][8] != 0 and got["dm"][3] == 0 and got["dm"][11] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_weight_and_bias_grads(dtype, p):
    inputs = make_inputs((37,), 45, 70, 12, dtype)
    compare_dora(inputs, _magnitude(70, dtype), 0.5, dropout_p=p, grad_weight=True)


@pytest.mark.parametrize("r", [1, 3, 16, 100, 256])
def test_ranks(r):
    inputs = make_inputs((33,), 40, 50, r, torch.bfloat16)
    compare_dora(inputs, _magnitude(50, torch.float32), 2.0)


@pytest.mark.slow
def test_odd_large_shape_bf16():
    inputs = make_inputs((300,), 333, 259, 16, torch.bfloat16)
    compare_dora(inputs, _magnitude(259, torch.bfloat16), 2.0)


@pytest.mark.parametrize("backend", ["torch", "cpp", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_forced_backends_match_reference(backend, dtype, p, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    if backend == "cpp":
        from fused_lora.ops import cpp_backend
        if not cpp_backend.available():
            pytest.skip("the C++ CPU backend cannot be built here")
    inputs = make_inputs((2, 19), 37, 29, 7, dtype)
    compare_dora(inputs, _magnitude(29, dtype, zero_rows=(4,)), 1.3, dropout_p=p, grad_weight=True)


def _long_double_dora(inputs, m, scaling, dy, p, seed):
    """The DoRA layer and its grads in numpy's long double (more precise than float64 on x86-64), for the
    float64 path, whose plain-torch baseline would be the fp64 reference itself."""
    import numpy as np
    from fused_lora.dropout import dropout_keep_mask, keep_scale

    ld = lambda t: t.detach().numpy().astype(np.longdouble)
    x, w, b, a, bb = (ld(t) for t in inputs)
    m, dy = ld(m), ld(dy)
    keep = ld(dropout_keep_mask(seed, *x.shape, p).double()) * keep_scale(p) if p > 0 else np.ones_like(x)
    xd = x * keep
    n = np.sqrt(((w + scaling * bb @ a) ** 2).sum(1))
    g = np.where(n > 0, m / np.where(n > 0, n, 1), 0)
    s = xd @ a.T
    z = xd @ w.T + scaling * s @ bb.T
    y = x @ w.T + b + (g - 1) * (xd @ w.T) + g * scaling * (s @ bb.T)
    dz, dy1 = dy * g, dy * (g - 1)
    ds = scaling * dz @ bb
    out = {"y": y, "dx": dy @ w + keep * (dy1 @ w + ds @ a), "dA": ds.T @ xd, "dB": scaling * dz.T @ s,
           "dm": np.where(n > 0, (dy * z).sum(0) / np.where(n > 0, n, 1), 0), "dW": dy.T @ x + dy1.T @ xd,
           "db": dy.sum(0)}
    return {k: torch.from_numpy(v.astype(np.float64)) for k, v in out.items()}


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_float64_torch_path(p):
    inputs = make_inputs((13,), 21, 17, 3, torch.float64)
    m = _magnitude(17, torch.float64, zero_rows=(2,))
    dy = torch.randn(13, 17, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    with lora_backend("torch"):
        got = _run(fused_lora.dora_linear, inputs, m, 0.9, dy, dropout_p=p, seed=5, grad_weight=True)
    low = _run(reference.dora_linear, inputs, m, 0.9, dy, dropout_p=p, seed=5, grad_weight=True)
    ref = _long_double_dora(inputs, m, 0.9, dy, p, 5)
    for name in ref:
        assert_within_torch_error(name, got[name], low[name], ref[name], torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 7, 64, 256])
def test_weight_norm(dtype, r):
    _, w, _, a, bb = make_inputs((1,), 83, 150, r, dtype)
    n = fused_lora.dora_weight_norm(w, a, bb, 1.3)
    assert n.dtype == torch.float32 and not n.requires_grad
    assert_within_torch_error("n", n.to(dtype), reference.dora_weight_norm(w, a, bb, 1.3),
                              reference.dora_weight_norm(w, a, bb, 1.3, upcast=True), dtype)
    with lora_backend("torch"):
        n_torch = fused_lora.dora_weight_norm(w, a, bb, 1.3)
    assert_within_torch_error("n (torch path)", n_torch.to(dtype), reference.dora_weight_norm(w, a, bb, 1.3),
                              reference.dora_weight_norm(w, a, bb, 1.3, upcast=True), dtype)


def test_cached_norm_is_used():
    x, w, b, a, bb = make_inputs((9,), 20, 30, 4, torch.float32)
    m = _magnitude(30, torch.float32)
    n = fused_lora.dora_weight_norm(w, a, bb, 1.0)
    assert torch.equal(fused_lora.dora_linear(x, w, b, a, bb, 1.0, m, weight_norm=n),
                       fused_lora.dora_linear(x, w, b, a, bb, 1.0, m))
    doubled = fused_lora.dora_linear(x, w, b, a, bb, 1.0, m, weight_norm=n / 2)
    assert not torch.equal(doubled, fused_lora.dora_linear(x, w, b, a, bb, 1.0, m))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_deterministic_mode_is_bitwise_reproducible(p):
    inputs = make_inputs((150,), 40, 70, 8, torch.float32)
    m = _magnitude(70, torch.float32)
    dy = torch.randn(150, 70, generator=torch.Generator().manual_seed(3))
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(fused_lora.dora_linear, inputs, m, 1.1, dy, dropout_p=p, seed=9) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_nan_and_inf_propagate_as_in_the_reference(p):
    x, w, b, a, bb = make_inputs((20,), 30, 40, 4, torch.float32)
    x[3, 5] = float("inf")
    x[7, 2] = float("nan")
    m = _magnitude(40, torch.float32)
    y = fused_lora.dora_linear(x, w, b, a, bb, 1.0, m, dropout_p=p, training=True, seed=4)
    y_ref = reference.dora_linear(x, w, b, a, bb, 1.0, m, dropout_p=p, training=True, seed=4)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))


def test_eval_ignores_dropout():
    x, w, b, a, bb = make_inputs((20,), 30, 40, 4, torch.float32)
    m = _magnitude(40, torch.float32)
    assert torch.equal(fused_lora.dora_linear(x, w, b, a, bb, 2.0, m, dropout_p=0.5, training=False),
                       fused_lora.dora_linear(x, w, b, a, bb, 2.0, m))


@pytest.mark.parametrize("bad,match", [
    (lambda m, n: (m[:-1], None), r"magnitude must have shape \(30,\)"),
    (lambda m, n: (m.long(), None), "magnitude must be a floating-point tensor"),
    (lambda m, n: (m, n.double()), r"weight_norm must be a float32 tensor of shape \(30,\)"),
    (lambda m, n: (m, n[:3]), r"weight_norm must be a float32 tensor of shape \(30,\)"),
    (lambda m, n: ("m", None), "magnitude must be a torch.Tensor"),
])
def test_bad_dora_inputs(bad, match):
    x, w, b, a, bb = make_inputs((9,), 20, 30, 4, torch.float32)
    m, n = bad(_magnitude(30, torch.float32), fused_lora.dora_weight_norm(w, a, bb, 1.0))
    with pytest.raises((ValueError, TypeError), match=match):
        fused_lora.dora_linear(x, w, b, a, bb, 1.0, m, weight_norm=n)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_autocast_computes_in_the_autocast_dtype(p):
    """Under torch.autocast the op runs on inputs cast to the autocast dtype (m keeps its own); grads come
    back to each tensor in its own dtype."""
    x, w, b, a, bb = make_inputs((6,), 24, 20, 4, torch.float32)
    m = _magnitude(20, torch.float32)
    got = _run(lambda *t, **kw: _autocast_dora(*t, **kw), (x, w, b, a, bb), m, 1.2, torch.ones(6, 20), dropout_p=p,
               seed=3)
    cast = lambda t: t.to(torch.bfloat16)
    want = fused_lora.dora_linear(cast(x), cast(w), cast(b), cast(a), cast(bb), 1.2, m, dropout_p=p, training=True,
                                  seed=3)
    assert got["y"].dtype == torch.bfloat16 and torch.equal(got["y"], want)
    assert all(got[k].dtype == torch.float32 for k in ("dx", "dA", "dB", "dm"))


def _autocast_dora(*args, **kwargs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fused_lora.dora_linear(*args, **kwargs)
