"""Error bounds for the numerics tests.

Every numerical comparison in the suite is against a float64 reference of the same computation (the
same model, layer or expression with fp64 parameters and inputs). A result passes when

    max |ours - ref64|  <=  2 * max |torch - ref64|  +  0.5 * eps(dtype) * max |ref64|

where torch is plain PyTorch doing the same computation at the same dtype (nn.Linear, PEFT's layers,
fused_lora.reference), and eps(dtype) is the tested dtype's machine epsilon: the last term is half an
ulp of the reference's largest magnitude. Both sides scale with the values and with the rounding that a
given summation order makes, so another CPU (AVX-512 instead of AVX2, another thread count) moves the
bound with the error; a fixed rtol / atol does not. Loss curves follow the same rule: each run's per-step
losses against the fp64 run of the same training (same init, same data). Results that are exact by construction (the same ops
in the same order, a term that is exactly zero) are compared with torch.equal instead, with the reason
next to the assertion.

assert_within_torch_error applies the rule to one tensor; run / torch_and_fp64 /
assert_module_within_torch_error apply it to a module's output and the grads of its trainable
parameters and inputs.
"""
from __future__ import annotations

import copy

import torch

import fused_lora

FACTOR = 2.0


def max_err(value: torch.Tensor, ref64: torch.Tensor) -> float:
    if ref64.numel() == 0:
        return 0.0
    return (value.detach().double().cpu() - ref64.detach().double().cpu()).abs().max().item()


def atol_for(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """Half an ulp of dtype at max |ref64|."""
    if ref64.numel() == 0:
        return 0.0
    return 0.5 * torch.finfo(dtype).eps * ref64.detach().abs().max().item()


def torch_error(torch_value, ref64: torch.Tensor) -> float:
    """max_err of the baseline; with several baselines (a tuple), the largest."""
    values = torch_value if isinstance(torch_value, (tuple, list)) else (torch_value,)
    return max(max_err(v, ref64) for v in values)


def assert_within_torch_error(name, value, torch_value, ref64, dtype, factor=FACTOR):
    """max_err(value) <= factor * torch_error(torch_value) + atol_for(ref64, dtype); torch_value: a tensor, or a
    tuple of tensors when several plain-torch computations of the same result exist (the largest error counts)."""
    assert value.shape == ref64.shape, f"{name}: shape {tuple(value.shape)} != {tuple(ref64.shape)}"
    assert value.dtype == dtype, f"{name}: dtype {value.dtype} != {dtype}"
    err = max_err(value, ref64)
    bound = factor * torch_error(torch_value, ref64) + atol_for(ref64, dtype)
    assert err <= bound, f"{name}: max error {err:.3e} exceeds bound {bound:.3e} (torch {dtype} error x{factor} + atol)"


def assert_losses_within_torch_error(name, losses, torch_losses, losses64, factor=FACTOR):
    """The rule on loss curves (lists of floats from fp32 loss.item()): each run against the fp64 run."""
    as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype)
    assert_within_torch_error(name, as_tensor(losses, torch.float32), as_tensor(torch_losses, torch.float32),
                              as_tensor(losses64, torch.float64), torch.float32, factor)


def skip_unless_backend_runs(name: str) -> None:
    """Skips the calling test when backend ``name`` cannot run here: cpp without a C++ compiler (the
    package then warns once and computes on the torch path)."""
    if name == "cpp":
        from fused_lora.ops import cpp_backend

        if not cpp_backend.available():
            import pytest

            pytest.skip("the C++ CPU backend cannot be built here (no C++ compiler or ninja)")


def lora_backend(name: str):
    """FUSED_LORA_BACKEND=name inside the block (fused_lora reads it on every call)."""
    from fused_lora.ops.dispatch import forced_backend
    return forced_backend(name)


def fp64_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


def square_sum(y: torch.Tensor) -> torch.Tensor:
    return y.square().sum()


def run(module, inputs=(), *, call=None, params=None, dtype=None, grads=False, loss=square_sum, seed=None):
    """Runs call(module, *inputs) (default module(*inputs)); returns {"y": output} and, with grads, the grads
    of loss(output): "grad <name>" for each trainable parameter of params (default module), "grad input <i>"
    for each input that requires grad. dtype casts the floating-point inputs (for the fp64 copy); seed is
    passed to torch.manual_seed first (dropout seeds drawn from the CPU generator)."""
    params = module if params is None else params
    if grads:
        params.zero_grad(set_to_none=True)
    args = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().to(dtype or t.dtype).requires_grad_(grads and t.requires_grad)
        args.append(t)
    if seed is not None:
        torch.manual_seed(seed)
    y = module(*args) if call is None else call(module, *args)
    out = {"y": y.detach().clone()}
    if grads:
        loss(y).backward()
        for name, p in params.named_parameters():
            if p.requires_grad and p.grad is not None:
                out[f"grad {name}"] = p.grad.detach().clone()
        for i, t in enumerate(args):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                out[f"grad input {i}"] = t.grad.detach().clone()
    return out


