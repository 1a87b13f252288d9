"""LoRALinear.merge / unmerge and merge_and_unload: fp32 merge, NaN / inf refusal, round trips."""
import copy

import pytest
import torch
from torch import nn

import fused_lora
from numerics import assert_results_within_torch_error, assert_within_torch_error, run, torch_and_fp64


def _layer(dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = fused_lora.LoRALinear(48, 24, r=4, lora_alpha=8, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    return layer.eval()


def _merged_references(layer, x):
    """For an unmerged layer: fp64 x (W + s B A)^T + b, and plain torch merging at W's dtype (W + s B A in fp32,
    cast to W's dtype) then applying the merged W."""
    t = (lambda w: w.t()) if layer.fan_in_fan_out else (lambda w: w)  # W as (out, in)
    w, a, b, bias = layer.weight, layer.lora_A, layer.lora_B, layer.bias
    ref = x.double() @ (t(w).double() + layer.scaling * b.double() @ a.double()).t() + bias.double()
    merged = (t(w).float() + layer.scaling * b.float() @ a.float()).to(w.dtype)
    return nn.functional.linear(x, merged, bias), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_unmerged_and_round_trips(dtype):
    layer = _layer(dtype)
    x = torch.randn(5, 48, dtype=dtype)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    merged_torch, ref = _merged_references(layer, x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    y_merged = layer(x)
    assert_within_torch_error("merged y", y_merged, merged_torch, ref, dtype)
    assert_within_torch_error("unmerged y", y, merged_torch, ref, dtype)
    layer.unmerge()
    assert not layer.merged
    # The round trip's exact result is W; the baseline merges and unmerges in plain torch as the layer does.
    delta = layer.scaling * layer.lora_B.float() @ layer.lora_A.float()
    round_trip = ((w0.float() + delta).to(dtype).float() - delta).to(dtype)
    assert_within_torch_error("unmerged W", layer.weight, round_trip, w0.double(), dtype)
    if dtype == torch.bfloat16:
        # W is rounded twice: within half an ulp of W + s B A plus half an ulp of W (bf16: 2^-8 relative).
        assert ((layer.weight.float() - w0.float()).abs() <= (w0.float().abs() + delta.abs()) * 2**-8 * 2).all()


def test_merge_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(24, 48)
    layer = fused_lora.LoRALinear.from_linear(conv, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    x = torch.randn(5, 48)
    y = layer(x)
    merged_torch, ref = _merged_references(layer, x)
    assert_within_torch_error("unmerged y", y, merged_torch, ref, torch.float32)
    layer.merge()
    # The Conv1D itself carries the merge.
    assert_within_torch_error("Conv1D y", conv(x), merged_torch, ref, torch.float32)
    base = layer.to_base_layer()
    assert type(base) is Conv1D and base.weight is conv.weight
    assert_within_torch_error("base layer y", base(x), merged_torch, ref, torch.float32)


def test_merge_refuses_nan_and_overflow():
    layer = _layer()
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*unchanged"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0)
    half = _layer(torch.float16)
    w0 = half.weight.detach().clone()
    with torch.no_grad():
        half.lora_B.fill_(300.0)
        half.lora_A.fill_(100.0)  # s B A = 2 * 4 * 3e4 > fp16 max: overflows only in the cast back
    with pytest.raises(ValueError, match="NaN or inf"):
        half.merge()
    assert not half.merged and torch.equal(half.weight, w0)


def test_double_merge_and_unmerged_unmerge_raise():
    layer = _layer()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_merge_and_unload_injected_model():
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).eval()
    fused_lora.inject(model, "all-linear", r=2, lora_alpha=4)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(std=0.1)
    model[2].merge()  # already merged layers are unloaded as they are
    x = torch.randn(4, 16)
    y = run(model, (x,))
    # Baseline: the LoRA model with fused_lora.reference at fp32; fp64: its double copy (unmerged layer 0).
    low, ref = torch_and_fp64(model, (x,))
    out = fused_lora.merge_and_unload(model)
    assert out is model and type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert not hasattr(model, "fused_lora_config")
    assert_results_within_torch_error(y, low, ref, "LoRA model ")
    assert_results_within_torch_error(run(model, (x,)), low, ref, "unloaded ")


def test_merge_and_unload_refusal_merges_nothing():
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    fused_lora.inject(model, "all-linear", r=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[1].lora_B.fill_(float("inf"))
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"NaN or inf weights in \['1'\]; nothing was merged"):
        fused_lora.merge_and_unload(model)
    assert isinstance(model[0], fused_lora.LoRALinear) and not model[0].merged
    assert torch.equal(model[0].weight, w0)


def test_merge_and_unload_patched_peft_model():
    from peft import LoraConfig
    from peft_parity import inputs, peft_model, tiny_llama
    model = peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    peft = copy.deepcopy(model)  # unpatched: the plain-torch baseline, and its fp64 copy the reference
    fused_lora.patch_peft(model)
    ids, _ = inputs()
    call = lambda m, ids: m(input_ids=ids).logits
    y = run(model, (ids,), call=call)
    low, ref = torch_and_fp64(peft, (ids,), call=call)
    base = fused_lora.merge_and_unload(model)
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear
    assert_results_within_torch_error(y, low, ref, "patched ")
    assert_results_within_torch_error(run(base, (ids,), call=call), low, ref, "unloaded ")


def test_merged_state_dict_loads_as_merged():
    # A merged layer's W holds s B A: its state must not load into an unmerged layer as a plain W (s B A twice).
    merged = _layer()
    x = torch.randn(5, 48)
    y = merged(x)
    merged_torch, ref = _merged_references(merged, x)
    merged.merge()
    fresh = _layer(seed=1)
    fresh.load_state_dict(merged.state_dict())
    assert fresh.merged
    assert_within_torch_error("unmerged y", y, merged_torch, ref, torch.float32)
    assert_within_torch_error("loaded merged y", fresh(x), merged_torch, ref, torch.float32)
    fresh.unmerge()
    merged.unmerge()
    fresh.load_state_dict(merged.state_dict())
    assert not fresh.merged


def test_state_dict_without_the_merged_flag_loads_strictly():
    """Checkpoints from before the flag existed: strict load works and the layer is unmerged."""
    source = _layer()
    old_state = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    target = _layer(seed=1)
    target.merge()
    target.load_state_dict(old_state)  # strict: no missing-key error for _extra_state
    assert not target.merged
    x = torch.randn(5, 48)
    # Exact: the strict load gave target source's W, b, A and B, both unmerged: the same ops in the same order.
    assert torch.equal(target(x), source(x))
    lora_only = {k: v for k, v in old_state.items() if "lora_" in k}
    target.merge()
    target.load_state_dict(lora_only, strict=False)  # W not loaded: still merged
    assert target.merged


def test_save_adapter_of_merged_model_loads_in_peft(tmp_path):
    # The file holds lora_A / lora_B (the merge lives in W, which an adapter file does not carry): loaded
    # onto the original base it gives the unmerged outputs.
    from peft import PeftModel
    from peft_parity import inputs, tiny_llama
    model = fused_lora.inject(tiny_llama().eval(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, fused_lora.LoRALinear):
                layer.lora_B.normal_(std=0.02)
    ids, _ = inputs()
    call = lambda m, ids: m(input_ids=ids).logits
    y = run(model, (ids,), call=call)
    for layer in model.modules():
        if isinstance(layer, fused_lora.LoRALinear):
            layer.merge()
    fused_lora.save_adapter(model, tmp_path)
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    # PEFT's unmerged model is the plain-torch computation of the unmerged outputs y.
    low, ref = torch_and_fp64(peft, (ids,), call=call)
    assert_results_within_torch_error(y, low, ref)
