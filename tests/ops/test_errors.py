"""Bad inputs raise errors that name the tensor and the expected shape or dtype."""
import pytest
import torch

import fused_lora
from numerics import make_inputs


def _inputs(**overrides):
    x, w, b, a, bb = make_inputs((5,), 12, 10, 4, torch.float32)
    args = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb)
    args.update(overrides)
    return args


def _call(scaling=1.0, **kw):
    args = _inputs(**{k: v for k, v in kw.items() if k in ("x", "weight", "bias", "lora_A", "lora_B")})
    extra = {k: v for k, v in kw.items() if k in ("dropout_p", "training", "seed")}
    return fused_lora.lora_linear(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"],
                                  scaling, **extra)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.randn(5, 13)), r"x must have shape \(\.\.\., 12\)"),
    (dict(lora_A=torch.randn(4, 11)), r"lora_A must have shape \(r, 12\)"),
    (dict(lora_B=torch.randn(10, 5)), r"lora_B must have shape \(10, 4\).*rank r=4"),
    (dict(lora_B=torch.randn(9, 4)), r"lora_B must have shape \(10, 4\)"),
    (dict(bias=torch.randn(11)), r"bias must have shape \(10,\)"),
    (dict(weight=torch.randn(10, 12, 1)), r"weight must be 2-D"),
    (dict(lora_A=torch.randn(257, 12), lora_B=torch.randn(10, 257)), r"r=257.*r <= 256"),
    (dict(lora_A=torch.randn(0, 12), lora_B=torch.randn(10, 0)), r"r >= 1"),
    (dict(dropout_p=1.0, training=True), r"dropout_p must be a float in \[0, 1\)"),
    (dict(seed=-1, dropout_p=0.1, training=True), r"seed must be an int"),
])
def test_shape_and_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lora_A=torch.randn(4, 12, dtype=torch.float16)), r"lora_A has dtype torch.float16 but x has dtype torch.float32"),
    (dict(x=torch.randint(0, 3, (5, 12))), r"x must be a floating-point tensor"),
    (dict(weight=torch.randint(0, 3, (10, 12))), r"weight must be a floating-point tensor"),
    (dict(x=torch.randn(5, 12, dtype=torch.complex64)), r"x must be a floating-point tensor"),
    (dict(x=[[1.0] * 12]), r"x must be a torch.Tensor"),
])
def test_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        _call(**kwargs)


def test_float64_rejected_by_kernels_only(monkeypatch):
    args = [t.double() for t in make_inputs((5,), 12, 10, 4, torch.float32)]
    with pytest.raises(TypeError, match="Triton kernels support float16, bfloat16 and float32"):
        fused_lora.lora_linear(*args, 1.0)
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    assert fused_lora.lora_linear(*args, 1.0).dtype == torch.float64


def test_scaling_must_be_a_float():
    with pytest.raises(TypeError, match="scaling must be a finite Python float"):
        _call(scaling=torch.tensor(1.0))
    with pytest.raises(TypeError, match="scaling must be a finite Python float"):
        _call(scaling=float("nan"))


def test_device_mismatch():
    meta_a = torch.randn(4, 12, device="meta")
    with pytest.raises(ValueError, match=r"lora_A is on device meta but x is on cpu"):
        _call(lora_A=meta_a)


def test_layer_rejects_bad_config():
    with pytest.raises(ValueError, match="r must be a positive int"):
        fused_lora.LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        fused_lora.LoRALinear(4, 4, lora_dropout=1.5)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        fused_lora.LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))
