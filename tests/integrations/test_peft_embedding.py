"""PEFT's lora.Embedding patched (FusedEmbedding): parity with PEFT on a tiny Llama with embed_tokens targeted
(logits, every LoRA grad, AdamW steps), fallbacks, tied embeddings, adapter files both ways."""
import contextlib
import copy
import os
import sys
import warnings

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the helpers

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fused_lora
from fused_lora.integrations import peft_patch
from numerics import assert_losses_within_torch_error, assert_within_torch_error, fp64_copy
from peft_parity import adamw_losses, count_calls, inputs, reference_lora, run, tiny_llama

TARGETS = ["embed_tokens", "q_proj", "v_proj"]


def count_embedding_calls():
    from fused_lora.ops.embedding import LoRAEmbeddingFunction
    return count_calls(LoRAEmbeddingFunction)


@contextlib.contextmanager
def reference_ops():
    """Patched layers compute with fused_lora.reference (lora_linear and lora_embedding) at the same dtype."""
    saved = peft_patch.lora_embedding
    peft_patch.lora_embedding = fused_lora.reference.lora_embedding
    try:
        with reference_lora():
            yield
    finally:
        peft_patch.lora_embedding = saved


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize(model, seed=1):
    """PEFT inits lora_embedding_A = 0 (and lora_B = 0): random values make every term and grad non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "lora_embedding_B" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def _model(dtype=torch.float32, *, config=None, autocast_adapter_dtype=True, **llama):
    base = tiny_llama(dtype, **llama)
    model = get_peft_model(base, config or LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                           autocast_adapter_dtype=autocast_adapter_dtype)
    _randomize(model)
    return model.eval()


CONFIGS = {"fp32": (torch.float32, True), "bf16": (torch.bfloat16, False), "bf16-base-fp32-adapters": (torch.bfloat16, True)}


def embedding_parity(dtype, autocast):
    """{run: (logits, grads)} of the patched model ("fused"), PEFT ("peft"), the patched model on
    fused_lora.reference at the same dtype ("same_op") and PEFT in fp64 ("fp64")."""
    model = _model(dtype, autocast_adapter_dtype=autocast)
    reference = copy.deepcopy(model).double()
    ids, grad_out = inputs()
    runs = {"peft": run(model, ids, grad_out), "fp64": run(reference, ids, grad_out)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", peft_patch.FusedFallbackWarning)  # nothing falls back
        fused_lora.patch_peft(model)
    assert type(model.base_model.model.model.embed_tokens).__name__ == "FusedEmbedding"
    with count_embedding_calls() as counter:
        runs["fused"] = run(model, ids, grad_out)
    assert counter["calls"] == 1
    with reference_ops():
        runs["same_op"] = run(model, ids, grad_out)
    return runs


@pytest.mark.parametrize("config", list(CONFIGS))
def test_parity_logits_and_every_lora_grad(config):
    dtype, _ = CONFIGS[config]
    runs = embedding_parity(*CONFIGS[config])
    (logits, grads), (peft_logits, peft_grads) = runs["fused"], runs["peft"]
    (same_logits, same_grads), (ref_logits, ref_grads) = runs["same_op"], runs["fp64"]
    # Baselines: PEFT, and the patched model on fused_lora.reference at the same dtype (the op the kernels
    # compute: with fp32 adapters on a bf16 base both run in bf16, where PEFT runs the LoRA terms in fp32).
    assert_within_torch_error("logits", logits, (peft_logits, same_logits), ref_logits, dtype)
    assert any("lora_embedding_A" in k for k in grads) and grads.keys() == peft_grads.keys()
    for name in ref_grads:
        assert_within_torch_error(name, grads[name], (peft_grads[name], same_grads[name]), ref_grads[name],
                                  grads[name].dtype)


def test_adamw_steps_same_losses():
    model = _model()
    patched = fused_lora.patch_peft(copy.deepcopy(model))
    exact = fp64_copy(model)  # PEFT's forward in fp64 (fp64 is not fused)
    ids, _ = inputs()
    losses, calls = adamw_losses({"peft": model, "fused": patched, "fp64": exact}, ids, 4, count_embedding_calls)
    assert calls == {"peft": 0, "fused": 4, "fp64": 0}
    assert losses["peft"][-1] < losses["peft"][0]
    assert_losses_within_torch_error("losses", losses["fused"], losses["peft"], losses["fp64"])


def test_unsupported_embeddings_fall_back_with_a_reason():
    model = _model()
    embed = model.base_model.model.model.embed_tokens.base_layer
    embed.max_norm = 1.0
    with pytest.warns(peft_patch.FusedFallbackWarning, match=r"embed_tokens: the base embedding has max_norm=1.0"):
        fused_lora.patch_peft(model)
    ids, _ = inputs()
    with count_embedding_calls() as counter:
        model(input_ids=ids)
    assert counter["calls"] == 0


def test_disabled_and_merged_adapters_run_peft_forward():
    model = fused_lora.patch_peft(_model())
    reference = _model()
    ids, _ = inputs()
    with count_embedding_calls() as counter, model.disable_adapter(), reference.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)  # both PEFT's base path
    assert counter["calls"] == 0


def test_tied_embeddings_as_peft():
    """tie_word_embeddings with only embed_tokens targeted: lm_head keeps the shared base weight and no LoRA,
    patched as unpatched; merging puts the delta into the shared weight, so the head sees it too."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    base = tiny_llama()
    base.config.tie_word_embeddings = True
    base.tie_weights()
    model = get_peft_model(base, config)
    _randomize(model)
    model.eval()
    head, embed = model.base_model.model.lm_head, model.base_model.model.model.embed_tokens
    assert head.weight is embed.base_layer.weight
    reference = copy.deepcopy(model)
    ids, grad_out = inputs()
    fused_lora.patch_peft(model)
    ref64 = run(copy.deepcopy(reference).double(), ids, grad_out)
    peft_result = run(reference, ids, grad_out)
    ours = run(model, ids, grad_out)
    assert_within_torch_error("logits", ours[0], peft_result[0], ref64[0], torch.float32)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


