"""The DoRA launchers (fused_lora.kernels.launchers: dora_weight_norm, lora_fwd with a magnitude, dora_bwd) against
their formulas in fused_lora.reference, at the same dtype and in fp64, and their launches against the plans."""
import pytest
import torch

import fused_lora
from fused_lora import reference
from fused_lora.kernels import launchers, plans
from numerics import assert_within_torch_error, make_inputs
from spies import spy_on_kernels

# Every workspace a launcher makes is checked for writes past its end (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("guarded_workspaces")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEED = 31
DORA_KERNELS = ("_lora_shrink_kernel", "_lora_fwd_kernel", "_lora_bwd_dy_kernel", "_lora_bwd_dx_kernel",
                "_lora_bwd_da_kernel", "_dora_weight_norm_kernel", "_dora_magnitude_grad_kernel")


def _inputs(M, K, N, r, dtype, bias=True):
    x, w, b, a, bb = make_inputs((M,), K, N, r, dtype, bias=bias)
    m = (0.5 + torch.rand(N, generator=torch.Generator().manual_seed(4))).to(dtype)
    m[1] = 0.0  # y = b in that column: dm comes from the recompute
    w[2], bb[2] = 0.0, 0.0  # n = 0: g = 0, dm = 0
    return x, w, b, a, bb, m


