"""Adversarial inputs: strided and expanded bias, inf / NaN propagation (padding, dropped positions,
scaling 0), the launch guard of the inputs' device, tensor seeds. Kernels under TRITON_INTERPRET=1 and
the torch backend, against fused_lora.reference (PEFT's semantics: dropout is x * mask)."""
import contextlib

import pytest
import torch

import fused_lora
from fused_lora.dropout import dropout_keep_mask
from fused_lora.kernels import configs, launchers
from numerics import assert_within_torch_error, make_inputs, run_lora, skip_unless_backend_runs
from spies import spy_on_kernels

BACKENDS = ["triton", "cpp", "torch"]


def _nonfinite_pattern(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    t = t.detach().double()
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def assert_same_nonfinite_then_close(name, got, low, ref64, dtype):
    """NaN, +inf and -inf exactly where the fp64 reference has them; the finite rest within the error
    bound of tests/numerics.py."""
    for kind, g, r in zip(("NaN", "+inf", "-inf"), _nonfinite_pattern(got), _nonfinite_pattern(ref64)):
        assert torch.equal(g, r), f"{name}: {kind} at {int(g.sum())} elements, reference {int(r.sum())}"
    finite = torch.isfinite(ref64)
    assert_within_torch_error(name, got[finite], low[finite], ref64[finite], dtype)


def _compare_all(inputs, scaling, *, dropout_p, seed):
    dtype = inputs[0].dtype
    N = inputs[1].shape[0]
    dy = torch.randn(*inputs[0].shape[:-1], N, generator=torch.Generator().manual_seed(5))
    got = run_lora(fused_lora.lora_linear, inputs, scaling, dy, dropout_p=dropout_p, seed=seed)
    low = run_lora(fused_lora.reference.lora_linear, inputs, scaling, dy, dropout_p=dropout_p, seed=seed)
    ref = run_lora(fused_lora.reference.lora_linear, [None if t is None else t.double() for t in inputs],
                   scaling, dy.double(), dropout_p=dropout_p, seed=seed)
    for name in ref:
        assert_same_nonfinite_then_close(name, got[name], low[name], ref[name], dtype)
    return got


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    skip_unless_backend_runs(request.param)
    monkeypatch.setenv("FUSED_LORA_BACKEND", request.param)
    return request.param


# ---- bias views ---------------------------------------------------------------------------------

@pytest.mark.parametrize("M", [3, 100], ids=["few-tokens", "many-tokens"])
@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_bias_views(backend, M, view):
    x, w, _, a, bb = make_inputs((M,), 40, 37, 5, torch.float32, bias=False)
    if view == "strided":
        bias = torch.randn(2 * 37, generator=torch.Generator().manual_seed(1))[::2]
    else:
        bias = torch.tensor(5.0).expand(37)  # one element of storage, stride 0
    assert not bias.is_contiguous()
    y = fused_lora.lora_linear(x, w, bias, a, bb, 1.3)
    low = fused_lora.reference.lora_linear(x, w, bias, a, bb, 1.3)
    ref = fused_lora.reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), bb.double(), 1.3)
    assert_within_torch_error("y", y, low, ref, torch.float32)


# ---- inf / NaN ----------------------------------------------------------------------------------

@pytest.mark.parametrize("M,r", [(3, 5), (3, 16), (100, 5)], ids=["few-tokens-padded-rank", "few-tokens", "many"])
def test_inf_in_x_stays_per_element(backend, M, r):
    """One inf in x: inf / -inf / NaN per element as in the reference, never a whole row of NaN from the
    rank's zero padding."""
    x, w, b, a, bb = make_inputs((M,), 40, 37, r, torch.float32)
    x[1, 7] = float("inf")
    # S[1] = +inf in every column and B > 0: y[1, n] is +inf where W[n, 7] > 0 and NaN where it is < 0.
    a[:, 7] = a[:, 7].abs() + 0.1
    bb = bb.abs()
    got = _compare_all((x, w, b, a, bb), 1.3, dropout_p=0.0, seed=None)
    assert torch.isposinf(got["y"][1]).any() and torch.isnan(got["y"][1]).any()


def _dropped_position(seed, M, K, p):
    keep = dropout_keep_mask(seed, M, K, p)
    rows, cols = torch.nonzero(~keep, as_tuple=True)
    return int(rows[0]), int(cols[0])


