"""save_adapter / load_adapter against PEFT's own save_pretrained and PeftModel.from_pretrained."""
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel  # the dev extra installs peft and safetensors: missing must fail, not skip
from safetensors.torch import load_file, save_file

import fused_lora
from fused_lora.integrations.adapter_files import AdapterFormatError
from fused_lora.nn.inject import lora_layers
from numerics import assert_module_within_torch_error
from peft_parity import inputs, peft_model, randomize_lora, tiny_gpt2, tiny_llama


def _assert_logits_match_peft(model, peft, ids):
    """model's logits (the fused kernels) against PEFT's model in fp64; the baseline: PEFT's logits at fp32."""
    assert_module_within_torch_error(model, peft, (ids,), call=lambda m, ids: m(input_ids=ids).logits)


def _peft_lora(model):
    """{module path: (A, B, scaling)} of a PEFT model's default adapter."""
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"])
    return out


def _assert_same_adapter(ours, peft):
    layers = dict(lora_layers(ours))
    theirs = _peft_lora(peft)
    assert sorted(layers) == sorted(theirs)
    for name, (a, b, s) in theirs.items():
        assert torch.equal(layers[name].lora_A, a) and torch.equal(layers[name].lora_B, b)
        assert layers[name].scaling == s, name


def _randomize(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / layer.in_features ** 0.5)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)


def test_save_adapter_loads_in_peft(tmp_path):
    model = tiny_llama().eval()
    fused_lora.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True)
    fused_lora.inject(model, ["down_proj"], r=8, lora_alpha=32, use_rslora=True)  # -> rank/alpha patterns
    _randomize(model)
    fused_lora.save_adapter(model, tmp_path, task_type="CAUSAL_LM")
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True and config["r"] == 4
    assert config["rank_pattern"] == {f"model.layers.{i}.mlp.down_proj": 8 for i in range(2)}
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state and len(state) == 12
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    _assert_same_adapter(model, peft)
    ids, _ = inputs()
    _assert_logits_match_peft(model, peft, ids)


@pytest.mark.parametrize("into", ["plain", "injected"])
def test_peft_adapter_loads(tmp_path, into):
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05, use_rslora=True,
                        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 16},
                        alpha_pattern={"model.layers.1.mlp.up_proj": 3})
    peft = peft_model(tiny_llama(), config).eval()
    peft.save_pretrained(tmp_path)
    model = tiny_llama().eval()
    if into == "injected":
        fused_lora.inject(model, "all-linear", r=8)
        with torch.no_grad():
            for name, layer in lora_layers(model):
                r = 4 if name.endswith("q_proj") else 16 if name == "model.layers.1.mlp.down_proj" else 8
                if r != layer.r:  # an injected model must have the adapter's ranks
                    layer.r, layer.lora_A, layer.lora_B = r, torch.nn.Parameter(layer.lora_A.new_zeros(r, layer.in_features)), \
                        torch.nn.Parameter(layer.lora_B.new_zeros(layer.out_features, r))
    fused_lora.load_adapter(model, tmp_path)
    _assert_same_adapter(model, peft)
    assert all(layer.lora_dropout == 0.05 for _, layer in lora_layers(model))
    ids, _ = inputs()
    _assert_logits_match_peft(model, peft, ids)
    fused_lora.save_adapter(model, tmp_path / "again")  # and back out: the same tensors, read as PEFT read its own
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "adapter_model.safetensors")
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in theirs)
    peft_again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").eval()
    # Exact: two PEFT models on the same base (same seed) with equal adapter tensors: same ops, same order.
    assert torch.equal(peft_again(input_ids=ids).logits, peft(input_ids=ids).logits)


def test_peft_fan_in_fan_out_adapter_loads(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])
    peft = peft_model(tiny_gpt2(), config).eval()
    peft.save_pretrained(tmp_path)
    model = fused_lora.load_adapter(tiny_gpt2().eval(), tmp_path)
    assert all(layer.fan_in_fan_out for _, layer in lora_layers(model))
    _assert_same_adapter(model, peft)
    ids, _ = inputs()
    _assert_logits_match_peft(model, peft, ids)
    fused_lora.save_adapter(model, tmp_path / "ours")
    assert json.load(open(tmp_path / "ours" / "adapter_config.json"))["fan_in_fan_out"] is True
    peft2 = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    # Exact: two PEFT models on the same base (same seed) with equal adapter tensors (model's, which equal peft's:
    # checked above): the same ops in the same order.
    assert torch.equal(peft2(input_ids=ids).logits, peft(input_ids=ids).logits)


def _peft_dir(tmp_path, **config):
    peft = peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config))
    peft.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    config = json.load(open(path / "adapter_config.json"))
    config.update(changes)
    json.dump(config, open(path / "adapter_config.json", "w"))


def _edit_state(path, edit):
    state = load_file(path / "adapter_model.safetensors")
    edit(state)
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"