def _check_fwd(inputs, y, s, z, dtype, p=0.0):
    """The DoRA forward launcher's (y, S, Z) from ``inputs`` (x, W, b, A, B, m, n) at scaling 0.9: S against torch
    and fp64, then y (and Z with dropout) from the kernel's own S."""
    x, w, b, a, bb, m, n = inputs
    (_, s_low, _), (_, s_ref, _) = (reference.dora_fwd(x, w, b, a, bb, 0.9, m, n, dropout_p=p, seed=SEED, upcast=u)
                                    for u in (False, True))
    assert_within_torch_error("S", s, s_low, s_ref, dtype)
    (y_low, _, z_low), (y_ref, _, z_ref) = (
        reference.dora_fwd(x, w, b, a, bb, 0.9, m, n, dropout_p=p, seed=SEED, s=s, upcast=u) for u in (False, True))
    assert_within_torch_error("y given S", y, y_low, y_ref, dtype)
    if p > 0:
        assert_within_torch_error("Z given S", z, z_low, z_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# Bias on and off each meet the fused and the unfused shrink, one row block and several.
@pytest.mark.parametrize("M,r,fuse,bias", [(3, 7, True, True), (3, 1, False, False), (90, 64, False, True),
                                           (90, 16, None, False)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fwd_and_bwd(dtype, M, r, fuse, bias, p):
    x, w, b, a, bb, m = _inputs(M, 70, 45, r, dtype, bias)
    n = launchers.dora_weight_norm(w, a, bb, 0.9)
    y, s, z = launchers.dora_fwd(x, w, b, a, bb, 0.9, m, n, dropout_p=p, seed=SEED, fuse_shrink=fuse)
    _check_fwd((x, w, b, a, bb, m, n), y, s, z, dtype, p)
    saved = z if p > 0 else y
    dy = torch.randn(M, 45, generator=torch.Generator().manual_seed(8)).to(dtype)
    got = launchers.dora_bwd(dy, x, w, b, a, bb, m, n, s, saved, 0.9, dropout_p=p, seed=SEED)
    lows = reference.dora_bwd(dy, x, w, b, a, bb, 0.9, m, n, s, saved, dropout_p=p, seed=SEED)
    refs = reference.dora_bwd(dy, x, w, b, a, bb, 0.9, m, n, s, saved, dropout_p=p, seed=SEED, upcast=True)
    for name, g, lo, rf in zip(("dB", "dm"), got[2:], lows[2:], refs[2:]):
        assert_within_torch_error(name, g.to(dtype), lo.to(dtype), rf, dtype)
    # dX and dA from the dS pass's own dS, which the kernels share: those launches alone against torch.
    dy_ready = launchers._dy_ready(M, 45, r, dtype, False, launchers._input_precision(dtype), launchers._INTERPRETER_SMS,
                                   True, bias and p == 0, p > 0)
    ds = launchers._bwd_dy(dy_ready, dy, bb, s, 0.9, dora=(m, n, saved, b if p == 0 else None))[0]
    g, g64 = reference.dora_scale(m.float(), n).to(dtype), reference.dora_scale(m.double(), n.double())
    assert_within_torch_error("dS", ds, 0.9 * (dy * g) @ bb, 0.9 * (dy.double() * g64) @ bb.double(), dtype)
    lows = reference.dora_bwd(dy, x, w, b, a, bb, 0.9, m, n, s, saved, dropout_p=p, seed=SEED, ds=ds)
    refs = reference.dora_bwd(dy, x, w, b, a, bb, 0.9, m, n, s, saved, dropout_p=p, seed=SEED, ds=ds, upcast=True)
    for name, g, lo, rf in zip(("dX", "dA"), got[:2], lows[:2], refs[:2]):
        assert_within_torch_error(name, g.to(dtype), lo.to(dtype), rf, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,r,fuse", [(16, 7, True), (3, 33, False), (8, 1, None)])
def test_fwd_split_k(dtype, M, r, fuse):
    """Few tokens on few tiles without dropout: DoRA's forward split over K (K = 401 on N = 45: 4 splits, 7 of a
    shorter last one in fp32), the column scale applied by the last split to arrive; m = 0 and n = 0 columns in."""
    x, w, b, a, bb, m = _inputs(M, 401, 45, r, dtype)
    launch = plans.find_launch(plans.plan_lora_fwd(M, 45, 401, r, dtype, dropout=False, bias=True, dora=True,
                                                   fuse_shrink=fuse), "_lora_fwd_kernel")
    assert len(launch.grid) == 2 and launch.constexprs["SPLIT_K_PARTIALS"]
    n = launchers.dora_weight_norm(w, a, bb, 0.9)
    y, s, z = launchers.dora_fwd(x, w, b, a, bb, 0.9, m, n, fuse_shrink=fuse)
    _check_fwd((x, w, b, a, bb, m, n), y, s, z, dtype)
    assert torch.equal(launchers.dora_fwd(x, w, b, a, bb, 0.9, m, n, fuse_shrink=fuse)[0], y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,r,p", [(70, 33, 0.3), (100, 200, 0.0)])
def test_fwd_sums_the_shrinks_k_splits(dtype, M, r, p):
    """DoRA's forward GEMM sums the shrink launch's K splits (K = 1100: 6 splits) and stores S, with the column scale
    (and with dropout x' W^T and Z) in the same epilogue; m = 0 and n = 0 columns in."""
    x, w, b, a, bb, m = _inputs(M, 1100, 45, r, dtype)
    plan = plans.plan_lora_fwd(M, 45, 1100, r, dtype, dropout=p > 0, bias=True, dora=True, fuse_shrink=False)
    shrink, fwd = (plans.find_launch(plan, k) for k in ("_lora_shrink_kernel", "_lora_fwd_kernel"))
    assert shrink.grid[1] > 1 and not shrink.constexprs["SUM_PARTS"] and fwd.constexprs["S_FROM_PARTS"]
    n = launchers.dora_weight_norm(w, a, bb, 0.9)
    y, s, z = launchers.dora_fwd(x, w, b, a, bb, 0.9, m, n, dropout_p=p, seed=SEED, fuse_shrink=False)
    _check_fwd((x, w, b, a, bb, m, n), y, s, z, dtype, p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
# 130 tokens: 3 row blocks of 64; 600: 10 (a first group of 8 and a last of 2); K = 200 and N = 70 / 45 give
# several K tiles and N splits at the interpreter's 2 SMs; r = 17 pads to 32 (DoRA's dX tiles have 128 rows, where
# configs.bwd_ds_in_launch allows it up to R = 32).
@pytest.mark.parametrize("M,r,bias,p", [(130, 5, True, 0.0), (130, 17, False, 0.3), (600, 1, True, 0.0),
                                        (600, 7, False, 0.2)])
def test_in_launch_bwd(dtype, M, r, bias, p):
    """DoRA with the dS, dB and dA jobs in the dX launch (dm's partials from the dS jobs): dX, dA, dB and dm within
    torch's error of the chained formulas, m = 0 and n = 0 columns in; the workspace back at zero.
    Its forward keeps the shrink launch (configs.fwd_shrink_in_launch)."""
    N, K = 70 if p else 45, 200
    x, w, b, a, bb, m = _inputs(M, K, N, r, dtype, bias)
    with pytest.raises(ValueError, match="shrink cannot run in the forward launch"):
        plans.plan_lora_fwd(M, N, K, r, dtype, dropout=p > 0, bias=bias, dora=True, shrink_in_launch=True)
    n = launchers.dora_weight_norm(w, a, bb, 0.9)
    y, s, z = launchers.dora_fwd(x, w, b, a, bb, 0.9, m, n, dropout_p=p, seed=SEED)
    _check_fwd((x, w, b, a, bb, m, n), y, s, z, dtype, p)
    saved = z if p > 0 else y
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(8)).to(dtype)
    bwd = plans.plan_dora_bwd(M, N, K, r, dtype, dropout=p > 0, bias=bias, deterministic=False,
                              num_sms=launchers._INTERPRETER_SMS)
    assert [l.kernel for l in bwd] == ["_lora_bwd_dx_kernel", "_dora_magnitude_grad_kernel"], "not in the launch"
    got = launchers.dora_bwd(dy, x, w, b, a, bb, m, n, s, saved, 0.9, dropout_p=p, seed=SEED)
    lows = reference.dora_bwd(dy, x, w, b, a, bb, 0.9, m, n, s, saved, dropout_p=p, seed=SEED)
    refs = reference.dora_bwd(dy, x, w, b, a, bb, 0.9, m, n, s, saved, dropout_p=p, seed=SEED, upcast=True)
    for name, g, lo, rf in zip(("dX", "dA", "dB", "dm"), got, lows, refs):
        assert_within_torch_error(name, g.to(dtype), lo.to(dtype), rf, dtype)
    for workspace in launchers._workspaces.values():
        assert not workspace.counters.any() and not workspace.accumulator.any()


def test_dora_with_dropout_does_not_split_k():
    launch = plans.find_launch(plans.plan_lora_fwd(16, 45, 401, 7, torch.bfloat16, dropout=True, bias=True, dora=True),
                               "_lora_fwd_kernel")
    assert len(launch.grid) == 1 and "SPLIT_K_PARTIALS" not in launch.constexprs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,r", [(150, 83, 1), (64, 200, 16), (9, 5, 256)])
def test_weight_norm(dtype, N, K, r):
    _, w, _, a, bb = make_inputs((1,), K, N, r, dtype)
    n = launchers.dora_weight_norm(w, a, bb, -1.5)
    assert_within_torch_error("n", n.to(dtype), reference.dora_weight_norm(w, a, bb, -1.5),
                              reference.dora_weight_norm(w, a, bb, -1.5, upcast=True), dtype)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("M,r,bias,p", [(70, 5, True, 0.0), (300, 40, False, 0.0), (1, 16, True, 0.0),
                                        (70, 5, True, 0.2), (1, 16, False, 0.2)])
def test_launches_equal_the_plans(monkeypatch, M, r, bias, p, deterministic):
    """One fused DoRA fwd+bwd launches exactly its plans: norm, forward, dS / dB, dX, dA, dm (or, 16-bit above 64
    tokens and not deterministic where the model prefers it, the dX launch with the dS / dB jobs inside, then dm)."""
    launches = []
    spy_on_kernels(monkeypatch, kernels=DORA_KERNELS, log=launches)
    x, w, b, a, bb, m = _inputs(M, 40, 24, r, torch.float16, bias)
    x.requires_grad_(True), a.requires_grad_(True), bb.requires_grad_(True), m.requires_grad_(True)
    torch.use_deterministic_algorithms(deterministic)
    try:
        fused_lora.dora_linear(x, w, b, a, bb, 1.0, m, dropout_p=p, training=True, seed=3).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    dt = torch.float16
    planned = [l for l in plans.plan_dora_weight_norm(24, 40, r, dt)
               + plans.plan_lora_fwd(M, 24, 40, r, dt, dropout=p > 0, bias=bias, dora=True,
                                     num_sms=launchers._INTERPRETER_SMS)
               + plans.plan_dora_bwd(M, 24, 40, r, dt, dropout=p > 0, bias=bias, deterministic=deterministic,
                                     num_sms=launchers._INTERPRETER_SMS) if l.is_triton]
    expected = [(l.kernel, l.grid, l.constexprs, l.config.num_warps, l.config.num_stages) for l in planned]
    log = [(l.kernel, l.grid, l.constexprs, l.kwargs["num_warps"], l.kwargs["num_stages"]) for l in launches]
    assert log == expected
