"""The C++ CPU backend (csrc/cpu, fused_lora.ops.cpp_backend): the numerics rule of tests/numerics.py against
fused_lora.reference for every dtype, odd shapes, ranks 1-256, dropout, strided / expanded bias, strided x,
empty sizes; NaN / inf as the torch path; the keep-mask bit for bit; determinism; opcheck of the ops with
the C++ kernel in the CPU slot; the need_* flags. Skipped when the extension cannot be built here.
"""
import contextlib
import itertools
import re
import warnings

import numpy as np
import pytest
import torch

import fused_lora
from fused_lora import reference
from fused_lora.dropout import dropout_keep_mask, seed_value
from fused_lora.ops import cpp_backend as cpp
from fused_lora.ops import torch_backend
from numerics import assert_within_torch_error, compare_with_reference, make_inputs

if not cpp.available():
    pytest.skip("the C++ CPU backend could not be built here (see the RuntimeWarning for the reason)",
                allow_module_level=True)

ext = cpp.load()
# load() takes the ops' CPU slot unless TRITON_INTERPRET=1; this module holds it only while its tests run
# (fixture below): in the same pytest process the other modules' CPU op calls expect the Python-selected path.
cpp.cpu_kernels_registered(False)


@pytest.fixture(scope="module", autouse=True)
def _cpp_cpu_kernels():
    cpp.cpu_kernels_registered(True)
    yield
    cpp.cpu_kernels_registered(False)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (block rows, parallel mode, 16-bit mode) for ext._set_tuning: the automatic choice, and 8-row blocks run
# in parallel and in turn, so that a few dozen rows cover several blocks and the per-thread partials of
# dA / dB; 16-bit dtypes also with their GEMMs in the dtype itself (the path of CPUs with bf16 units).
TUNINGS = {"auto": (0, -1, -1), "blocks8-parallel": (8, 1, -1), "blocks8-serial": (8, 0, -1),
           "half-native": (8, 1, 0)}


@contextlib.contextmanager
def tuning(name):
    ext._set_tuning(*TUNINGS[name])
    try:
        yield
    finally:
        ext._set_tuning(*TUNINGS["auto"])


