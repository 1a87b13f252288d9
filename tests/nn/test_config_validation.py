"""LoRA hyper-parameters (r, lora_alpha, lora_dropout, use_rslora) and adapter values are refused where the user
gives them (LoRALinear, set_scaling, inject, load_adapter), not at the first forward; inject and load_adapter
leave the model as it was."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fused_lora
from fused_lora import AdapterFormatError, LoRALinear
from fused_lora._validation import MAX_RANK

NAN, INF = float("nan"), float("inf")


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).to(dtype)


def _snapshot(model):
    return {
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {k: p.requires_grad for k, p in model.named_parameters()},
        "config": copy.deepcopy(getattr(model, "fused_lora_config", None)),
        "lora": {name: (m.r, m.lora_alpha, m.lora_dropout, m.use_rslora, m.scaling)
                 for name, m in model.named_modules() if isinstance(m, LoRALinear)},
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["grads"] == before["grads"]
    assert after["config"] == before["config"]
    assert after["lora"] == before["lora"]


def _write_adapter(path, tensors, **config):
    """A PEFT-format adapter for _model()'s Linear "0" (8 -> 6): tensors {"A": (r, 8), "B": (6, r)} in fp32."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False,
              "target_modules": ["0"], "bias": "none", **config}
    path.mkdir(parents=True, exist_ok=True)
    save_file({"base_model.model.0.lora_A.weight": tensors["A"].contiguous(),
               "base_model.model.0.lora_B.weight": tensors["B"].contiguous()},
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _lora_tensors(r, b_value=0.01):
    torch.manual_seed(1)
    return {"A": torch.randn(r, 8) * 0.1, "B": torch.full((6, r), b_value)}


# ---- LoRALinear -----------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [MAX_RANK + 1, 300])
def test_layer_rejects_rank_above_max(r):
    with pytest.raises(ValueError, match=rf"r={r}.*1 <= r <= {MAX_RANK}"):
        LoRALinear(4, 4, r=r)
    with pytest.raises(ValueError, match=rf"r={r}.*1 <= r <= {MAX_RANK}"):
        LoRALinear.from_linear(nn.Linear(4, 4), r=r)
    assert LoRALinear(4, 4, r=MAX_RANK).r == MAX_RANK


@pytest.mark.parametrize("alpha", [NAN, INF, -INF])
def test_layer_rejects_nonfinite_alpha(alpha):
    with pytest.raises(ValueError, match=rf"lora_alpha={alpha!r}.*finite"):
        LoRALinear(4, 4, lora_alpha=alpha)
    with pytest.raises(ValueError, match=rf"lora_alpha={alpha!r}.*finite"):
        LoRALinear.from_linear(nn.Linear(4, 4), lora_alpha=alpha)


@pytest.mark.parametrize("alpha", ["16", True, None])
def test_layer_rejects_alpha_of_wrong_type(alpha):
    with pytest.raises(TypeError, match=r"lora_alpha=.*finite number \(int or float\)"):
        LoRALinear(4, 4, lora_alpha=alpha)


def test_layer_rejects_dropout_given_as_str():
    with pytest.raises(TypeError, match=r"lora_dropout=.0\.1. \(str\).*\[0, 1\)"):
        LoRALinear(4, 4, lora_dropout="0.1")


def test_layer_rejects_non_bool_use_rslora():
    with pytest.raises(TypeError, match=r"use_rslora=.yes. \(str\).*bool"):
        LoRALinear(4, 4, use_rslora="yes")


def test_layer_rejects_scaling_overflowing_float32():
    # The kernels take scaling as a float32 scalar: a finite Python float above float32's range reaches them as inf.
    with pytest.raises(ValueError, match=r"scaling.*float32"):
        LoRALinear(4, 4, r=1, lora_alpha=1e39)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lora_alpha": NAN}, ValueError, r"lora_alpha=nan"),
    ({"lora_alpha": INF}, ValueError, r"lora_alpha=inf"),
    ({"lora_alpha": "16"}, TypeError, r"lora_alpha='16'"),
    ({"use_rslora": "yes"}, TypeError, r"use_rslora='yes'"),
    ({"lora_alpha": 1e39}, ValueError, r"scaling.*float32"),
])
def test_set_scaling_rejects_and_leaves_layer_unchanged(kwargs, error, match):
    layer = LoRALinear(4, 4, r=1, lora_alpha=2)
    with pytest.raises(error, match=match):
        layer.set_scaling(**kwargs)
    assert (layer.lora_alpha, layer.use_rslora, layer.scaling) == (2, False, 2.0)


