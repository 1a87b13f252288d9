"""patch_peft as PEFT's own code and tests see it: reprs, which base layers fuse, where warnings point."""
import copy
import inspect
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import fused_lora
from fused_lora.integrations import peft_patch
from numerics import assert_within_torch_error
from peft_parity import count_fused_calls, peft_model, randomize_lora, tiny_llama

DIM = 32


def _patch_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", peft_patch.FusedFallbackWarning)
        return fused_lora.patch_peft(model)


def _fallback_messages(model) -> str:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fused_lora.patch_peft(model)
    return "\n".join(str(w.message) for w in record if w.category is peft_patch.FusedFallbackWarning)


def _outputs_and_grads(module, x, *args):
    """Output and the grads of sum(out * G) for x and every LoRA parameter, G fixed."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x, *args)
    out = out[0] if isinstance(out, tuple) else out
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out.double() * grad_out).sum().backward()
    results = {"out": out.detach(), "dx": x.grad}
    results.update({name: p.grad for name, p in module.named_parameters() if "lora_" in name and p.grad is not None})
    return results


def _assert_matches_peft(patched, peft, x, *, fused_calls):
    """Patched vs PEFT (the same module unpatched) vs an fp64 copy: the project's error bound per tensor."""
    ref64 = _outputs_and_grads(copy.deepcopy(peft).double(), x.double())
    want = _outputs_and_grads(peft, x)
    with count_fused_calls() as counter:
        got = _outputs_and_grads(patched, x)
    assert counter["calls"] == fused_calls
    assert got.keys() == want.keys() == ref64.keys() and len(got) > 2
    for name in ref64:
        assert_within_torch_error(name, got[name], want[name], ref64[name], x.dtype)


# ---- repr -----------------------------------------------------------------------------------------

def test_patched_repr_equals_peft_repr():
    model = peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    before, status_before = repr(model), model.get_layer_status()
    _patch_quietly(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is peft_patch.FusedLinear and type(model.base_model) is peft_patch.FusedLoraModel
    assert repr(model) == before
    assert repr(layer).startswith("lora.Linear(") and repr(model.base_model).startswith("LoraModel(")
    # PeftModel.get_layer_status names each layer by its repr.
    assert model.get_layer_status() == status_before
    assert {status.module_type for status in status_before} == {"lora.Linear", "lora.Embedding"}


# ---- which base layers fuse: by type, never by class name -------------------------------------------

class MultiheadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(DIM, 4, batch_first=True)
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0])


def test_multihead_attention_out_proj_fuses_and_matches_peft():
    torch.manual_seed(0)
    peft = get_peft_model(MultiheadNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["mha", "head"]))
    randomize_lora(peft)
    peft.eval()
    model = copy.deepcopy(peft)
    message = _fallback_messages(model)
    # PEFT's lora.MultiheadAttention merges its adapters (in_proj and out_proj) into the weights around
    # nn.MultiheadAttention's forward, which reads out_proj.weight without calling out_proj: it runs
    # PEFT's forward. Its out_proj, a lora.Linear on a NonDynamicallyQuantizableLinear, fuses.
    assert message.splitlines() == ["fused_lora.patch_peft: 1 of 3 LoRA layers run PEFT's own forward:",
                                    "  base_model.model.mha: LoRA layer type MultiheadAttention is not supported "
                                    "(fused_lora fuses lora.Linear and lora.Embedding only)"]
    out_proj, peft_out_proj = (m.base_model.model.mha.base_layer.out_proj for m in (model, peft))
    assert type(out_proj) is peft_patch.FusedLinear
    assert type(out_proj.base_layer) is NonDynamicallyQuantizableLinear
    x = torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(3))
    _assert_matches_peft(out_proj, peft_out_proj, x, fused_calls=1)
    # The whole model: PEFT's merged MultiheadAttention, then the fused head.
    _assert_matches_peft(model, peft, x, fused_calls=1)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class QuantileLinear(nn.Linear):
    """'quant' in the name, plain nn.Linear behaviour."""


class Sandwich(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = NonDynamicallyQuantizableLinear(DIM, DIM)
        self.named = QuantileLinear(DIM, DIM)
        self.scaled = ScaledLinear(DIM, DIM)

    def forward(self, x):
        return self.scaled(self.named(self.plain(x)))


def test_linear_subclasses_fuse_unless_they_override_forward():
    torch.manual_seed(0)
    peft = get_peft_model(Sandwich(), LoraConfig(r=4, lora_alpha=8, target_modules=["plain", "named", "scaled"]))
    randomize_lora(peft)
    peft.eval()
    model = copy.deepcopy(peft)
    message = _fallback_messages(model)
    assert message.splitlines()[1:] == [
        f"  base_model.model.scaled: unsupported base layer {__name__}.ScaledLinear overrides forward of Linear, "
        f"which the fused op would bypass"]
    inner = model.base_model.model
    assert type(inner.plain) is type(inner.named) is peft_patch.FusedLinear
    assert type(inner.scaled) is not peft_patch.FusedLinear
    x = torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(3))
    _assert_matches_peft(model, peft, x, fused_calls=2)


class Int4Linear(nn.Linear):
    """Stands for a quantization library's layer: only its module says so."""
    __module__ = "bitsandbytes.nn.modules"

    def forward(self, x):
        return super().forward(x)


class CodebookTensor(torch.Tensor):
    """Stands for a quantized weight: a tensor subclass."""


def test_quantized_label_comes_from_types():
    torch.manual_seed(0)
    base = nn.Sequential(Int4Linear(DIM, DIM), nn.Linear(DIM, DIM))
    with torch.no_grad():
        base[1].weight = nn.Parameter(base[1].weight.as_subclass(CodebookTensor), requires_grad=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "1"]))
    message = _fallback_messages(model)
    assert message.splitlines()[1:] == [
        "  base_model.model.0: quantized base layer bitsandbytes.nn.modules.Int4Linear overrides forward of "
        "Linear, which the fused op would bypass",
        f"  base_model.model.1: quantized base weight: a {__name__}.CodebookTensor (tensor subclass; fused: "
        f"plain tensors)"]


# ---- warnings point at the user's line --------------------------------------------------------------

def _record_fallback(call):
    """(filename, lineno) of the FusedFallbackWarning that ``call`` raises."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    fallbacks = [w for w in record if w.category is peft_patch.FusedFallbackWarning]
    assert len(fallbacks) == 1, [str(w.message) for w in record]
    return fallbacks[0].filename, fallbacks[0].lineno


FALLBACK = dict(r=4, target_modules=["v_proj"], lora_bias=True)  # PEFT's forward, with a warning


def test_patch_peft_warning_points_at_caller():
    model = peft_model(tiny_llama(), LoraConfig(**FALLBACK))
    line = inspect.currentframe().f_lineno + 1
    assert _record_fallback(lambda: fused_lora.patch_peft(model)) == (__file__, line)


def test_add_adapter_warning_points_at_caller():
    model = _patch_quietly(peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])))
    line = inspect.currentframe().f_lineno + 1
    assert _record_fallback(lambda: model.add_adapter("biased", LoraConfig(**FALLBACK))) == (__file__, line)


def test_load_adapter_warning_points_at_caller(tmp_path):
    peft_model(tiny_llama(), LoraConfig(**FALLBACK)).save_pretrained(tmp_path)
    model = _patch_quietly(peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])))
    line = inspect.currentframe().f_lineno + 1
    assert _record_fallback(lambda: model.load_adapter(tmp_path, adapter_name="biased")) == (__file__, line)