REJECTIONS = {
    # DoRA without magnitudes: a missing key (plain model), or LoRALinear layers without DoRA (injected).
    "dora": (lambda p: _edit_config(p, use_dora=True), "adapter_config.json has use_dora=true"),
    "use_dora type": (lambda p: _edit_config(p, use_dora="yes"), "use_dora='yes'; expected true or false"),
    "bias": (lambda p: _edit_config(p, bias="all"), "bias='all'"),
    "modules_to_save": (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save"),
    "peft_type": (lambda p: _edit_config(p, peft_type="IA3"), "peft_type='IA3'"),
    "pissa": (lambda p: _edit_config(p, init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    "rank": (lambda p: _edit_config(p, r=8), f"{Q0}.lora_A.weight has rank 4 but adapter_config.json gives r=8"),
    "missing": (lambda p: _edit_state(p, lambda s: [s.pop(k) for k in list(s) if ".layers.1.self_attn.v_proj" in k]),
                "missing keys"),
    "half missing": (lambda p: _edit_state(p, lambda s: s.pop(f"{Q0}.lora_B.weight")),
                     f"missing key {Q0}.lora_B.weight"),
    "unexpected": (lambda p: _edit_state(p, lambda s: s.update({"base_model.model.lm_head.modules_to_save.weight":
                                                                 torch.zeros(2)})), "unexpected key"),
    "magnitude": (lambda p: _edit_state(p, lambda s: s.update({f"{Q0}.lora_magnitude_vector": torch.ones(64)})),
                  f"unexpected key {Q0}.lora_magnitude_vector: a DoRA magnitude, but adapter_config.json has "
                  f"use_dora=False"),
    "shape": (lambda p: _edit_state(p, lambda s: s.update({f"{Q0}.lora_A.weight": torch.zeros(4, 32),
                                                           f"{Q0}.lora_B.weight": torch.zeros(64, 4)})),
              "shape mismatch for 'model.layers.0.self_attn.q_proj'"),
    "dtype": (lambda p: _edit_state(p, lambda s: s.update({f"{Q0}.lora_A.weight": torch.zeros(4, 64, dtype=torch.int32)})),
              "dtype torch.int32"),
    "nan": (lambda p: _edit_state(p, lambda s: s[f"{Q0}.lora_B.weight"].fill_(float("nan"))), "NaN or inf"),
    "bin": (lambda p: os.rename(p / "adapter_model.safetensors", p / "adapter_model.bin"), "adapter_model.bin found"),
    # Checked before any layer changes: these used to fail half-way through loading.
    "alpha_pattern value": (lambda p: _edit_config(p, alpha_pattern={"v_proj": "16"}),
                            "alpha_pattern['v_proj']='16'; expected a finite number"),
    "alpha_pattern nan": (lambda p: _edit_config(p, alpha_pattern={"v_proj": float("nan")}), "alpha_pattern['v_proj']=nan"),
    "target_modules type": (lambda p: _edit_config(p, target_modules=5), "target_modules=5; expected a list"),
    "rank_pattern regex": (lambda p: _edit_config(p, rank_pattern={"(q_proj": 4}), "rank_pattern key '(q_proj' is not a valid regex"),
    "rank_pattern value": (lambda p: _edit_config(p, rank_pattern={"q_proj": 4.0}), "rank_pattern['q_proj']=4.0; expected a positive int"),
    "use_rslora": (lambda p: _edit_config(p, use_rslora="yes"), "use_rslora='yes'; expected true or false"),
    "json": (lambda p: (p / "adapter_config.json").write_text("{not json"), "is not valid JSON"),
    "corrupt file": (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage"),
                     "is not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
@pytest.mark.parametrize("into", ["plain", "injected"])
def test_rejections_leave_model_untouched(tmp_path, case, into):
    path = _peft_dir(tmp_path)
    edit, message = REJECTIONS[case]
    edit(path)
    model = tiny_llama()
    if into == "injected":
        fused_lora.inject(model, ["q_proj", "v_proj"], r=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    with pytest.raises(AdapterFormatError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        fused_lora.load_adapter(model, path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


def test_unknown_config_keys_are_tolerated(tmp_path):
    # PEFT adds LoraConfig fields across versions; a field fused_lora does not know must not stop a load.
    path = _peft_dir(tmp_path)
    _edit_config(path, some_future_field={"x": 1}, another_new_flag=None)
    model = fused_lora.load_adapter(tiny_llama().eval(), path)
    peft = PeftModel.from_pretrained(tiny_llama(), _peft_dir(tmp_path / "clean")).eval()
    ids, _ = inputs()
    _assert_logits_match_peft(model, peft, ids)


def test_injected_set_must_equal_file(tmp_path):
    path = _peft_dir(tmp_path)
    model = fused_lora.inject(tiny_llama(), ["q_proj", "v_proj", "k_proj"], r=4)
    with pytest.raises(AdapterFormatError, match="missing keys.*k_proj"):
        fused_lora.load_adapter(model, path)
    model = fused_lora.inject(tiny_llama(), ["q_proj"], r=4)
    with pytest.raises(AdapterFormatError, match="unexpected keys.*v_proj"):
        fused_lora.load_adapter(model, path)


def test_named_adapter_subfolder(tmp_path):
    peft = peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    peft.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_lora(peft)
    peft.save_pretrained(tmp_path, selected_adapters=["other"])
    with pytest.raises(AdapterFormatError, match="named-adapter sub-folders \\['other'\\]"):
        fused_lora.load_adapter(tiny_llama(), tmp_path)
    model = fused_lora.load_adapter(tiny_llama(), tmp_path / "other")
    assert sorted(n for n, _ in lora_layers(model)) == ["model.layers.0.self_attn.v_proj",
                                                          "model.layers.1.self_attn.v_proj"]
