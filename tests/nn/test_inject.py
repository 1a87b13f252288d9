"""inject: PEFT's target matching on a plain transformers model, freezing, errors that leave the model as it was."""
import peft  # the dev extra installs peft and transformers: missing must fail, not skip
import pytest
import torch
from torch import nn

import fused_lora
from fused_lora.nn.inject import lora_layers, match_targets
from numerics import assert_within_torch_error, fp64_copy, run
from peft_parity import inputs, tiny_gpt2, tiny_llama

LOGITS = lambda model, ids: model(input_ids=ids).logits


def _peft_targets(model, target_modules):
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=target_modules))
    return sorted(peft_model.base_model.targeted_module_names)


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], ["model.layers.1.mlp.down_proj", "o_proj"],
                                            r".*layers\.0\..*_proj", "all-linear"])
def test_matching_equals_peft(target_modules):
    ours = sorted(match_targets(tiny_llama(), target_modules))
    assert ours and ours == _peft_targets(tiny_llama(), target_modules)


def test_all_linear_excludes_output_head_and_takes_conv1d():
    names = match_targets(tiny_llama(), "all-linear")
    assert len(names) == 14 and "lm_head" not in names
    gpt2_names = match_targets(tiny_gpt2(), "all-linear")
    assert "transformer.h.0.attn.c_attn" in gpt2_names and "lm_head" not in gpt2_names


def test_inject_replaces_freezes_and_starts_at_base():
    model = tiny_llama().eval()
    base = fp64_copy(model)  # B = 0: the injected model computes the base model's function
    ids, _ = inputs()
    before = model(input_ids=ids).logits
    fused_lora.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True)
    layers = lora_layers(model)
    assert sorted(n for n, _ in layers) == sorted(match_targets(model, ["q_proj", "v_proj"]))
    assert len(layers) == 4 and all(l.r == 4 and l.scaling == 8 / 2 for _, l in layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    # B = 0 makes the LoRA term zero, but the kernels' base GEMM sums in another order than nn.Linear's.
    got = run(model, (ids,), call=LOGITS)["y"]
    assert_within_torch_error("logits", got, before, run(base, (ids,), call=LOGITS)["y"], torch.float32)
    assert model.fused_lora_config.r == 4


def test_inject_regex_and_conv1d():
    model = fused_lora.inject(tiny_gpt2(), r".*\.h\.1\.mlp\.c_fc", r=2)
    layer = model.transformer.h[1].mlp.c_fc
    assert isinstance(layer, fused_lora.LoRALinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (64, 256)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    # Conv1D stores W as (in, out): y = x W + b.
    expected = lambda x, w, b, a, bb: x @ w + b + layer.scaling * (x @ a.t()) @ bb.t()
    params = (layer.weight, layer.bias, layer.lora_A, layer.lora_B)
    assert_within_torch_error("y", layer(x), expected(x, *params),
                              expected(x.double(), *(p.double() for p in params)), torch.float32)


def test_inject_errors_leave_model_unchanged():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="matched no module"):
        fused_lora.inject(model, ["nonexistent"])
    with pytest.raises(TypeError, match="'model.norm', a LlamaRMSNorm"):  # embeddings are targets now
        fused_lora.inject(model, ["q_proj", "embed_tokens", "norm"])
    with pytest.raises(ValueError, match="not a valid regex"):
        fused_lora.inject(model, "(")
    with pytest.raises(ValueError, match="r must be a positive int"):
        fused_lora.inject(model, ["q_proj"], r=0)
    assert not any(isinstance(m, fused_lora.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fused_lora.inject(model, ["q_proj"])
    with pytest.raises(ValueError, match="already a LoRALinear"):
        fused_lora.inject(model, "all-linear")


def test_inject_plain_torch_model():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fused_lora.inject(model, "all-linear", r=2)  # no transformers head: every Linear, as PEFT
    assert all(isinstance(model[i], fused_lora.LoRALinear) for i in (0, 2))
    model(torch.randn(5, 8)).sum().backward()
    assert model[0].lora_A.grad is not None and model[0].weight.grad is None
