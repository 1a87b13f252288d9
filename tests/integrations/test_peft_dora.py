"""patch_peft and the adapter files with PEFT's DoRA (LoraConfig(use_dora=True)) on a tiny Llama.

``python tests/integrations/test_peft_dora.py`` prints the eval parity table of the README's DoRA section."""
import copy
import json
import os
import sys
import warnings

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the helpers

import pytest
import torch
from peft import LoraConfig, PeftModel

import fused_lora
from fused_lora.integrations import peft_patch
from fused_lora.nn.inject import lora_layers
from fused_lora.ops.dora import DoRALinearFunction
from fused_lora.dropout import draw_seed
from numerics import assert_losses_within_torch_error, assert_results_within_torch_error, lora_backend, \
    run as run_module, \
    torch_and_fp64
from peft_parity import (adamw_losses, count_calls, inputs, lora_linear_layers, peft_model, rel_err, run, tiny_llama,
                         worst_rel_err)

DORA = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
LOGITS = lambda model, ids: model(input_ids=ids).logits


def count_dora_calls():
    return count_calls(DoRALinearFunction)


def _dora_model(dtype=torch.float32, **config):
    """PEFT DoRA model with random A, B (peft_model) and m != n, so every DoRA term and grad is non-trivial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_model(tiny_llama(dtype), LoraConfig(**{**DORA, **config}))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


class SeededDropout(torch.nn.Module):
    """PEFT's dropout with fused_lora's keep-mask: one seed drawn per call from the CPU generator, as the
    fused op draws it, so an unpatched PEFT model applies the masks the patched one does."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return fused_lora.reference.apply_dropout(x, self.p, draw_seed(x.device))


def _as_results(logits_and_grads):
    logits, grads = logits_and_grads
    return {"logits": logits, **grads}


def eval_parity(dtype):
    """(ours, PEFT, fp64) results (logits and every grad) of the eval model, and the fused call count."""
    model = _dora_model(dtype).eval()
    ids, grad_out = inputs()
    ref = _as_results(run(copy.deepcopy(model).double(), ids, grad_out))
    peft = _as_results(run(model, ids, grad_out))
    fused_lora.patch_peft(model)
    with count_dora_calls() as counter:
        ours = _as_results(run(model, ids, grad_out))
    return ours, peft, ref, counter["calls"], lora_linear_layers(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_parity_with_peft(dtype):
    ours, peft, ref, calls, layers = eval_parity(dtype)
    assert calls == layers == 14  # every DoRA layer ran the fused op once
    assert sum("lora_magnitude_vector" in k for k in ours) == 14
    # Baseline: PEFT unpatched at dtype; exact: its fp64 copy. Logits and every LoRA and magnitude grad.
    assert_results_within_torch_error(ours, peft, ref)


def test_patch_warns_nothing_for_dora_linear():
    model = _dora_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", peft_patch.FusedFallbackWarning)
        fused_lora.patch_peft(model)


def test_dropout_training_matches_peft_with_the_same_masks():
    model = _dora_model(lora_dropout=0.1).train()
    baseline = copy.deepcopy(model)  # unpatched PEFT, its dropout modules drawing fused_lora's masks
    for layer in baseline.modules():
        if hasattr(layer, "lora_dropout") and "default" in getattr(layer, "lora_dropout", {}):
            layer.lora_dropout["default"] = SeededDropout(0.1)
    exact = copy.deepcopy(baseline).double()
    fused_lora.patch_peft(model)
    ids, grad_out = inputs()
    with count_dora_calls() as counter:
        ours = _as_results(run(model, ids, grad_out, seed=1234))
    assert counter["calls"] == lora_linear_layers(model)
    low = _as_results(run(baseline, ids, grad_out, seed=1234))
    ref = _as_results(run(exact, ids, grad_out, seed=1234))
    # Three plain-torch computations of the same layers at fp32: PEFT's, fused_lora.reference's and the op's torch
    # path (the patched model on those backends); the rule takes the largest error. Over dropout seeds 1000-1007
    # the kernels' largest error ratio to PEFT's alone reached 2.2 on some grad, the torch path's 2.7: the
    # spread of one maximum over ~100 grads at fp32, not a bias (mean ratios 0.9-1.2 for both).
    lows = [low]
    for backend in ("reference", "torch"):
        with lora_backend(backend):
            lows.append(_as_results(run(model, ids, grad_out, seed=1234)))
    assert_results_within_torch_error(ours, tuple(lows), ref)


def test_training_loop_same_losses():
    peft = _dora_model()
    patched = copy.deepcopy(peft)
    fused_lora.patch_peft(patched)
    exact = copy.deepcopy(peft).double()
    ids, _ = inputs()
    losses, calls = adamw_losses({"peft": peft, "fused": patched, "fp64": exact}, ids, 3, count_dora_calls)
    assert calls["fused"] == 3 * lora_linear_layers(patched) and calls["peft"] == calls["fp64"] == 0
    assert_losses_within_torch_error("AdamW losses", losses["fused"], losses["peft"], losses["fp64"])


def test_dora_next_to_another_active_adapter_falls_back():
    model = _dora_model(target_modules=["q_proj"])
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "plain"])
    model.eval()
    reference = copy.deepcopy(model)
    with pytest.warns(peft_patch.FusedFallbackWarning, match="uses DoRA with other active adapters"):
        fused_lora.patch_peft(model)
    ids, _ = inputs()
    with count_dora_calls() as counter:
        got = run_module(model, (ids,), call=LOGITS)
    assert counter["calls"] == 0
    low, ref = torch_and_fp64(reference, (ids,), call=LOGITS)
    assert_results_within_torch_error(got, low, ref)


