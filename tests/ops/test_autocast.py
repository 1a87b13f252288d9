"""torch.autocast: lora_linear, LoRALinear and injected models compute in the autocast dtype, as PEFT's
layers do, with grads in the parameters' own dtype. Eager and torch.compile, kernels under
TRITON_INTERPRET=1; bounded against an fp64 run by the error of PEFT / the reference under the same
autocast (tests/numerics.py)."""
import copy

import pytest
import torch
from torch import nn

import fused_lora
from numerics import assert_within_torch_error, lora_backend
from peft_parity import inputs, randomize_lora, tiny_llama

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(dropout=0.0):
    torch.manual_seed(0)
    layer = fused_lora.LoRALinear(40, 24, r=8, lora_alpha=16, lora_dropout=dropout)
    nn.init.normal_(layer.lora_B, std=0.1)
    return layer


def _peft_twin(layer):
    """PEFT's lora.Linear holding the same W, b, A, B and scaling."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(nn.Sequential(nn.Linear(layer.in_features, layer.out_features)),
                           LoraConfig(r=layer.r, lora_alpha=layer.lora_alpha, target_modules=["0"]))
    peft_layer = model.base_model.model[0]
    with torch.no_grad():
        peft_layer.base_layer.weight.copy_(layer.weight)
        peft_layer.base_layer.bias.copy_(layer.bias)
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    return peft_layer, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight


def _fwd_bwd(fn, x, params, dy, dtype):
    x = x.detach().clone().requires_grad_(True)
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=dtype):
        y = fn(x)
    y.backward(dy.to(y.dtype))
    return {"y": y.detach(), "dx": x.grad, "dA": params[0].grad.clone(), "dB": params[1].grad.clone()}


def _fp64_run(layer, x, dy):
    x64 = x.double().requires_grad_(True)
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    y = fused_lora.reference.lora_linear(x64, layer.weight.double(), layer.bias.double(), a64, b64, layer.scaling)
    y.backward(dy.double())
    return {"y": y.detach(), "dx": x64.grad, "dA": a64.grad, "dB": b64.grad}


def _assert_like_peft(ours, peft, ref64, dtype):
    assert ours["y"].dtype == peft["y"].dtype == dtype
    assert ours["dA"].dtype == ours["dB"].dtype == torch.float32  # grads in the parameters' dtype
    for name in ref64:
        assert_within_torch_error(name, ours[name], peft[name], ref64[name], ours[name].dtype)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_layer_under_autocast_matches_peft(dtype, mode):
    layer = _layer()
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(6, 24, generator=torch.Generator().manual_seed(2))
    fn = layer if mode == "eager" else torch.compile(layer, backend="aot_eager", fullgraph=True)
    ours = _fwd_bwd(fn, x, [layer.lora_A, layer.lora_B], dy, dtype)
    peft_layer, peft_A, peft_B = _peft_twin(layer)
    peft = _fwd_bwd(peft_layer, x, [peft_A, peft_B], dy, dtype)
    _assert_like_peft(ours, peft, _fp64_run(layer, x, dy), dtype)


def test_lora_linear_under_autocast_matches_the_reference_under_autocast():
    layer = _layer()
    x = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(1))
    args = (layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora.lora_linear(x, *args)
        low = fused_lora.reference.lora_linear(x, *args)
    ref = fused_lora.reference.lora_linear(x.double(), *(t.double() for t in args[:4]), layer.scaling)
    assert y.dtype == low.dtype == torch.bfloat16 and y.shape == (2, 3, 24)
    assert_within_torch_error("y", y, low, ref, torch.bfloat16)


def test_float64_is_left_alone_under_autocast(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")  # float64 is not a kernel dtype
    layer = _layer().double()
    x = torch.randn(3, 40, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert y.dtype == torch.float64


def test_dropout_under_autocast_matches_the_reference():
    layer = _layer(dropout=0.2)
    layer.train()
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, seed=9)
        low = fused_lora.reference.lora_linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16(),
                                               layer.lora_A.bfloat16(), layer.lora_B.bfloat16(), layer.scaling,
                                               dropout_p=0.2, training=True, seed=9)
    ref = fused_lora.reference.lora_linear(x.double(), layer.weight.double(), layer.bias.double(),
                                           layer.lora_A.double(), layer.lora_B.double(), layer.scaling,
                                           dropout_p=0.2, training=True, seed=9)
    assert_within_torch_error("y", y, low, ref, torch.bfloat16)


def _lora_name(name: str) -> str:
    """PEFT's "base_model.model.<m>.lora_A.default.weight" and ours "<m>.lora_A" as one key."""
    return name.replace("base_model.model.", "").replace(".default.weight", "")


def _injected_and_peft():
    from peft import LoraConfig, get_peft_model
    base = tiny_llama()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_lora(peft)
    ours = fused_lora.inject(copy.deepcopy(base), "all-linear", r=8, lora_alpha=16)
    lora = {_lora_name(name): p for name, p in peft.named_parameters() if "lora_" in name}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(lora[name])
    fp64 = copy.deepcopy(ours).double()
    return ours, peft, fp64


def _logits_and_grads(model, ids, grad_out, *, autocast=None):
    model.zero_grad()
    if autocast is None:
        logits = model(input_ids=ids).logits
    else:
        with torch.autocast("cpu", dtype=autocast):
            logits = model(input_ids=ids).logits
    (logits.double() * grad_out).sum().backward()
    grads = {_lora_name(name): p.grad for name, p in model.named_parameters() if "lora_" in name}
    return logits.detach(), grads


@pytest.mark.parametrize("via", ["inject", "accelerate"])
def test_injected_llama_under_autocast_matches_peft(via):
    ours, peft, fp64 = _injected_and_peft()
    ids, grad_out = inputs()
    autocast = torch.bfloat16
    if via == "accelerate":
        accelerate = pytest.importorskip("accelerate")
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        ours, peft = accelerator.prepare_model(ours), accelerator.prepare_model(peft)
        autocast = None  # the prepared models' forward runs under accelerate's own autocast
    got, got_grads = _logits_and_grads(ours, ids, grad_out, autocast=autocast)
    want, want_grads = _logits_and_grads(peft, ids, grad_out, autocast=autocast)
    with lora_backend("reference"):  # float64 is not a kernel dtype
        ref, ref_grads = _logits_and_grads(fp64, ids, grad_out)
    assert got.dtype == want.dtype
    assert_within_torch_error("logits", got, want, ref, got.dtype)
    assert set(got_grads) == set(ref_grads) and len(ref_grads) == 28
    for name, g in got_grads.items():
        assert_within_torch_error(name, g, want_grads[name], ref_grads[name], torch.float32)