def _grads_dy(M, N, dtype, seed=123):
    return torch.randn(M, N, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_direct(x, w, b, a, bb, scaling, p, seed, dy=None, names=("y", "S", "dx", "dA", "dB")):
    """C++ forward / backward on 2-D tensors as given against the reference's formulas at the same dtype
    (the baseline) and in fp64; returns ours as a dict."""
    dtype = x.dtype
    dy = _grads_dy(x.shape[0], w.shape[0], dtype) if dy is None else dy
    y, s = cpp.forward(x, w, b, a, bb, scaling, p, seed)
    dx, dA, dB = cpp.backward(dy, x, w, a, bb, s, scaling, p, seed, True, True, True)
    got = {"y": y, "S": s, "dx": dx, "dA": dA.to(a.dtype), "dB": dB.to(bb.dtype)}

    def formulas(upcast):
        y_r, s_r = reference.lora_fwd(x, w, b, a, bb, scaling, dropout_p=p, seed=seed, upcast=upcast)
        ds_r, dB_r = reference.lora_bwd_dy(dy, bb, s_r, scaling, upcast=upcast)
        dx_r = reference.lora_bwd_dx(dy, w, ds_r, a, dropout_p=p, seed=seed, upcast=upcast)
        dA_r = reference.lora_bwd_da(ds_r, x, dropout_p=p, seed=seed, upcast=upcast)
        return {"y": y_r, "S": s_r, "dx": dx_r, "dA": dA_r, "dB": dB_r}

    low = formulas(False)
    # In fp64 the reference's fp64 formulas are the baseline itself (zero error, so the rule would ask for
    # torch's exact summation order): fp64 results are measured against the same formulas in numpy's
    # 80-bit long double instead, which rounds 2**-11 as much as fp64.
    ref = formulas(True) if dtype != torch.float64 else _long_double_formulas(x, w, b, a, bb, dy, scaling, p, seed)
    for name in names:
        assert_within_torch_error(name, got[name], low[name], ref[name], dtype)
    return got


def _long_double_formulas(x, w, b, a, bb, dy, scaling, p, seed):
    assert np.finfo(np.longdouble).nmant >= 63, "needs x86's 80-bit long double"
    ld = lambda t: t.detach().cpu().numpy().astype(np.longdouble)
    x_, w_, a_, bb_, dy_ = (ld(t) for t in (x, w, a, bb, dy))
    keep = (ld(dropout_keep_mask(seed, x.shape[0], x.shape[1], p).double()) / (np.longdouble(1) - np.longdouble(p))
            if p > 0 else np.ones_like(x_))
    xd = x_ * keep
    s_ = xd @ a_.T
    y_ = x_ @ w_.T + (ld(b) if b is not None else 0) + np.longdouble(scaling) * (s_ @ bb_.T)
    ds_ = np.longdouble(scaling) * (dy_ @ bb_)
    out = {"y": y_, "S": s_, "dx": dy_ @ w_ + (ds_ @ a_) * keep, "dA": ds_.T @ xd,
           "dB": np.longdouble(scaling) * (dy_.T @ s_)}
    return {name: torch.from_numpy(v.astype(np.float64)) for name, v in out.items()}


class CppLoRA(torch.autograd.Function):
    """The C++ forward / backward as an autograd Function over x flattened to 2-D (W and b grads by torch)."""

    @staticmethod
    def forward(ctx, x, w, b, a, bb, scaling, p, seed):
        x2 = x.reshape(-1, x.shape[-1])
        y, s = cpp.forward(x2, w, b, a, bb, scaling, p, seed)
        ctx.save_for_backward(x2, w, a, bb, s)
        ctx.scaling, ctx.p, ctx.seed, ctx.lead, ctx.has_bias = scaling, p, seed, x.shape[:-1], b is not None
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w, a, bb, s = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        need = ctx.needs_input_grad
        dx, dA, dB = cpp.backward(dy2, x2, w, a, bb, s, ctx.scaling, ctx.p, ctx.seed, need[0], need[3], need[4])
        dW = dy2.t() @ x2 if need[1] else None
        db = dy2.sum(0) if need[2] and ctx.has_bias else None
        dx = dx.reshape(*ctx.lead, x2.shape[1]) if dx is not None else None
        return dx, dW, db, dA, dB, None, None, None


def cpp_lora_linear(x, w, b, a, bb, scaling, *, dropout_p=0.0, training=True, seed=None):
    p = dropout_p if training else 0.0
    return CppLoRA.apply(x, w, b, a, bb, scaling, p, torch.tensor(seed_value(seed), dtype=torch.int64)
                         if not isinstance(seed, torch.Tensor) else seed)


# ---- the keep-mask ------------------------------------------------------------------------------

SEEDS = [0, 1, 2024, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1, -5]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rows,cols,p", [(37, 29, 0.3), (3, 200, 0.1), (130, 7, 0.5), (2, 65, 0.9)])
@pytest.mark.parametrize("portable", [False, True], ids=["dispatched", "portable"])
def test_keep_mask_bit_identical(seed, rows, cols, p, portable):
    # -5 as the int64 a seed tensor holds: both read its 64 bits (2**64 - 5).
    expected = dropout_keep_mask(seed & (2**64 - 1), rows, cols, p)
    assert torch.equal(ext.keep_mask(seed, rows, cols, p, portable), expected)


@pytest.mark.parametrize("seed", [2**40 + 3, -5, 7])
@pytest.mark.parametrize("tune", ["auto", "blocks8-parallel"])
def test_kernels_apply_the_mask_bit_for_bit(seed, tune):
    """x = 1, A = I, W = 0, B = I, dY = 1, s = 1: S = keep / (1 - p) and dX = keep / (1 - p) exactly (every
    product is by 1 or 0), so the forward and backward masks show bit for bit."""
    M, K, p = 45, 96, 0.3
    seed_t = torch.tensor(seed, dtype=torch.int64)
    x, a, w = torch.ones(M, K), torch.eye(K), torch.zeros(K, K)
    with tuning(tune):
        _, s = cpp.forward(x, w, None, a, torch.eye(K), 1.0, p, seed_t)
        dx, _, _ = cpp.backward(torch.ones(M, K), x, w, a, torch.eye(K), s, 1.0, p, seed_t, True, False, False)
    expected = dropout_keep_mask(seed_t, M, K, p).float() * torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(s, expected) and torch.equal(dx, expected)


# ---- numerics -----------------------------------------------------------------------------------

SHAPES = [  # M, K, N, r
    (37, 29, 43, 7),
    (5, 64, 33, 1),
    (70, 48, 40, 16),
    (19, 300, 21, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("tune", ["auto", "blocks8-parallel", "blocks8-serial", "half-native"])
def test_matches_reference(dtype, shape, p, tune):
    if tune == "half-native" and dtype not in (torch.bfloat16, torch.float16):
        pytest.skip("16-bit dtypes only")
    M, K, N, r = shape
    x, w, b, a, bb = make_inputs((M,), K, N, r, dtype, bias=(r != 1))
    with tuning(tune):
        check_direct(x, w, b, a, bb, 1.7, p, torch.tensor(2024))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_whole_op_3d_x_through_autograd(dtype):
    """The rule on y and every grad (W and b too) of the layer, with 3-D x flattened to 2-D rows."""
    inputs = make_inputs((2, 19), 37, 29, 7, dtype)
    compare_with_reference(inputs, scaling=1.3, dropout_p=0.25, seed=99, grad_weight=True, fn=cpp_lora_linear)


@pytest.mark.parametrize("view", ["strided", "expanded", "none"])
@pytest.mark.parametrize("M", [3, 100])
def test_bias_views(view, M):
    x, w, _, a, bb = make_inputs((M,), 40, 37, 5, torch.float32, bias=False)
    if view == "strided":
        bias = torch.randn(37, 2, generator=torch.Generator().manual_seed(1))[:, 1]  # a column of a matrix
    elif view == "expanded":
        bias = torch.tensor(5.0).expand(37)  # one element of storage, stride 0
    else:
        bias = None
    assert bias is None or not bias.is_contiguous()
    check_direct(x, w, bias, a, bb, 1.3, 0.2, torch.tensor(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["every-other-column", "transposed", "row-gaps"])
def test_non_contiguous_x(dtype, layout):
    g = torch.Generator().manual_seed(3)
    M, K, N, r = 41, 30, 26, 6
    if layout == "every-other-column":
        x = torch.randn(M, 2 * K, generator=g).to(dtype)[:, ::2]
    elif layout == "transposed":
        x = torch.randn(K, M, generator=g).to(dtype).t()
    else:
        x = torch.randn(M, K + 5, generator=g).to(dtype)[:, :K]
    assert not x.is_contiguous() and x.shape == (M, K)
    _, w, b, a, bb = make_inputs((M,), K, N, r, dtype)
    with tuning("blocks8-parallel"):
        check_direct(x, w, b, a, bb, 0.9, 0.3, torch.tensor(8))
    check_direct(x, w, b, a, bb, 0.9, 0.3, torch.tensor(8))


def test_expanded_dy():
    """dY of sum().backward() is an expanded scalar (strides 0)."""
    x, w, b, a, bb = make_inputs((23,), 17, 11, 4, torch.float32)
    dy = torch.tensor(1.0).expand(23, 11)
    check_direct(x, w, b, a, bb, 1.1, 0.3, torch.tensor(9), dy=dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,N", [(0, 12, 9), (7, 12, 0), (7, 0, 9), (0, 0, 0)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_empty_sizes(dtype, M, K, N, p):
    x, w, b, a, bb = make_inputs((M,), K, N, 3, dtype)
    got = check_direct(x, w, b, a, bb, 1.5, p, torch.tensor(5))
    assert [tuple(got[n].shape) for n in ("y", "S", "dx", "dA", "dB")] == [(M, N), (M, 3), (M, K), (3, K), (N, 3)]


# ---- inf / NaN: the same pattern as the torch path ------------------------------------------------

def _both_paths(x, w, b, a, bb, scaling, p, seed):
    dy = _grads_dy(x.shape[0], w.shape[0], x.dtype, seed=5)
    out = []
    for module in (cpp, torch_backend):
        y, s = module.forward(x, w, b, a, bb, scaling, p, seed)
        dx, dA, dB = module.backward(dy, x, w, a, bb, s, scaling, p, seed, True, True, True)
        out.append({"y": y, "S": s, "dx": dx, "dA": dA, "dB": dB})
    return out


def assert_same_nonfinite(got, torch_path):
    for name in got:
        g, t = got[name].double(), torch_path[name].double()
        for kind, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            assert torch.equal(f(g), f(t)), f"{name}: {kind} at {int(f(g).sum())} elements, torch {int(f(t).sum())}"


def _dropped_position(seed, M, K, p):
    rows, cols = torch.nonzero(~dropout_keep_mask(seed, M, K, p), as_tuple=True)
    return int(rows[0]), int(cols[0])


@pytest.mark.parametrize("M", [3, 100])
@pytest.mark.parametrize("tune", ["auto", "blocks8-parallel"])
@pytest.mark.parametrize("case", ["inf-in-x", "nan-in-x-dropped", "inf-in-x-dropped", "inf-in-B-dropout",
                                  "nan-in-A-scaling-0", "inf-in-B-scaling-0"])
def test_nonfinite_like_the_torch_path(M, tune, case):
    x, w, b, a, bb = make_inputs((M,), 40, 37, 5, torch.float32)
    seed, p, scaling = 17, 0.0, 1.3
    if case == "inf-in-x":
        x[1, 7] = float("inf")
        a[:, 7] = a[:, 7].abs() + 0.1
        bb = bb.abs()
    elif case in ("nan-in-x-dropped", "inf-in-x-dropped"):
        p = 0.3
        m, k = _dropped_position(seed, M, 40, p)
        x[m, k] = float("nan" if case.startswith("nan") else "inf")
    elif case == "inf-in-B-dropout":
        p = 0.3
        bb[3, 2] = float("inf")
    elif case == "nan-in-A-scaling-0":
        a[2, 4], scaling = float("nan"), 0.0
    else:
        bb[3, 2], scaling = float("inf"), 0.0
    seed_t = torch.tensor(seed)
    with tuning(tune):
        got, torch_path = _both_paths(x, w, b, a, bb, scaling, p, seed_t)
    assert_same_nonfinite(got, torch_path)
    assert any(not torch.isfinite(t).all() for t in got.values())
    # The finite rest: within the rule against the fp64 reference, the torch path being the baseline.
    ref = _both_paths(*(None if t is None else t.double() for t in (x, w, b, a, bb)), scaling, p, seed_t)[1]
    for name in got:
        finite = torch.isfinite(ref[name]) & torch.isfinite(got[name].double())
        assert_within_torch_error(name, got[name][finite], torch_path[name][finite], ref[name][finite],
                                  torch.float32)


# ---- determinism and flags ----------------------------------------------------------------------

@pytest.mark.parametrize("tune", ["auto", "blocks8-parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(tune, dtype):
    x, w, b, a, bb = make_inputs((150,), 70, 50, 8, dtype)
    dy = _grads_dy(150, 50, dtype)
    seed = torch.tensor(31)
    runs = []
    with tuning(tune):
        for _ in range(2):
            y, s = cpp.forward(x, w, b, a, bb, 1.2, 0.1, seed)
            runs.append((y, s, *cpp.backward(dy, x, w, a, bb, s, 1.2, 0.1, seed, True, True, True)))
    for first, second in zip(*runs):  # the same kernels on the same inputs and thread count: bit-identical
        assert torch.equal(first, second)


@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=3)])
def test_need_flags(needs):
    x, w, b, a, bb = make_inputs((29,), 33, 21, 4, torch.float32)
    dy = _grads_dy(29, 21, torch.float32)
    seed = torch.tensor(3)
    _, s = cpp.forward(x, w, b, a, bb, 0.8, 0.2, seed)
    full = cpp.backward(dy, x, w, a, bb, s, 0.8, 0.2, seed, True, True, True)
    got = cpp.backward(dy, x, w, a, bb, s, 0.8, 0.2, seed, *needs)
    for need, g, f in zip(needs, got, full):
        if need:  # each grad is computed by the same ops whichever others are needed: bit-identical
            assert torch.equal(g, f)
        else:
            assert g is None
    op = torch.ops.fused_lora.lora_linear_bwd(dy, x, w, a, bb, s, 0.8, 0.2, seed, *needs)
    for need, g, f, like in zip(needs, op, full, (x, a, bb)):
        if need:
            assert torch.equal(g, f) and g.dtype == like.dtype
        else:
            assert g.shape == (0,) and g.dtype == x.dtype


# ---- the dispatcher -----------------------------------------------------------------------------

fwd_op = torch.ops.fused_lora.lora_linear_fwd.default
bwd_op = torch.ops.fused_lora.lora_linear_bwd.default


def _cpu_slot(name):
    return [line for line in torch._C._dispatch_dump(name).splitlines() if line.startswith("CPU:")]


def test_cpu_kernel_is_the_cpp_one():
    for name in ("fused_lora::lora_linear_fwd", "fused_lora::lora_linear_bwd"):
        cpu = _cpu_slot(name)
        assert cpu and "lora_linear.cpp" in cpu[0], cpu


def test_cpu_slot_handed_back_and_taken_again():
    try:
        assert ext.deregister_cpu_kernels() is True
        assert not any("lora_linear.cpp" in line for line in _cpu_slot("fused_lora::lora_linear_fwd"))
    finally:
        assert ext.register_cpu_kernels() is True
    assert ext.register_cpu_kernels() is False  # already there
    assert "lora_linear.cpp" in _cpu_slot("fused_lora::lora_linear_bwd")[0]


def test_op_results_equal_the_direct_calls():
    x, w, b, a, bb = make_inputs((21,), 19, 17, 3, torch.bfloat16)
    seed = torch.tensor(2**40 + 3)
    y, s = fwd_op(x, w, b, a, bb, 0.7, 0.25, seed)
    y2, s2 = cpp.forward(x, w, b, a, bb, 0.7, 0.25, seed)
    assert torch.equal(y, y2) and torch.equal(s, s2)  # the same C++ function, with and without the dispatcher


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_fwd(bias, dropout_p, dtype):
    x, w, b, a, bb = make_inputs((5,), 12, 7, 3, dtype, bias=bias)
    for t in (x, a, bb):
        t.requires_grad_(True)
    torch.library.opcheck(fwd_op, (x, w, b, a, bb, 0.75, dropout_p, torch.tensor(11)))


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, False),
                                   (False, False, True)])
def test_opcheck_bwd(needs):
    x, w, b, a, bb = make_inputs((5,), 12, 7, 3, torch.float32)
    seed = torch.tensor(11)
    _, s = fwd_op(x, w, b, a, bb, 0.75, 0.25, seed)
    dy = _grads_dy(5, 7, torch.float32)
    torch.library.opcheck(bwd_op, (dy, x, w, a, bb, s, 0.75, 0.25, seed, *needs))


# ---- the build ----------------------------------------------------------------------------------

def test_unavailable_warns_once_with_the_reason(monkeypatch):
    monkeypatch.setattr(cpp, "_module", None)
    monkeypatch.setattr(cpp, "_error", None)
    monkeypatch.setattr(cpp, "_warned", False)
    monkeypatch.setenv("CXX", "no-such-compiler-fused-lora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpp.available() is False
        assert cpp.available() is False
    assert len(caught) == 1 and "no C++ compiler" in str(caught[0].message)
    with pytest.raises(RuntimeError, match=re.escape("no C++ compiler")):
        cpp.load()


def test_build_dir_names_torch_version():
    assert torch.__version__.replace("+", "_") in cpp.build_dir().name
