"""Parity of patch_peft against PEFT on tiny transformers models (no download), per LoRA config.

For each config: the PEFT model unpatched at its own dtype (PEFT's result), the same model patched
(ours), the patched model computing with fused_lora.reference at the same dtype (the op the kernels
compute, ranks stacked, in plain torch), and an fp64 copy unpatched (the reference). Reported per
config: the max relative error (max |a - b| / max |b|) of the logits and of the LoRA grads (worst
LoRA parameter), ours vs PEFT, and ours / PEFT vs fp64. The loss is sum(logits * G) for a fixed
random G, so every logit direction is checked.

    TRITON_INTERPRET=1 python tests/peft_parity.py      # prints the table (kernels in the interpreter)

The tests (tests/integrations/test_peft_patch.py) assert the bound per tensor; the rule is written there.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from dataclasses import dataclass

import torch

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fused_lora
from fused_lora.integrations import peft_patch
from fused_lora._validation import ALL_DTYPES

BATCH, SEQ, VOCAB = 2, 8, 128


def tiny_llama(dtype=torch.float32, *, bias=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(config)
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(std=0.1)
    return model.to(dtype)


def tiny_gpt2(dtype=torch.float32, *, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "ln" not in name:
                p.normal_(std=0.1)
    return model.to(dtype)


def randomize_lora(model, seed=1):
    """PEFT inits B = 0; random A and B make every LoRA term and gradient non-trivial.

    A ~ N(0, 1/in) (PEFT's kaiming-uniform A has that scale), B ~ N(0, 0.02^2): s B A is then about a
    quarter of W (N(0, 0.02^2) in these models), the size a trained adapter reaches.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def peft_model(base, lora_config, *, extra_adapters=(), autocast_adapter_dtype=True):
    from peft import get_peft_model
    model = get_peft_model(base, lora_config, autocast_adapter_dtype=autocast_adapter_dtype)
    for name, config in extra_adapters:
        model.add_adapter(name, config)
    if extra_adapters:
        model.base_model.set_adapter(["default"] + [name for name, _ in extra_adapters])
    randomize_lora(model)
    return model


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    grad_out = torch.randn(BATCH, SEQ, VOCAB, generator=g)
    return ids, grad_out


def lora_params(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name and p.requires_grad}


def run(model, ids, grad_out, *, seed=None):
    """Logits and LoRA grads of sum(logits * grad_out)."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    logits = model(input_ids=ids).logits
    (logits.double() * grad_out.double()).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in lora_params(model).items()}
    return logits.detach(), grads


@contextlib.contextmanager
def count_calls(function):
    """Counts calls of a fused op's eager path (its autograd.Function), so a test can tell a patched layer
    that fused from one that fell back to PEFT's forward or ran the reference."""
    counter = {"calls": 0}
    original = function.apply

    def apply(*args):
        counter["calls"] += 1
        return original(*args)

    function.apply = apply
    try:
        yield counter
    finally:
        del function.apply  # back to torch.autograd.Function.apply


def count_fused_calls():
    """count_calls of the fused Linear op's autograd.Function."""
    from fused_lora.ops.linear import LoRALinearFunction
    return count_calls(LoRALinearFunction)


def causal_lm_loss(model, ids):
    """HF's causal-LM loss (next-token cross entropy, mean over tokens) at the model's dtype; labels=ids would
    cast the logits to fp32, making the fp64 run's loss and its gradient fp32."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def adamw_losses(models: dict, ids, steps: int, counter) -> tuple[dict, dict]:
    """({name: per-step losses}, {name: calls counted}) of ``steps`` AdamW steps (lr 1e-2) on each model in
    train mode, with ``counter()`` (count_calls of an op's Function) counting its fused calls."""
    losses, calls = {}, {}
    for key, m in models.items():
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses[key] = []
        with counter() as counted:
            for _ in range(steps):
                loss = causal_lm_loss(m, ids)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[key].append(loss.item())
        calls[key] = counted["calls"]
    return losses, calls


def lora_linear_layers(model) -> int:
    from peft.tuners.lora.layer import Linear
    return sum(isinstance(m, Linear) for m in model.modules())


@contextlib.contextmanager
def reference_lora():
    """Patched layers compute with fused_lora.reference.lora_linear (and accept fp64), same seeds."""
    saved = peft_patch.lora_linear, peft_patch.FUSED_DTYPES
    peft_patch.lora_linear, peft_patch.FUSED_DTYPES = fused_lora.reference.lora_linear, ALL_DTYPES
    try:
        yield
    finally:
        peft_patch.lora_linear, peft_patch.FUSED_DTYPES = saved


def rel_err(value, ref) -> float:
    value, ref = value.double(), ref.double()
    scale = ref.abs().max().item()
    return (value - ref).abs().max().item() / scale if scale else (value - ref).abs().max().item()


def worst_rel_err(got: dict, ref: dict, keys) -> float:
    """The largest rel_err over ``keys`` of two {name: tensor} dicts (the parity tables' worst grad)."""
    return max(rel_err(got[k], ref[k]) for k in keys)


@dataclass
class Parity:
    name: str
    dtype: torch.dtype
    ours: tuple     # (logits, grads) patched
    peft: tuple     # (logits, grads) PEFT, or our reference at the same dtype (training with dropout)
    same_op: tuple  # (logits, grads) patched, fused_lora.reference at the same dtype
    ref: tuple      # (logits, grads) fp64
    baseline: str = "PEFT"
    fused_calls: int = 0  # fused-op calls during the patched run
    lora_layers: int = 0  # PEFT LoRA Linear layers in the model: each should make one fused call

    def figures(self) -> dict:
        def worst(grads_a, grads_b):
            return max(rel_err(grads_a[k], grads_b[k]) for k in grads_b)
        (lo, go), (lp, gp), (lr, gr) = self.ours, self.peft, self.ref
        return {"logits_vs_peft": rel_err(lo, lp), "grads_vs_peft": worst(go, gp),
                "logits_ours_vs_fp64": rel_err(lo, lr), "logits_peft_vs_fp64": rel_err(lp, lr),
                "grads_ours_vs_fp64": worst(go, gr), "grads_peft_vs_fp64": worst(gp, gr),
                "worst_ratio": self.worst_ratio()}

    def worst_ratio(self) -> tuple[float, str]:
        """The largest (our error - half an ulp) / baseline error over the logits and every LoRA grad, each against
        fp64 (the quantity test_peft_patch bounds by its FACTOR), and the tensor where it occurs."""
        from numerics import atol_for, max_err
        (lo, go), (lp, gp), (ls, gs), (lr, gr) = self.ours, self.peft, self.same_op, self.ref
        worst = (0.0, "")
        for name, ours, peft, same_op, ref in [("logits", lo, lp, ls, lr)] + [(k, go[k], gp[k], gs[k], gr[k])
                                                                               for k in gr]:
            baseline = max(max_err(peft, ref), max_err(same_op, ref))
            if baseline:
                worst = max(worst, ((max_err(ours, ref) - atol_for(ref, self.dtype)) / baseline, name))
        return worst


def _configs():
    from peft import LoraConfig
    base = dict(r=8, lora_alpha=16, target_modules="all-linear")
    return {
        "default (r=8, alpha=16)": (tiny_llama, LoraConfig(**base), {}),
        "rsLoRA": (tiny_llama, LoraConfig(**base, use_rslora=True), {}),
        "dropout 0.1, eval": (tiny_llama, LoraConfig(**base, lora_dropout=0.1), {}),
        "two active adapters": (tiny_llama, LoraConfig(**base),
                                {"extra_adapters": [("second", LoraConfig(r=4, lora_alpha=32,
                                                                          target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"]))]}),
        "rank_pattern + alpha_pattern": (tiny_llama, LoraConfig(
            **base, rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 16},
            alpha_pattern={"v_proj": 64, "o_proj": 3}), {}),
        "base bias": (lambda dtype: tiny_llama(dtype, bias=True), LoraConfig(**base), {}),
        "fan_in_fan_out (GPT-2 Conv1D)": (tiny_gpt2, LoraConfig(r=8, lora_alpha=16, fan_in_fan_out=True,
                                                                target_modules=["c_attn", "c_proj", "c_fc"]), {}),
        "bf16 base, fp32 adapters": (torch.bfloat16, LoraConfig(**base), {}),
        "bf16 base, bf16 adapters": (torch.bfloat16, LoraConfig(**base), {"autocast_adapter_dtype": False}),
        "fp16 base, fp32 adapters": (torch.float16, LoraConfig(**base), {}),
    }


def parity(name: str) -> Parity:
    """Runs one config of _configs() in eval mode: patched, PEFT and the reference at the same dtype, PEFT in fp64."""
    make, config, kwargs = _configs()[name]
    dtype = torch.float32
    if isinstance(make, torch.dtype):  # a Llama at that dtype
        make, dtype = tiny_llama, make
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and the like
        model = peft_model(make(dtype), config, **kwargs).eval()
    ids, grad_out = inputs()
    reference = copy.deepcopy(model).double()
    ref = run(reference, ids, grad_out)
    peft_result = run(model, ids, grad_out)
    fused_lora.patch_peft(model)
    with count_fused_calls() as counter:
        ours = run(model, ids, grad_out)
    with reference_lora():
        same_op = run(model, ids, grad_out)
    fused_lora.unpatch_peft(model)
    return Parity(name, dtype, ours, peft_result, same_op, ref, fused_calls=counter["calls"],
                  lora_layers=lora_linear_layers(model))


def dropout_training_parity(p=0.1, seed=1234) -> Parity:
    """Training with dropout: patched (kernels) vs patched with the reference at fp32, same seeds; fp64 ref."""
    from peft import LoraConfig
    model = peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules="all-linear"))
    model.train()
    fused_lora.patch_peft(model)
    reference = copy.deepcopy(model).double()
    ids, grad_out = inputs()
    with count_fused_calls() as counter:
        ours = run(model, ids, grad_out, seed=seed)
    with reference_lora():
        low = run(model, ids, grad_out, seed=seed)
        ref = run(reference, ids, grad_out, seed=seed)
    return Parity(f"dropout {p}, training (vs our reference)", torch.float32, ours, low, low, ref,
                  baseline="reference fp32", fused_calls=counter["calls"], lora_layers=lora_linear_layers(model))


def all_parities():
    return [parity(name) for name in _configs()] + [dropout_training_parity()]


def main():
    print(f"tiny LlamaForCausalLM / GPT2LMHeadModel, batch {BATCH} x seq {SEQ}, LoRA on all linear layers; "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
    print("max relative error = max|a - b| / max|b|; grads: worst LoRA parameter")
    header = ("config", "dtype", "logits vs PEFT", "grads vs PEFT", "logits ours/PEFT vs fp64",
              "grads ours/PEFT vs fp64", "worst (ours - atol) / baseline")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for result in all_parities():
        f = result.figures()
        dtype = str(result.dtype).replace("torch.", "")
        baseline = "" if result.baseline == "PEFT" else f" (baseline: {result.baseline})"
        print(f"| {result.name}{baseline} | {dtype} | {f['logits_vs_peft']:.1e} | {f['grads_vs_peft']:.1e} | "
              f"{f['logits_ours_vs_fp64']:.1e} / {f['logits_peft_vs_fp64']:.1e} | "
              f"{f['grads_ours_vs_fp64']:.1e} / {f['grads_peft_vs_fp64']:.1e} | "
              f"{f['worst_ratio'][0]:.2f} ({f['worst_ratio'][1].replace('base_model.model.', '')}) |")


if __name__ == "__main__":
    main()
