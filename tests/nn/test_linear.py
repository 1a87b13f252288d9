import math

import pytest
import torch
from torch import nn

import fused_lora
from numerics import assert_within_torch_error


def test_new_layer_equals_base_linear(monkeypatch):
    torch.manual_seed(0)
    layer = fused_lora.LoRALinear(40, 24, r=8, lora_alpha=16)
    base = nn.Linear(40, 24)
    base.weight.data.copy_(layer.weight)
    base.bias.data.copy_(layer.bias)
    x = torch.randn(3, 7, 40)
    # Kernels: B = 0 makes the LoRA term exactly zero, whatever A is; the base GEMM is the kernel's.
    y_kernel = layer(x)
    with torch.no_grad():
        layer.lora_A.normal_()
    assert torch.equal(layer(x), y_kernel)
    assert_within_torch_error("y", y_kernel, base(x), nn.functional.linear(x.double(), base.weight.double(), base.bias.double()), torch.float32)
    # CPU path: addmm for the base and an exact zero added in place: bit-identical to nn.Linear.
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    assert torch.equal(layer(x), base(x))


def test_parameters_and_init():
    layer = fused_lora.LoRALinear(32, 20, bias=False, r=4, lora_alpha=8)
    assert layer.bias is None
    assert not layer.weight.requires_grad
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (20, 4)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert 0 < layer.lora_A.abs().max() <= bound
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.parametrize("use_rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(use_rslora, expected):
    layer = fused_lora.LoRALinear(8, 8, r=4, lora_alpha=16, use_rslora=use_rslora)
    assert layer.scaling == expected


def test_from_linear_shares_tensors():
    base = nn.Linear(12, 6)
    layer = fused_lora.LoRALinear.from_linear(base, r=2, lora_alpha=4, lora_dropout=0.1, use_rslora=True)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad
    assert layer.scaling == 4 / math.sqrt(2)


def test_extra_repr():
    text = repr(fused_lora.LoRALinear(12, 6, r=2, lora_alpha=4, lora_dropout=0.05))
    assert "in_features=12, out_features=6, bias=True, r=2, lora_alpha=4, lora_dropout=0.05" in text


def test_dtype_and_device_args():
    layer = fused_lora.LoRALinear(8, 4, r=2, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 4)


def test_layer_backward_through_kernels():
    torch.manual_seed(1)
    layer = fused_lora.LoRALinear(30, 20, r=5, lora_dropout=0.2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 30, requires_grad=True)
    layer.train()
    layer(x, seed=3).square().sum().backward()
    ref = fused_lora.reference.lora_linear

    def reference_grads(dtype):  # plain torch at dtype, the same dropout mask (seed 3)
        w, bias = layer.weight.to(dtype), layer.bias.to(dtype)
        a, b, x2 = (t.detach().to(dtype).requires_grad_(True) for t in (layer.lora_A, layer.lora_B, x))
        ref(x2, w, bias, a, b, layer.scaling, dropout_p=0.2, training=True, seed=3).square().sum().backward()
        return a.grad, b.grad, x2.grad

    low, ref64 = reference_grads(torch.float32), reference_grads(torch.float64)
    for name, got, want, exact in zip(("dA", "dB", "dx"), (layer.lora_A.grad, layer.lora_B.grad, x.grad), low, ref64):
        assert_within_torch_error(name, got, want, exact, torch.float32)
