"""LoRALinear(use_dora=True): init, forward / grads against fused_lora.reference.dora_linear, the weight-norm
cache, merge / unmerge, state_dict, inject / merge_and_unload, errors."""
import copy

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora.nn import linear as linear_module
from numerics import (assert_module_within_torch_error, assert_results_within_torch_error, assert_within_torch_error,
                      run, torch_and_fp64)

K, N, R = 24, 16, 4


def _dora(dtype=torch.float32, seed=0, **kwargs):
    """A DoRA layer with B != 0 and m != n, so that every term and gradient is non-trivial."""
    torch.manual_seed(seed)
    layer = fused_lora.LoRALinear(K, N, r=R, lora_alpha=8, use_dora=True, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(N).to(dtype))
    return layer.eval()


class ReferenceDoRA(nn.Module):
    """fused_lora.reference.dora_linear (PEFT's formula in plain torch) on copies of a layer's tensors, with the
    layer's parameter names: the baseline independent of LoRALinear."""

    def __init__(self, layer):
        super().__init__()
        for name in ("weight", "bias", "lora_A", "lora_B", "lora_magnitude_vector"):
            t = getattr(layer, name)
            setattr(self, name, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
        self.layer_t = layer.fan_in_fan_out
        self.scaling, self.p = layer.scaling, layer.lora_dropout

    def forward(self, x, seed=None):
        w = self.weight.t() if self.layer_t else self.weight
        return fused_lora.reference.dora_linear(x, w, self.bias, self.lora_A, self.lora_B, self.scaling,
                                                self.lora_magnitude_vector, dropout_p=self.p,
                                                training=self.training, seed=seed)


def _x(dtype=torch.float32, lead=(2, 3)):
    return torch.randn(*lead, K, generator=torch.Generator().manual_seed(5)).to(dtype).requires_grad_(True)


def test_init_magnitude_is_weight_row_norm():
    torch.manual_seed(0)
    layer = fused_lora.LoRALinear(K, N, r=R, use_dora=True)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B", "lora_magnitude_vector"]
    assert layer.lora_magnitude_vector.shape == (N,) and "use_dora=True" in repr(layer)
    w = layer.weight.detach()
    assert_within_torch_error("m", layer.lora_magnitude_vector.detach(), torch.linalg.vector_norm(w, dim=1),
                              torch.linalg.vector_norm(w.double(), dim=1), torch.float32)
    # B = 0 at init: g = m / n = 1 up to the norm's rounding, so the layer computes the base layer.
    base = nn.Linear(K, N)
    base.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = _x()
    ref = nn.functional.linear(x.double(), w.double(), layer.bias.double())
    assert_within_torch_error("y", layer(x).detach(), base(x).detach(), ref, torch.float32)
    assert fused_lora.LoRALinear(K, N, r=R).lora_magnitude_vector is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_grads_match_reference(dtype):
    # Baseline: the same layer computing fused_lora.reference.dora_linear (plain torch, PEFT's formula) at dtype;
    # the fp64 copy on the reference is the exact result. Grads: x, lora_A, lora_B and the magnitude.
    layer = _dora(dtype)
    assert_module_within_torch_error(layer, ReferenceDoRA(layer), (_x(dtype),), grads=True)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradcheck_fp64(p, monkeypatch):
    # fp64 has no wider reference for the rule: gradcheck instead (as tests/nn/test_training.py for LoRA). In x
    # and m only: n is detached (PEFT), so dy/dA and dy/dB deliberately differ from finite differences.
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")  # the kernels take fp16 / bf16 / fp32
    layer = _dora(torch.float64, lora_dropout=p).train()
    x = _x(torch.float64, lead=(3,))
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_(True)
    fn = lambda x, m: torch.func.functional_call(layer, {"lora_magnitude_vector": m}, (x,), {"seed": 4})
    assert torch.autograd.gradcheck(fn, (x, m))


def test_dropout_training_matches_reference_with_same_seed():
    layer = _dora(lora_dropout=0.25).train()
    call = lambda m, x: m(x, seed=11)  # the reference redraws the same keep-mask from the seed
    got, _, _ = assert_module_within_torch_error(layer, ReferenceDoRA(layer).train(), (_x(),), call=call,
                                                 grads=True)
    assert "grad lora_magnitude_vector" in got


def test_fan_in_fan_out_conv1d():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    layer = fused_lora.LoRALinear.from_linear(Conv1D(N, K), r=R, lora_alpha=8, use_dora=True).eval()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    w = layer.weight.detach().t()  # (out, in)
    assert_within_torch_error("m", layer.lora_magnitude_vector.detach(), torch.linalg.vector_norm(w, dim=1),
                              torch.linalg.vector_norm(w.double(), dim=1), torch.float32)
    assert_module_within_torch_error(layer, ReferenceDoRA(layer), (_x(),), grads=True)
    x = _x().detach()
    y, (low, ref) = run(layer, (x,)), torch_and_fp64(ReferenceDoRA(layer), (x,))
    layer.merge()
    assert_results_within_torch_error(run(layer, (x,)), low, ref, "merged ")
    layer.unmerge()
    assert_results_within_torch_error(y, low, ref, "unmerged ")


@pytest.fixture
def norm_calls(monkeypatch):
    """Counts the layer's weight-norm computations."""
    counter = {"calls": 0}
    original = linear_module.dora_weight_norm

    def counted(*args):
        counter["calls"] += 1
        return original(*args)

    monkeypatch.setattr(linear_module, "dora_weight_norm", counted)
    return counter


def _assert_matches_reference(layer, x, label):
    """The layer's output (cache or not) within the rule of the reference with n computed afresh."""
    got = run(layer, (x,))
    low, ref = torch_and_fp64(ReferenceDoRA(layer), (x,))
    assert_results_within_torch_error(got, low, ref, label)


def test_weight_norm_cache_reuse_and_invalidation(norm_calls):
    layer = _dora()
    norm_calls["calls"] = 0  # _dora changed B after the norm of the init
    x = _x().detach()
    layer(x)
    layer(x)
    assert norm_calls["calls"] == 1  # eval: computed once
    edits = {
        "W": lambda: layer.weight.mul_(1.5),
        "lora_A": lambda: layer.lora_A.add_(0.3),
        "lora_B": lambda: layer.lora_B.mul_(-2.0),
        "set_scaling": lambda: layer.set_scaling(lora_alpha=20),
    }
    for name, edit in edits.items():
        norm_calls["calls"] = 0
        with torch.no_grad():
            edit()
        layer(x)
        layer(x)
        assert norm_calls["calls"] == 1, name
        _assert_matches_reference(layer, x, f"after {name}: ")
    # An edit through .data bumps no version: it is not seen until the cache is cleared.
    norm_calls["calls"] = 0
    layer.lora_B.data.mul_(3.0)
    layer(x)
    assert norm_calls["calls"] == 0
    layer.clear_weight_norm_cache()
    layer(x)
    assert norm_calls["calls"] == 1
    _assert_matches_reference(layer, x, "after clear: ")


def test_weight_norm_cache_across_accumulation_and_steps(norm_calls):
    layer = _dora().train()
    norm_calls["calls"] = 0
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        for micro in range(3):
            layer(_x()).square().sum().backward()
        assert norm_calls["calls"] == step + 1  # one norm per optimizer step, not per micro-batch
        opt.step()
        opt.zero_grad()
    _assert_matches_reference(layer.eval(), _x().detach(), "after the steps: ")


def test_compile_fullgraph_computes_the_norm_each_call():
    layer = _dora()
    compiled = torch.compile(layer, fullgraph=True)
    x = _x().detach()
    assert_module_within_torch_error(compiled, ReferenceDoRA(layer), (x,), params=layer, grads=True)
    with torch.no_grad():
        layer.lora_B.mul_(-2.0)  # no cache inside the graph: the next call sees the new B
    assert_module_within_torch_error(compiled, ReferenceDoRA(layer), (x,), params=layer)


def _merged_baseline(layer, x):
    """Plain torch merging at W's dtype (g (W + s B A) in fp32, cast to W's dtype) applied as nn.Linear."""
    w, a, b = layer.weight.float(), layer.lora_A.float(), layer.lora_B.float()
    n = fused_lora.reference.dora_weight_norm(w, a, b, layer.scaling)
    g = fused_lora.reference.dora_scale(layer.lora_magnitude_vector.float(), n)
    merged = (g[:, None] * (w + layer.scaling * b @ a)).to(layer.weight.dtype)
    return nn.functional.linear(x, merged, layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip_with_a_zero_row(dtype):
    layer = _dora(dtype)
    with torch.no_grad():  # row 3: W = 0 and B = 0, so n = 0 and g = 0 (the output row is the bias)
        layer.weight[3].zero_()
        layer.lora_B[3].zero_()
    x = _x(dtype).detach()
    w0 = layer.weight.detach().clone()
    y = run(layer, (x,))
    low, ref = torch_and_fp64(ReferenceDoRA(layer), (x,))
    assert_results_within_torch_error(y, low, ref, "unmerged ")
    merged_torch = _merged_baseline(layer, x)
    layer.merge()
    assert layer.merged and layer.weight[3].count_nonzero() == 0
    assert_within_torch_error("merged y", layer(x).detach(), merged_torch.detach(), ref["y"], dtype)
    layer.unmerge()
    assert not layer.merged
    # Baseline: the same merge and unmerge in plain torch (fp32, cast to W's dtype after each).
    w, a, b = w0.float(), layer.lora_A.float(), layer.lora_B.float()
    delta = layer.scaling * b @ a
    g = fused_lora.reference.dora_scale(layer.lora_magnitude_vector.float(),
                                        fused_lora.reference.dora_weight_norm(w, a, b, layer.scaling))
    merged = (g[:, None] * (w + delta)).to(dtype).float()
    safe_g = torch.where(g > 0, g, 1.0)[:, None]
    round_trip = torch.where(g[:, None] > 0, merged / safe_g - delta, 0.0).to(dtype)
    assert_within_torch_error("unmerged W", layer.weight.detach(), round_trip, w0.double(), dtype)
    assert torch.equal(layer.weight[3], w0[3])  # g = 0 rows are written back as 0, which they were
    assert_results_within_torch_error(run(layer, (x,)), low, ref, "after round trip ")


def test_merge_refuses_an_unrecoverable_row():
    layer = _dora()
    with torch.no_grad():
        layer.lora_magnitude_vector[2] = 0.0  # g = 0 with W's row 2 nonzero: merging would lose that row
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"DoRA rows \[2\] have scale m / n = 0.*unchanged"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0)
    model = nn.Sequential(_dora(seed=1), layer)
    w_first = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"in \['1'\]; nothing was merged"):
        fused_lora.merge_and_unload(model)
    assert not model[0].merged and torch.equal(model[0].weight, w_first)


