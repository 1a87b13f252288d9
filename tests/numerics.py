"""Error bounds for the numerics tests.

A result passes when its max error against an fp64 reference is at most twice the error of plain
torch at the same dtype (the same op, against the same fp64 reference), plus half an ulp of the
reference's largest magnitude.
"""
from __future__ import annotations

import torch

import fused_lora


def max_err(value: torch.Tensor, ref64: torch.Tensor) -> float:
    if ref64.numel() == 0:
        return 0.0
    return (value.detach().double().cpu() - ref64.detach().double().cpu()).abs().max().item()


def atol_for(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    if ref64.numel() == 0:
        return 0.0
    return 0.5 * torch.finfo(dtype).eps * ref64.detach().abs().max().item()


def assert_within_torch_error(name, value, torch_value, ref64, dtype, factor=2.0):
    assert value.shape == ref64.shape, f"{name}: shape {tuple(value.shape)} != {tuple(ref64.shape)}"
    assert value.dtype == dtype, f"{name}: dtype {value.dtype} != {dtype}"
    err = max_err(value, ref64)
    bound = factor * max_err(torch_value, ref64) + atol_for(ref64, dtype)
    assert err <= bound, f"{name}: max error {err:.3e} exceeds bound {bound:.3e} (torch {dtype} error x{factor} + atol)"


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
