"""The whole autograd Function (forward and every grad) against the reference, through the kernels."""
import pytest
import torch

import fused_lora
from fused_lora.functional import select_backend
from cases import CASES, DTYPES, case_id
from numerics import compare_with_reference, make_inputs, skip_unless_backend_runs


def test_interpreter_selects_triton():
    assert select_backend(torch.empty(1)) == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    lead, K, N, r, p, bias = case
    inputs = make_inputs(lead, K, N, r, dtype, bias=bias)
    compare_with_reference(inputs, scaling=1.7, dropout_p=p, seed=2024)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_and_bias_grads(dtype):
    inputs = make_inputs((37,), 45, 70, 12, dtype)
    compare_with_reference(inputs, scaling=0.5, dropout_p=0.2, seed=7, grad_weight=True)


@pytest.mark.slow
def test_odd_large_shape_bf16():
    # 301 x 333 x 401: several tiles in every dimension (5 row blocks of 64, 3-11 K and N tiles of 32-128), ragged
    # edges everywhere.
    inputs = make_inputs((301,), 333, 401, 16, torch.bfloat16)
    compare_with_reference(inputs, scaling=2.0, dropout_p=0.1, seed=11)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_x(dtype):
    x, w, b, a, bb = make_inputs((9, 130), 61, 50, 8, dtype)
    x_nc = x.transpose(0, 1)[:, ::2]  # (65, 9, 61) with no unit strides between rows
    assert not x_nc.is_contiguous()
    got, ref = compare_with_reference((x_nc, w, b, a, bb), scaling=1.0, dropout_p=0.1, seed=3)
    assert got["dx"].shape == x_nc.shape


def test_eval_mode_ignores_dropout():
    x, w, b, a, bb = make_inputs((20,), 30, 40, 4, torch.float32)
    y_eval = fused_lora.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=False)
    y_none = fused_lora.lora_linear(x, w, b, a, bb, 2.0)
    assert torch.equal(y_eval, y_none)


def test_dropout_seed_reproducible():
    x, w, b, a, bb = make_inputs((20,), 30, 40, 4, torch.float32)
    run = lambda **kw: fused_lora.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=True, **kw)
    assert torch.equal(run(seed=5), run(seed=5))
    assert not torch.equal(run(seed=5), run(seed=6))
    torch.manual_seed(0)
    first = run()
    torch.manual_seed(0)
    assert torch.equal(first, run())


@pytest.mark.parametrize("backend", ["torch", "cpp", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_backends_match_reference(backend, dtype, monkeypatch):
    skip_unless_backend_runs(backend)
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    assert select_backend(torch.empty(1)) == backend
    inputs = make_inputs((2, 19), 37, 29, 7, dtype)
    compare_with_reference(inputs, scaling=1.3, dropout_p=0.25, seed=99, grad_weight=True)


def _cpu_default() -> str:
    from fused_lora.ops import cpp_backend

    return "cpp" if cpp_backend.available() else "torch"


@pytest.mark.parametrize("value,expected", [("1", "triton"), ("true", "triton"), ("On", "triton"),
                                            ("yes", "triton"), ("0", "cpu"), ("false", "cpu"), ("", "cpu")])
def test_interpreter_flag_parsed_as_triton_does(value, expected, monkeypatch):
    # triton interprets kernels for 1/true/on/yes (any case); the bf16 dot fix must follow it.
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert select_backend(torch.empty(1)) == (_cpu_default() if expected == "cpu" else expected)


def test_cpu_without_interpreter_uses_cpp_or_torch_path(monkeypatch):
    from fused_lora.ops import cpp_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend(torch.empty(1)) == _cpu_default()
    monkeypatch.setattr(cpp_backend, "available", lambda: False)  # no C++ compiler: the torch path
    assert select_backend(torch.empty(1)) == "torch"
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(torch.empty(1))
    monkeypatch.setenv("FUSED_LORA_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FUSED_LORA_BACKEND"):
        select_backend(torch.empty(1))


def test_forced_cpp_names_why_it_cannot_run(monkeypatch):
    from fused_lora.ops import cpp_backend

    monkeypatch.setenv("FUSED_LORA_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="FUSED_LORA_BACKEND=cpp needs CPU tensors; x is on meta"):
        select_backend(torch.empty(1, device="meta"))

    def unbuildable():
        raise RuntimeError("fused_lora C++ CPU backend unavailable: no C++ compiler ('c++' not found on PATH)")

    monkeypatch.setattr(cpp_backend, "load", unbuildable)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        select_backend(torch.empty(1))


def test_saves_only_x_and_s():
    """Autograd keeps x and S (M x r) as activations; W, A, B are parameters, never copies."""
    x, w, b, a, bb = make_inputs((64,), 48, 40, 8, torch.float32)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_lora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, training=True, seed=1)
    params = {w.data_ptr(), a.data_ptr(), bb.data_ptr()}
    activations = [t for t in saved if t.data_ptr() not in params]
    assert sorted(tuple(t.shape) for t in activations) == [(64, 8), (64, 48)]
    assert any(t.data_ptr() == x.data_ptr() for t in activations), "x itself is saved, not a dropped copy"
