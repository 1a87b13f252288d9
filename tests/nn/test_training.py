"""gradcheck in fp64, determinism, and a short training run on the fused and reference paths."""
import pytest
import torch

import fused_lora
from spies import spy_on_kernels
from numerics import assert_losses_within_torch_error, assert_within_torch_error, lora_backend, lora_grads, \
    make_inputs, skip_unless_backend_runs


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_gradcheck_fp64(p, backend, monkeypatch):
    skip_unless_backend_runs(backend)
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    x, w, b, a, bb = make_inputs((2, 3), 6, 5, 3, torch.float64)
    for t in (x, w, b, a, bb):
        t.requires_grad_(True)
    fn = lambda x, w, b, a, bb: fused_lora.lora_linear(x, w, b, a, bb, 1.5, dropout_p=p, training=True, seed=4)
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


def test_deterministic_mode_is_bitwise_repeatable(monkeypatch):
    spies = spy_on_kernels(monkeypatch, ("_lora_bwd_dy_kernel", "_lora_bwd_da_kernel"))
    inputs = make_inputs((300,), 70, 50, 16, torch.float32)
    first, second = lora_grads(inputs, deterministic=True), lora_grads(inputs, deterministic=True)
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)
    assert all(not call.kwargs["USE_ATOMICS"] for spy in spies.values() for call in spy.log)
    assert spies["_lora_bwd_da_kernel"].log, "dA kernel was launched"
    fast = lora_grads(inputs, deterministic=False)  # default mode: atomics for the reductions over M
    assert any(call.kwargs["USE_ATOMICS"] for call in spies["_lora_bwd_dy_kernel"].log)
    with lora_backend("reference"):  # plain torch at fp32 and in fp64, the same dropout mask
        low = lora_grads(inputs)
        ref = lora_grads([t.double() for t in inputs])
    for name, g1, g2, want, exact in zip(("dx", "dA", "dB"), first, fast, low, ref):
        assert_within_torch_error(f"deterministic {name}", g1, want, exact, torch.float32)
        assert_within_torch_error(f"atomics {name}", g2, want, exact, torch.float32)


def _train(backend, monkeypatch, dropout, steps=6, dtype=torch.float32):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    torch.manual_seed(0)  # the same init and data at every dtype: drawn in fp32, then cast
    layer = fused_lora.LoRALinear(24, 12, r=4, lora_alpha=8, lora_dropout=dropout)
    target = torch.nn.Linear(24, 12)
    x = torch.randn(64, 24)
    y_true = target(x).detach()
    layer, x, y_true = layer.to(dtype), x.to(dtype), y_true.to(dtype)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=0.05)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x, seed=step), y_true)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_loss_curves_agree(backend, dropout, monkeypatch):
    skip_unless_backend_runs(backend)
    fused = _train(backend, monkeypatch, dropout)
    ref = _train("reference", monkeypatch, dropout)
    exact = _train("reference", monkeypatch, dropout, dtype=torch.float64)  # the same training in fp64
    assert fused[-1] < fused[0] and ref[-1] < ref[0]
    assert_losses_within_torch_error("losses", fused, ref, exact)