# ---- inject ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"r": 300}, ValueError, rf"r=300.*1 <= r <= {MAX_RANK}"),
    ({"lora_alpha": NAN}, ValueError, r"lora_alpha=nan.*finite"),
    ({"lora_alpha": INF}, ValueError, r"lora_alpha=inf.*finite"),
    ({"lora_dropout": "0.1"}, TypeError, r"lora_dropout='0\.1' \(str\).*\[0, 1\)"),
    ({"use_rslora": "yes"}, TypeError, r"use_rslora='yes' \(str\).*bool"),
    ({"r": 1, "lora_alpha": 1e39}, ValueError, r"scaling.*float32"),
], ids=["r=300", "alpha=nan", "alpha=inf", "dropout=str", "use_rslora=str", "scaling overflow"])
def test_inject_rejects_bad_config_and_leaves_model_unchanged(kwargs, error, match):
    model = _model()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        fused_lora.inject(model, "all-linear", **kwargs)
    _assert_unchanged(model, before)
    assert not hasattr(model, "fused_lora_config")


# ---- load_adapter ---------------------------------------------------------------------------------

LOAD_REJECTIONS = {
    "r=300": (lambda p: _write_adapter(p, _lora_tensors(300), r=300), rf"r=300; expected .*1 <= r <= {MAX_RANK}"),
    "rank_pattern 300": (lambda p: _write_adapter(p, _lora_tensors(300), rank_pattern={"0": 300}),
                         rf"rank_pattern\['0'\]=300; expected .*1 <= r <= {MAX_RANK}"),
    "scaling overflow": (lambda p: _write_adapter(p, _lora_tensors(4), lora_alpha=1e40),
                         r"module '0'.*scaling.*float32"),
    "alpha_pattern scaling overflow": (lambda p: _write_adapter(p, _lora_tensors(4), alpha_pattern={"0": 1e40}),
                                       r"module '0'.*scaling.*float32"),
}


@pytest.mark.parametrize("case", list(LOAD_REJECTIONS))
def test_load_adapter_rejects_bad_config_and_leaves_model_unchanged(tmp_path, case):
    write, match = LOAD_REJECTIONS[case]
    path = write(tmp_path / "adapter")
    model = _model()
    before = _snapshot(model)
    with pytest.raises(AdapterFormatError, match=match):
        fused_lora.load_adapter(model, path)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("into", ["plain", "injected"])
def test_load_adapter_rejects_values_overflowing_the_model_dtype(tmp_path, into):
    # 1e5 is finite in the fp32 file but above float16's max (65504): cast to the model it would become inf.
    path = _write_adapter(tmp_path / "adapter", _lora_tensors(4, b_value=1e5))
    model = _model(torch.float16)
    if into == "injected":
        fused_lora.inject(model, ["0"], r=4)
    before = _snapshot(model)
    with pytest.raises(AdapterFormatError, match=r"base_model\.model\.0\.lora_B\.weight.*overflows.*float16"):
        fused_lora.load_adapter(model, path)
    _assert_unchanged(model, before)


def test_load_adapter_accepts_values_within_the_model_dtype(tmp_path):
    path = _write_adapter(tmp_path / "adapter", _lora_tensors(4, b_value=6e4))
    model = fused_lora.load_adapter(_model(torch.float16), path)
    assert model[0].lora_B.dtype == torch.float16 and bool(torch.isfinite(model[0].lora_B).all())
