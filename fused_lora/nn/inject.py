"""inject / merge_and_unload: LoRALinear and LoRAEmbedding layers in any torch model, targeted as PEFT
targets modules.

(Module named ``injection`` so that ``fused_lora.inject`` is unambiguously the function.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .._validation import check_embedding_options, check_lora_config, regex_error
from .embedding import LoRAEmbedding, is_plain_embedding
from .linear import LoRALinear, check_use_dora, is_conv1d

__all__ = ["inject", "merge_and_unload", "lora_layers", "match_targets", "InjectionConfig", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"
# Attribute on the model recording what inject (or load_adapter) did, for save_adapter's config.
CONFIG_ATTR = "fused_lora_config"


@dataclass
class InjectionConfig:
    """What inject / load_adapter put into a model: the defaults save_adapter writes to adapter_config.json."""
    target_modules: list[str] | str
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    module_names: list[str] = field(default_factory=list)
    use_dora: bool = False


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


LORA_LAYERS = (LoRALinear, LoRAEmbedding)


def _output_head_name(model: nn.Module) -> str | None:
    """PEFT's all-linear exclusion: the output embedding of a transformers PreTrainedModel."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if get_output_embeddings is None or not _is_pretrained_model(model):
        return None
    head = get_output_embeddings()
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def _is_pretrained_model(model: nn.Module) -> bool:
    import sys
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel)


def name_matches(target_modules: list[str] | str, name: str) -> bool:
    """PEFT's rule: a str is re.fullmatch'ed; a list entry matches the exact name or a '.'-suffix of it."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{target}") for target in target_modules)


def match_targets(model: nn.Module, target_modules) -> list[str]:
    """Names of the modules ``target_modules`` selects, as PEFT selects them (LoRALinear layers included).

    "all-linear": every nn.Linear / transformers Conv1D, minus the output head of a transformers
    PreTrainedModel (``get_output_embeddings()``), as PEFT's _maybe_include_all_linear_layers does.
    """
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = _output_head_name(model)
        return [name for name, module in model.named_modules()
                if name and name != head and (_is_linear(module) or isinstance(module, LoRALinear))]
    if isinstance(target_modules, str):
        error = regex_error(target_modules)
        if error:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {error}")
    elif not (isinstance(target_modules, (list, tuple, set)) and all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"target_modules must be a list of module names, a regex string or 'all-linear', "
                        f"got {target_modules!r}")
    else:
        target_modules = list(target_modules)
    return [name for name, _ in model.named_modules()
            if name and name_matches(target_modules, name)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, target_modules, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
           use_rslora: bool = False, use_dora: bool = False) -> nn.Module:
    """Replace the matching nn.Linear (and transformers Conv1D) modules in place with LoRALinear, and the
    matching nn.Embedding modules with LoRAEmbedding.

    target_modules: a list of names (exact name or '.'-suffix match), a regex (re.fullmatch on the
    module name), or "all-linear" (every Linear except a transformers model's output head; no embedding,
    as in PEFT). Embeddings get r, lora_alpha and use_rslora; lora_dropout is recorded on them but not
    applied, as PEFT's lora.Embedding does not apply it. A tied output head (lm_head sharing
    embed_tokens' weight) keeps the shared weight and gets no LoRA unless targeted itself, as in PEFT
    without ensure_weight_tying. Every
    parameter outside the LoRA layers gets requires_grad=False, as PEFT does. Raises ValueError when
    nothing matches, TypeError when a match is not a Linear or Embedding, ValueError for an Embedding with
    max_norm or sparse=True, TypeError / ValueError for r, lora_alpha,
    lora_dropout or use_rslora as LoRALinear does; the model is unchanged on error.
    use_dora=True makes DoRA LoRALinear layers (LoRALinear's use_dora); a matched nn.Embedding then raises
    ValueError (LoRAEmbedding has no DoRA).
    """
    check_lora_config(r, lora_alpha, lora_dropout, use_rslora)
    check_use_dora(use_dora)
    names = match_targets(model, target_modules)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
                         f"module names look like {[n for n, _ in model.named_modules() if n][:5]}")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LORA_LAYERS):
            raise ValueError(f"module {name!r} is already a {type(module).__name__} (inject was called on it "
                             f"before)")
        if is_plain_embedding(module):
            check_embedding_options(module.max_norm, module.sparse, where=f"inject, module {name!r}")
            if use_dora:
                raise ValueError(f"use_dora=True: target_modules={target_modules!r} matched {name!r}, an "
                                 f"nn.Embedding; DoRA is supported for nn.Linear and transformers Conv1D only")
        elif not _is_linear(module):
            raise TypeError(f"target_modules={target_modules!r} matched {name!r}, a {type(module).__name__}; "
                            f"inject replaces nn.Linear, transformers Conv1D and nn.Embedding modules only")
    for name in names:
        module = model.get_submodule(name)
        if is_plain_embedding(module):
            layer = LoRAEmbedding.from_embedding(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                 use_rslora=use_rslora)
        else:
            layer = LoRALinear.from_linear(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                           use_rslora=use_rslora, use_dora=use_dora)
        _set_submodule(model, name, layer)
    freeze_base(model)
    previous = getattr(model, CONFIG_ATTR, None)
    if previous is None:
        spec = target_modules if isinstance(target_modules, str) else sorted(target_modules)
        setattr(model, CONFIG_ATTR, InjectionConfig(spec, r, lora_alpha, float(lora_dropout), bool(use_rslora),
                                                    list(names), bool(use_dora)))
    else:  # a second inject: save_adapter writes the full module list and per-module patterns
        previous.module_names.extend(names)
        previous.target_modules = sorted(previous.module_names)
    return model


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False for every parameter except the LoRA layers' lora_A / lora_B (and DoRA magnitudes)."""
    lora_params = {id(p) for _, layer in lora_layers(model)
                   for p in (layer.lora_A, layer.lora_B, getattr(layer, "lora_magnitude_vector", None))}
    for param in model.parameters():
        if id(param) not in lora_params:
            param.requires_grad_(False)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear | LoRAEmbedding]]:
    """(name, layer) of every LoRALinear and LoRAEmbedding of the model."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LORA_LAYERS)]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base weight and return the model with plain Linear layers.

    Injected models: each LoRALinear (merged already or not) becomes the nn.Linear (or Conv1D) it wraps,
    with W + s B A computed in fp32; each LoRAEmbedding the nn.Embedding, with E + s (B A)^T (a tied
    output head sharing E sees the merged E, as with PEFT). Every merge is checked for NaN / inf before any weight changes,
    so a refused merge (ValueError naming the layers) leaves the model as it was.
    PEFT models (patched or not): delegates to PEFT's ``merge_and_unload(safe_merge=True)``, which
    returns PEFT's base model.
    """
    if hasattr(model, "peft_config") and callable(getattr(model, "merge_and_unload", None)):
        return model.merge_and_unload(safe_merge=True)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layer to merge (use inject or load_adapter)")
    broken = []
    for name, layer in layers:
        if not layer.merged:
            try:
                layer.merged_weight()
            except ValueError:
                broken.append(name)
    if broken:
        raise ValueError(f"merging gives NaN or inf weights in {broken}; nothing was merged")
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        _set_submodule(model, name, layer.to_base_layer())
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