def test_peft_save_loads_into_plain_model(tmp_path):
    peft = _dora_model(target_modules=["q_proj", "v_proj", "down_proj"]).eval()
    peft.save_pretrained(tmp_path)
    model = fused_lora.load_adapter(tiny_llama().eval(), tmp_path)
    layers = lora_layers(model)
    assert len(layers) == 6 and all(layer.use_dora for _, layer in layers)
    for name, layer in layers:  # the file's tensors, unchanged (fp32 into fp32)
        assert torch.equal(layer.lora_magnitude_vector,
                           peft.get_submodule(f"base_model.model.{name}").lora_magnitude_vector["default"].weight)
    ids, _ = inputs()
    low, ref = torch_and_fp64(peft, (ids,), call=LOGITS)
    assert_results_within_torch_error(run_module(model, (ids,), call=LOGITS), low, ref)


def test_save_adapter_loads_in_peft(tmp_path):
    model = fused_lora.inject(tiny_llama().eval(), ["q_proj", "o_proj", "up_proj"], r=4, lora_alpha=8, use_dora=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.02, generator=g)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=g))
    fused_lora.save_adapter(model, tmp_path)
    assert json.load(open(tmp_path / "adapter_config.json"))["use_dora"] is True
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    for name, layer in lora_layers(model):
        assert torch.equal(peft.get_submodule(f"base_model.model.{name}").lora_magnitude_vector["default"].weight,
                           layer.lora_magnitude_vector)
    ids, _ = inputs()
    low, ref = torch_and_fp64(peft, (ids,), call=LOGITS)
    assert_results_within_torch_error(run_module(model, (ids,), call=LOGITS), low, ref)


def test_load_refuses_dora_mismatches(tmp_path):
    from fused_lora.integrations.adapter_files import AdapterFormatError
    _dora_model(target_modules=["q_proj"]).save_pretrained(tmp_path)
    plain = fused_lora.inject(tiny_llama(), ["q_proj"], r=4)
    with pytest.raises(AdapterFormatError, match="use_dora=true but LoRALinear 'model.layers.0.self_attn.q_proj' "
                                                 "has use_dora=False"):
        fused_lora.load_adapter(plain, tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
    state[key] = state[key][:-1]
    save_file(state, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterFormatError, match=f"{key} has shape \\(63,\\); the module expects \\(64,\\)"):
        fused_lora.load_adapter(tiny_llama(), tmp_path)
    del state[key]
    save_file(state, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = tiny_llama()
    with pytest.raises(AdapterFormatError, match=f"missing key {key}: adapter_config.json has use_dora=true"):
        fused_lora.load_adapter(model, tmp_path)
    assert not lora_layers(model)


def main():
    rel, worst = rel_err, worst_rel_err
    print("| dtype | logits ours / PEFT vs fp64 | LoRA grads ours / PEFT vs fp64 (worst) | magnitude grads ours / PEFT "
          "vs fp64 (worst) |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        ours, peft, ref, _, _ = eval_parity(dtype)
        lora = [k for k in ref if "lora_A" in k or "lora_B" in k]
        mags = [k for k in ref if "lora_magnitude_vector" in k]
        print(f"| {str(dtype).replace('torch.', '')} | {rel(ours['logits'], ref['logits']):.1e} / "
              f"{rel(peft['logits'], ref['logits']):.1e} | {worst(ours, ref, lora):.1e} / {worst(peft, ref, lora):.1e} | "
              f"{worst(ours, ref, mags):.1e} / {worst(peft, ref, mags):.1e} |")


if __name__ == "__main__":
    main()