def test_state_dict_round_trips_and_merged_state_unmerges():
    layer = _dora()
    x = _x().detach()
    y = run(layer, (x,))
    low, ref = torch_and_fp64(ReferenceDoRA(layer), (x,))
    state = layer.state_dict()
    assert "lora_magnitude_vector" in state
    fresh = _dora(seed=3)
    fresh.load_state_dict(state)
    # Exact: the same tensors, both unmerged: the same ops in the same order.
    assert torch.equal(fresh(x), layer(x))
    layer.merge()
    merged_state = layer.state_dict()
    assert merged_state["_extra_state"].shape == (N,)  # n at merge, which unmerge divides by
    fresh = _dora(seed=3)
    fresh.load_state_dict(merged_state)
    assert fresh.merged
    assert_results_within_torch_error(run(fresh, (x,)), low, ref, "loaded merged ")
    fresh.unmerge()
    assert_results_within_torch_error(run(fresh, (x,)), low, ref, "loaded, unmerged ")
    assert_results_within_torch_error(y, low, ref, "original ")


def test_inject_and_merge_and_unload():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, 32), nn.Tanh(), nn.Linear(32, 8)).eval()
    fused_lora.inject(model, "all-linear", r=2, lora_alpha=4, use_dora=True)
    assert all(isinstance(model[i], fused_lora.LoRALinear) and model[i].use_dora for i in (0, 2))
    assert model.fused_lora_config.use_dora
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"{i}.{p}" for i in (0, 2) for p in ("lora_A", "lora_B", "lora_magnitude_vector")]
    with torch.no_grad():
        for i in (0, 2):
            model[i].lora_B.normal_(std=0.1)
            model[i].lora_magnitude_vector.mul_(1.1)
    x = _x().detach()
    y = run(model, (x,))
    low, ref = torch_and_fp64(model, (x,))
    fused_lora.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert_results_within_torch_error(y, low, ref, "DoRA model ")
    assert_results_within_torch_error(run(model, (x,)), low, ref, "unloaded ")


def test_errors():
    with pytest.raises(TypeError, match="use_dora must be True or False, got 'yes'"):
        fused_lora.LoRALinear(K, N, use_dora="yes")
    with pytest.raises(TypeError, match="use_dora"):
        fused_lora.LoRALinear.from_linear(nn.Linear(K, N), use_dora=1)
    model = nn.Sequential(nn.Embedding(10, K), nn.Linear(K, N))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="use_dora=True.*'0', an nn.Embedding"):
        fused_lora.inject(model, ["0", "1"], use_dora=True)
    with pytest.raises(TypeError, match="use_dora"):
        fused_lora.inject(model, ["1"], use_dora=None)
    assert type(model[1]) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    layer = _dora()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
