"""LoRAEmbedding (an nn.Embedding drop-in), inject / merge_and_unload on embeddings, tied embeddings."""
import copy

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import LoRAEmbedding
from numerics import assert_module_within_torch_error, assert_within_torch_error, torch_and_fp64


class TiedLM(nn.Module):
    """embed_tokens and lm_head sharing one weight, as tie_word_embeddings does."""

    def __init__(self, V=30, D=16):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D, padding_idx=0)
        self.proj = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.proj(self.embed_tokens(ids))))


def _randomize(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_embedding_A.copy_(torch.randn(layer.lora_embedding_A.shape, generator=g))
        layer.lora_embedding_B.copy_(torch.randn(layer.lora_embedding_B.shape, generator=g) * 0.1)


def test_new_layer_computes_the_base_layer():
    layer = LoRAEmbedding(20, 8, padding_idx=3, r=4, lora_alpha=8)
    ids = torch.randint(0, 20, (3, 5))
    # A is zero at init (PEFT's embedding init): E[ids] + s * 0 B^T is E[ids] exactly.
    assert torch.equal(layer(ids), nn.functional.embedding(ids, layer.weight))
    assert not layer.weight.requires_grad and layer.lora_embedding_A.requires_grad
    assert layer.scaling == 2.0 and LoRAEmbedding(20, 8, r=4, lora_alpha=8, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_and_grads_within_torch_error(dtype):
    layer = LoRAEmbedding(25, 12, padding_idx=2, r=3, lora_alpha=6, dtype=dtype)
    _randomize(layer)
    ids = torch.randint(0, 25, (4, 6))
    ids[0, :4] = 2
    assert_module_within_torch_error(layer, layer, (ids,), grads=True)


def test_from_embedding_shares_and_freezes_the_weight():
    base = nn.Embedding(10, 4, padding_idx=1, scale_grad_by_freq=True).eval()
    layer = LoRAEmbedding.from_embedding(base, r=2)
    assert layer.weight is base.weight and not base.weight.requires_grad
    assert layer.padding_idx == 1 and layer.scale_grad_by_freq and not layer.training
    with pytest.raises(TypeError, match="expects an nn.Embedding, got Linear"):
        LoRAEmbedding.from_embedding(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="max_norm=1.0 is not supported"):
        LoRAEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="sparse=True is not supported"):
        LoRAEmbedding(10, 4, sparse=True)
    with pytest.raises(ValueError, match="r=0"):
        LoRAEmbedding(10, 4, r=0)

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2

    with pytest.raises(TypeError, match="overrides forward"):
        LoRAEmbedding.from_embedding(Scaled(10, 4))


def test_merge_unmerge_and_state():
    layer = LoRAEmbedding(15, 6, r=3, lora_alpha=3)
    _randomize(layer)
    ids = torch.arange(15)
    low, ref64 = torch_and_fp64(layer, (ids,))  # the unmerged layer: reference backend, and its fp64 copy
    weight = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_within_torch_error("merged y", layer(ids), low["y"], ref64["y"], torch.float32)
    state = layer.state_dict()
    other = LoRAEmbedding(15, 6, r=3, lora_alpha=3)
    other.load_state_dict(state)
    assert other.merged  # the merged flag travels with the merged weight
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    delta = layer._delta_fp32()
    assert_within_torch_error("unmerged E", layer.weight.detach(), (weight + delta) - delta, weight.double(),
                              torch.float32)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_inject_targets_embeddings_by_name_and_regex_not_all_linear():
    model = TiedLM()
    fused_lora.inject(model, ["embed_tokens", "proj"], r=4, lora_alpha=8)
    assert isinstance(model.embed_tokens, LoRAEmbedding) and isinstance(model.proj, fused_lora.LoRALinear)
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    assert params == {"embed_tokens.lora_embedding_A", "embed_tokens.lora_embedding_B", "proj.lora_A", "proj.lora_B"}
    regex = fused_lora.inject(TiedLM(), r"embed_.*", r=2)
    assert isinstance(regex.embed_tokens, LoRAEmbedding)
    all_linear = fused_lora.inject(TiedLM(), "all-linear", r=2)
    assert type(all_linear.embed_tokens) is nn.Embedding  # as PEFT: all-linear selects Linear layers only
    with pytest.raises(ValueError, match="already a LoRAEmbedding"):
        fused_lora.inject(model, ["embed_tokens"])
    with pytest.raises(TypeError, match="nn.Linear, transformers Conv1D and nn.Embedding modules only"):
        fused_lora.inject(nn.Sequential(nn.ReLU()), ["0"])


def test_tied_embeddings_behave_as_peft():
    """Only embed_tokens targeted: the LoRA term applies to the input side only, lm_head keeps the shared
    base weight; merging writes E + s (B A)^T into that shared weight, so lm_head changes too (PEFT's
    lora.Embedding.merge does the same in place)."""
    model = TiedLM()
    fused_lora.inject(model, ["embed_tokens"], r=4)
    _randomize(model.embed_tokens)
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 30, (2, 5))
    head_before = model.lm_head.weight.detach().clone()
    fused_lora.merge_and_unload(model)
    assert type(model.embed_tokens) is nn.Embedding and model.lm_head.weight is model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, head_before)
    assert model(ids).shape == (2, 5, 30)


def test_merge_and_unload_matches_unmerged_output():
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4))
    fused_lora.inject(model, ["0", "1"], r=2, lora_alpha=4)
    _randomize(model[0])
    with torch.no_grad():
        model[1].lora_B.normal_()
    ids = torch.randint(0, 20, (3, 7))
    low, ref64 = torch_and_fp64(model, (ids,))
    merged = fused_lora.merge_and_unload(copy.deepcopy(model))
    assert type(merged[0]) is nn.Embedding and type(merged[1]) is nn.Linear
    assert_within_torch_error("merged y", merged(ids), low["y"], ref64["y"], torch.float32)


def test_module_compiles_fullgraph():
    layer = LoRAEmbedding(20, 8, padding_idx=0, r=2)
    _randomize(layer)
    ids = torch.randint(0, 20, (2, 5))
    eager = layer(ids)
    eager.sum().backward()
    grads = (layer.lora_embedding_A.grad.clone(), layer.lora_embedding_B.grad.clone())
    layer.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(ids)
    y.sum().backward()
    assert torch.equal(y, eager)  # the custom op runs the same kernels as the eager Function
    assert torch.equal(layer.lora_embedding_A.grad, grads[0]) and torch.equal(layer.lora_embedding_B.grad, grads[1])