@pytest.mark.parametrize("M", [3, 100], ids=["few-tokens", "many-tokens"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_x_at_a_dropped_position_propagates(backend, M, value):
    """PEFT's dropout is x * mask: a NaN / inf of x where the mask drops it becomes NaN in S, dA and dB."""
    seed, p = 17, 0.3
    x, w, b, a, bb = make_inputs((M,), 40, 37, 5, torch.float32)
    m, k = _dropped_position(seed, M, 40, p)
    x[m, k] = float(value)
    got = _compare_all((x, w, b, a, bb), 1.3, dropout_p=p, seed=seed)
    assert torch.isnan(got["dB"]).any() and torch.isnan(got["dA"][:, k]).all()


@pytest.mark.parametrize("M", [3, 100], ids=["few-tokens", "many-tokens"])
def test_nonfinite_lora_term_of_dx_at_dropped_positions_propagates(backend, M):
    """An inf in B makes dS A inf everywhere; at dropped positions dX is NaN (0 * inf), as in the reference."""
    x, w, b, a, bb = make_inputs((M,), 40, 37, 5, torch.float32)
    bb[3, 2] = float("inf")
    got = _compare_all((x, w, b, a, bb), 1.3, dropout_p=0.3, seed=17)
    assert torch.isnan(got["dx"]).any()


@pytest.mark.parametrize("M", [3, 100], ids=["few-tokens", "many-tokens"])
def test_scaling_zero_keeps_nan_of_the_lora_branch(backend, M):
    x, w, b, a, bb = make_inputs((M,), 40, 37, 5, torch.float32)
    a[2, 4] = float("nan")
    got = _compare_all((x, w, b, a, bb), 0.0, dropout_p=0.0, seed=None)
    assert torch.isnan(got["y"]).all()


# ---- launches on the inputs' device ---------------------------------------------------------------

class _GuardSpy:
    """Replaces launchers.launch_guard: records the devices it is entered with and which one is active."""

    def __init__(self):
        self.entered, self.active = [], []

    @contextlib.contextmanager
    def __call__(self, device):
        self.entered.append(device)
        self.active.append(device)
        try:
            yield
        finally:
            self.active.pop()


@pytest.mark.parametrize("M", [3, 100], ids=["few-tokens", "many-tokens"])
def test_every_launch_runs_inside_a_guard_of_the_inputs_device(monkeypatch, M):
    guard = _GuardSpy()
    monkeypatch.setattr(launchers, "launch_guard", guard)
    launches = []
    spy_on_kernels(monkeypatch, log=launches, on_launch=lambda: list(guard.active))
    x, w, b, a, bb = make_inputs((M,), 40, 37, 5, torch.float32)
    got = run_lora(fused_lora.lora_linear, (x, w, b, a, bb), 1.0, torch.ones(M, 37), dropout_p=0.2, seed=3)
    launched = [launch.seen for launch in launches]
    # fwd (and the shrink unless fused); dy, dx, da, or one backward launch where configs.bwd_one_launch_config pays
    assert len(launched) >= (2 if M <= configs.FEW_TOKENS else 4)
    assert all(devices and devices[-1] == x.device for devices in launched), launched
    assert set(guard.entered) == {x.device} and not guard.active
    assert got["y"].device == x.device


def test_launch_guard_is_a_cuda_device_context_for_cuda_tensors():
    guard = launchers.launch_guard(torch.device("cuda", 1))  # built only: entering it needs a GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launchers.launch_guard(torch.device("cpu")), contextlib.nullcontext)


# ---- seeds --------------------------------------------------------------------------------------

def test_tensor_seed_equals_int_seed(backend):
    inputs = make_inputs((9,), 40, 37, 5, torch.float32)
    dy = torch.randn(9, 37)
    with_int = run_lora(fused_lora.lora_linear, inputs, 1.0, dy, dropout_p=0.3, seed=123)
    with_tensor = run_lora(fused_lora.lora_linear, inputs, 1.0, dy, dropout_p=0.3,
                           seed=torch.tensor(123, dtype=torch.int64))
    for name in with_int:  # the same kernels on the same seed value: bit-identical
        assert torch.equal(with_int[name], with_tensor[name]), name


def test_seed_drawn_from_the_device_generator(backend):
    x, w, b, a, bb = make_inputs((9,), 40, 37, 5, torch.float32)
    call = lambda: fused_lora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=True)
    torch.manual_seed(0)
    first, second = call(), call()
    torch.manual_seed(0)
    assert torch.equal(call(), first) and not torch.equal(first, second)


@pytest.mark.parametrize("seed,match", [
    (torch.tensor(3, dtype=torch.int32), "0-dim torch.int64"),
    (torch.tensor([3]), "0-dim torch.int64"),
    (torch.tensor(3, dtype=torch.int64, device="meta"), "x's device"),
    (-1, r"\[0, 2\*\*63\)"),
])
def test_bad_seed(seed, match):
    x, w, b, a, bb = make_inputs((2,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match=match):
        fused_lora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, training=True, seed=seed)


def test_grids_beyond_cuda_limits_are_refused_by_the_plan():
    from fused_lora.kernels.plans import plan_lora_bwd_dx, plan_lora_fwd
    big = 2**31 - 1  # sizes that validation lets through; their tile grid does not fit in CUDA's x dimension
    with pytest.raises(ValueError, match="_lora_fwd_kernel would launch a grid"):
        plan_lora_fwd(big, big, 64, 8, torch.bfloat16, dropout=False, bias=False)
    with pytest.raises(ValueError, match="_lora_bwd_dx_kernel would launch a grid"):
        plan_lora_bwd_dx(big, 64, big, 8, torch.bfloat16, dropout=False)
    assert plan_lora_fwd(2**20, 2**17, 64, 8, torch.bfloat16, dropout=False, bias=False)  # 2**27 programs: fine