def torch_and_fp64(baseline, inputs=(), *, call=None, grads=False, loss=square_sum, seed=None, context=None):
    """run() of the plain-torch baseline at its dtype and of fp64_copy(baseline), both inside context()
    (default: fused_lora's layers on the reference backend, which is plain torch and takes fp64)."""
    ref = fp64_copy(baseline)
    kwargs = dict(call=call, grads=grads, loss=loss, seed=seed)
    with (context or (lambda: lora_backend("reference")))():
        low = run(baseline, inputs, **kwargs)
        ref64 = run(ref, inputs, dtype=torch.float64, **kwargs)
    return low, ref64


def assert_results_within_torch_error(got: dict, low, ref: dict, label="", factor=FACTOR):
    """The rule on each entry of run()'s dicts; low: the baseline's dict, or a tuple of them. The tested dtype
    of an entry is the (first) baseline's."""
    lows = low if isinstance(low, tuple) else (low,)
    assert got.keys() == ref.keys() and all(l.keys() == ref.keys() for l in lows), \
        (label, sorted(got), sorted(ref))
    for name in ref:
        assert_within_torch_error(f"{label}{name}", got[name], tuple(l[name] for l in lows), ref[name],
                                  lows[0][name].dtype, factor)


def assert_module_within_torch_error(ours, baseline, inputs=(), *, params=None, call=None, grads=False,
                                     loss=square_sum, seed=None, context=None, label=""):
    """ours (a module, or a compiled one with params the module it wraps) against the plain-torch baseline
    and its fp64 copy: the output and, with grads, every grad. Returns (ours, baseline, fp64) dicts."""
    got = run(ours, inputs, call=call, params=params, grads=grads, loss=loss, seed=seed)
    low, ref64 = torch_and_fp64(baseline, inputs, call=call, grads=grads, loss=loss, seed=seed, context=context)
    assert_results_within_torch_error(got, low, ref64, label)
    return got, low, ref64


def make_inputs(lead_shape, K, N, r, dtype, *, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead_shape, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    a = torch.randn(r, K, generator=g) / K**0.5
    bb = torch.randn(N, r, generator=g) / r**0.5
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return to(x), to(w), to(b), to(a), to(bb)


def run_lora(fn, inputs, scaling, dy, *, dropout_p, seed, grad_weight=False):
    """Forward and backward through fn; returns dict of y and the grads."""
    x, w, b, a, bb = (None if t is None else t.detach().clone() for t in inputs)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    if grad_weight:
        w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    y = fn(x, w, b, a, bb, scaling, dropout_p=dropout_p, training=True, seed=seed)
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "dx": x.grad, "dA": a.grad, "dB": bb.grad}
    if grad_weight:
        out["dW"] = w.grad
        if b is not None:
            out["db"] = b.grad
    return out


def compare_with_reference(inputs, scaling, *, dropout_p, seed, grad_weight=False, fn=None):
    """Runs fn (default fused_lora.lora_linear), the reference at the inputs' dtype, and in fp64."""
    fn = fn or fused_lora.lora_linear
    dtype = inputs[0].dtype
    x = inputs[0]
    N = inputs[1].shape[0]
    dy = torch.randn(*x.shape[:-1], N, generator=torch.Generator().manual_seed(123)).to(device=x.device)
    got = run_lora(fn, inputs, scaling, dy, dropout_p=dropout_p, seed=seed, grad_weight=grad_weight)
    low = run_lora(fused_lora.reference.lora_linear, inputs, scaling, dy, dropout_p=dropout_p, seed=seed,
                   grad_weight=grad_weight)
    ref = run_lora(fused_lora.reference.lora_linear, [None if t is None else t.double() for t in inputs],
                   scaling, dy.double(), dropout_p=dropout_p, seed=seed, grad_weight=grad_weight)
    for name in ref:
        assert_within_torch_error(name, got[name], low[name], ref[name], dtype)
    return got, ref


def lora_grads(inputs, *, deterministic=None):
    """(dx, dA, dB) of sum(lora_linear(...)) with dropout, optionally in deterministic mode."""
    x, w, b, a, bb = (t.clone() for t in inputs)
    for t in (x, a, bb):
        t.requires_grad_(True)
    previous = torch.are_deterministic_algorithms_enabled()
    if deterministic is not None:
        torch.use_deterministic_algorithms(deterministic)
    try:
        fused_lora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, training=True, seed=1).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    return x.grad, a.grad, bb.grad