@pytest.mark.parametrize("save_embedding_layers", [False, True])
def test_peft_adapter_loads_into_plain_model(tmp_path, save_embedding_layers):
    """With save_embedding_layers (PEFT's default when an embedding is targeted) the file also holds the base
    table (<module>.base_layer.weight), loaded into the model as PEFT loads it."""
    model = _model()
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)  # a table other than the model's
    model.save_pretrained(tmp_path, save_embedding_layers=save_embedding_layers)
    plain = fused_lora.load_adapter(tiny_llama(), tmp_path)
    assert isinstance(plain.model.embed_tokens, fused_lora.LoRAEmbedding)
    table = model.base_model.model.model.embed_tokens.base_layer.weight
    assert torch.equal(plain.model.embed_tokens.weight, table) == save_embedding_layers
    if not save_embedding_layers:
        return
    ids, grad_out = inputs()
    ref64 = run(fp64_copy(model), ids, grad_out)
    peft_result = run(model, ids, grad_out)
    ours = run(plain, ids, grad_out)
    assert_within_torch_error("logits", ours[0], peft_result[0], ref64[0], torch.float32)


def test_saved_adapter_loads_into_peft(tmp_path):
    ours = fused_lora.inject(tiny_llama(), TARGETS, r=4, lora_alpha=8)
    _randomize(ours)
    fused_lora.save_adapter(ours, tmp_path)
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    layer = peft.base_model.model.model.embed_tokens
    assert torch.equal(layer.lora_embedding_A["default"], ours.model.embed_tokens.lora_embedding_A)
    assert torch.equal(layer.lora_embedding_B["default"], ours.model.embed_tokens.lora_embedding_B)
    ids, _ = inputs()
    assert_within_torch_error("logits", _logits(ours.eval(), ids), _logits(peft, ids), _logits(fp64_copy(peft), ids),
                              torch.float32)


def test_adapter_file_errors_name_the_key(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    from safetensors.torch import load_file, save_file
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.model.embed_tokens.lora_embedding_B"
    del state[key]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(fused_lora.AdapterFormatError, match=f"missing key {key}"):
        fused_lora.load_adapter(tiny_llama(), tmp_path)


def test_patched_embedding_compiles_fullgraph():
    model = fused_lora.patch_peft(_model())
    layer = model.base_model.model.model.embed_tokens
    ids, _ = inputs()
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, fullgraph=True)(ids), layer(ids))  # same custom op, same kernels


def main():
    """The README's parity table: python tests/integrations/test_peft_embedding.py"""
    from peft_parity import rel_err, worst_rel_err

    worst = worst_rel_err
    print("| config | logits vs PEFT | LoRA grads vs PEFT (worst / embedding) | logits ours / PEFT vs fp64 | "
          "grads ours / PEFT vs fp64 | embedding grads ours / PEFT vs fp64 |")
    print("|---|---|---|---|---|---|")
    for name, (dtype, autocast) in CONFIGS.items():
        runs = embedding_parity(dtype, autocast)
        (lo, go), (lp, gp), (lr, gr) = runs["fused"], runs["peft"], runs["fp64"]
        emb = [k for k in gr if "lora_embedding" in k]
        print(f"| {name} | {rel_err(lo, lp):.1e} | {worst(go, gp, gr):.1e} / {worst(go, gp, emb):.1e} | "
              f"{rel_err(lo, lr):.1e} / {rel_err(lp, lr):.1e} | {worst(go, gr, gr):.1e} / {worst(gp, gr, gr):.1e} | "
              f"{worst(go, gr, emb):.1e} / {worst(gp, gr, emb):.1e} |")


if __name__ == "__main__":
    main()
