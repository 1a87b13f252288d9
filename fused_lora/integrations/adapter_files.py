"""save_adapter / load_adapter: LoRA adapters in PEFT's on-disk format.

A directory with adapter_config.json (LoraConfig fields, peft_type "LORA") and adapter_model.safetensors
(metadata {"format": "pt"}), keys ``base_model.model.<module path>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r), and for embeddings ``...lora_embedding_A`` (r, num_embeddings) and
``...lora_embedding_B`` (embedding_dim, r) (no ".weight"), and for DoRA (``use_dora: true``) Linear layers
``...lora_magnitude_vector`` (out,) (no ".weight"), as PEFT's save_pretrained writes them for the default
adapter.
load_adapter validates the whole file against the model before it changes anything.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch
from torch import nn

from .._validation import check_lora_config, lora_config_error, regex_error
from ..nn.inject import ALL_LINEAR, CONFIG_ATTR, InjectionConfig, _is_linear, _set_submodule, freeze_base, \
    lora_layers, match_targets, name_matches
from ..nn.embedding import LoRAEmbedding, is_plain_embedding
from ..nn.linear import LoRALinear

__all__ = ["save_adapter", "load_adapter", "AdapterFormatError"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_EMB_A_SUFFIX = ".lora_embedding_A"
_EMB_B_SUFFIX = ".lora_embedding_B"
_MAG_SUFFIX = ".lora_magnitude_vector"  # DoRA's m, (out,): PEFT 0.18 writes it without ".weight"
# The base embedding table, which PEFT's save_pretrained writes for targeted embeddings (save_embedding_layers,
# "auto" by default: on when target_modules holds an embedding) and loads into the base layer.
_TABLE_SUFFIX = ".base_layer.weight"
# (suffix, part, embedding?) of every tensor key load_adapter reads.
_SUFFIXES = ((_A_SUFFIX, "A", False), (_B_SUFFIX, "B", False), (_EMB_A_SUFFIX, "A", True),
             (_EMB_B_SUFFIX, "B", True))


def _key(name: str, part: str, embedding: bool) -> str:
    return f"{KEY_PREFIX}{name}" + ((_EMB_A_SUFFIX if part == "A" else _EMB_B_SUFFIX) if embedding else
                                     (_A_SUFFIX if part == "A" else _B_SUFFIX))

# LoraConfig fields that turn on something fused_lora does not load; each must be falsy / empty.
_UNSUPPORTED_FIELDS = {
    "lora_bias": "a LoRA bias (lora_bias=True)",
    "modules_to_save": "extra trainable modules (modules_to_save)",
    "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "megatron_config": "Megatron layers (megatron_config)",
}
# init_lora_weights values whose adapters are plain LoRA deltas. PiSSA / OLoRA / CorDA / LoftQ / ... adapters
# are valid only with the base weights PEFT modified at init, which the file does not contain.
_PLAIN_INITS = (True, False, "gaussian")
# What the config-file errors say is expected where JSON's spelling differs from Python's.
_JSON_EXPECTED = {"use_rslora": "true or false"}


class AdapterFormatError(ValueError):
    """The adapter directory, its config or its tensors are not a LoRA adapter fused_lora can load."""


# ---- save -----------------------------------------------------------------------------------------

def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _pattern_key(pattern_keys, module_name: str):
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", module_name)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _patterns(layers, attr: str, default):
    """{module name: value} for the layers whose value differs from the default, as PEFT reads it back."""
    pattern = {name: getattr(layer, attr) for name, layer in layers if getattr(layer, attr) != default}
    for name, layer in layers:  # a module name read as a regex might also match another module: escape then
        key = _pattern_key(pattern, name)
        if pattern.get(key, default) != getattr(layer, attr):
            return {re.escape(name): value for name, value in pattern.items()}
    return pattern


def _uniform(layers, attr: str):
    values = {getattr(layer, attr) for _, layer in layers}
    if len(values) > 1:
        by_value = {v: [n for n, l in layers if getattr(l, attr) == v][:3] for v in values}
        raise ValueError(f"save_adapter: PEFT's format has one {attr} per adapter, but the LoRA layers differ: "
                         f"{by_value}")
    return values.pop()


def adapter_config(model: nn.Module, *, task_type: str | None = None) -> dict:
    """The adapter_config.json content for the model's LoRALinear and LoRAEmbedding layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no LoRA layer (use inject first)")
    injected: InjectionConfig | None = getattr(model, CONFIG_ATTR, None)
    use_rslora = _uniform(layers, "use_rslora")
    linear_layers = [(name, layer) for name, layer in layers if isinstance(layer, LoRALinear)]
    use_dora = bool(linear_layers) and _uniform(linear_layers, "use_dora")
    if use_dora and len(linear_layers) < len(layers):
        raise ValueError(f"save_adapter: PEFT's use_dora applies to every layer of an adapter, and LoRAEmbedding "
                         f"{[n for n, l in layers if not isinstance(l, LoRALinear)][:3]} has no DoRA")
    lora_dropout = _uniform(layers, "lora_dropout")
    r = injected.r if injected else _most_common([layer.r for _, layer in layers])
    lora_alpha = injected.lora_alpha if injected else _most_common([layer.lora_alpha for _, layer in layers])
    names = sorted(name for name, _ in layers)
    target_modules: list[str] | str = names
    spec = injected.target_modules if injected else None
    if spec is not None and not (isinstance(spec, str) and spec.lower() == ALL_LINEAR):
        if sorted(match_targets(model, spec)) == names:
            target_modules = spec  # as the user wrote it, when it still selects exactly these layers
    model_config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "use_rslora": use_rslora,
        "target_modules": target_modules,
        "exclude_modules": None,
        "rank_pattern": _patterns(layers, "r", r),
        "alpha_pattern": _patterns(layers, "lora_alpha", lora_alpha),
        # Embeddings have no layout of their own (PEFT ignores fan_in_fan_out for them).
        "fan_in_fan_out": any(isinstance(layer, LoRALinear) for _, layer in layers) and
        all(layer.fan_in_fan_out for _, layer in layers if isinstance(layer, LoRALinear)),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": use_dora,
        "lora_bias": False,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, *, task_type: str | None = None,
                 save_embedding_layers: bool = False) -> None:
    """Write the model's LoRALinear and LoRAEmbedding adapters to ``path`` as PEFT's save_pretrained does
    (default adapter; embeddings under PEFT's lora_embedding_A / lora_embedding_B keys; DoRA layers add
    lora_magnitude_vector and ``use_dora: true``, which must then hold for every layer).

    ``PeftModel.from_pretrained(base_model, path)`` loads the result. task_type (e.g. "CAUSAL_LM") is
    written to the config and picks PEFT's model class there. A merged layer's lora_A / lora_B are
    saved as they are (the merge lives in the base weight, which is not part of an adapter file).
    save_embedding_layers=True also writes each LoRAEmbedding's table as ``<module>.base_layer.weight``, as
    PEFT's save_pretrained does by default when an embedding is targeted (for a resized vocabulary); off by
    default here, since the table is num_embeddings x embedding_dim (1 GiB for 128256 x 4096 in bf16).
    """
    from safetensors.torch import save_file

    config = adapter_config(model, task_type=task_type)
    tensors = {}
    for name, layer in lora_layers(model):
        embedding = isinstance(layer, LoRAEmbedding)
        tensors[_key(name, "A", embedding)] = layer.lora_A.detach().contiguous()
        tensors[_key(name, "B", embedding)] = layer.lora_B.detach().contiguous()
        if not embedding and layer.use_dora:
            tensors[f"{KEY_PREFIX}{name}{_MAG_SUFFIX}"] = layer.lora_magnitude_vector.detach().contiguous()
        if embedding and save_embedding_layers:
            tensors[f"{KEY_PREFIX}{name}{_TABLE_SUFFIX}"] = layer.weight.detach().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# ---- load -----------------------------------------------------------------------------------------

def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise AdapterFormatError(f"adapter path {path!r} is not a directory")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        named = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME)))
        hint = (f"; it has named-adapter sub-folders {named}: pass {os.path.join(path, named[0])!r}" if named
                else "")
        raise AdapterFormatError(f"{config_path} not found{hint}")
    if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        other = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(path, f))]
        hint = f" ({other[0]} found: re-save it with safe_serialization=True)" if other else ""
        raise AdapterFormatError(f"{os.path.join(path, WEIGHTS_NAME)} not found{hint}")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise AdapterFormatError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def _check_config(config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"adapter_config.json has peft_type={config.get('peft_type')!r}; "
                                 f"load_adapter reads LoRA adapters (peft_type 'LORA') only")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"adapter_config.json has bias={config['bias']!r}; only bias='none' is supported "
                                 f"(the file would carry base-layer biases)")
    for field_name, what in _UNSUPPORTED_FIELDS.items():
        if config.get(field_name):
            raise AdapterFormatError(f"adapter_config.json sets {field_name}={config[field_name]!r}: {what} "
                                     f"is not supported by fused_lora")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise AdapterFormatError(f"adapter_config.json has init_lora_weights={init!r}: such adapters are valid only "
                                 f"with the base weights PEFT modified at init; convert it to a plain LoRA first "
                                 f"(save_pretrained(path_initial_model_for_weight_conversion=...))")
    for name, default in (("r", 8), ("lora_alpha", 8), ("lora_dropout", 0.0), ("use_rslora", False)):
        _check_field(name, name, config.get(name, default))
    if not isinstance(config.get("use_dora", False), bool):
        raise AdapterFormatError(f"adapter_config.json has use_dora={config['use_dora']!r}; expected true or false")
    for field_name, required in (("target_modules", True), ("exclude_modules", False)):
        spec = config.get(field_name)
        if (spec is None and required) or not (spec is None or isinstance(spec, str) or
                                               (isinstance(spec, list) and all(isinstance(t, str) for t in spec))):
            raise AdapterFormatError(f"adapter_config.json has {field_name}={spec!r}; expected a list of module "
                                     f"names or a regex string")
        error = regex_error(spec) if isinstance(spec, str) and spec.lower() != ALL_LINEAR else None
        if error:
            raise AdapterFormatError(f"adapter_config.json has {field_name}={spec!r}, not a valid regex: {error}")
    for pattern_name, name in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        pattern = config.get(pattern_name) or {}
        if not isinstance(pattern, dict):
            raise AdapterFormatError(f"adapter_config.json has {pattern_name}={pattern!r}; expected an object")
        for key, value in pattern.items():
            error = regex_error(key)
            if error:
                raise AdapterFormatError(f"adapter_config.json {pattern_name} key {key!r} is not a valid regex: "
                                         f"{error}")
            _check_field(f"{pattern_name}[{key!r}]", name, value)


def _check_field(label: str, name: str, value) -> None:
    """AdapterFormatError unless ``value``, adapter_config.json's ``label``, is a valid LoRA ``name`` (r, ...)."""
    error = lora_config_error(name, value)
    if error is not None:
        raise AdapterFormatError(f"adapter_config.json has {label}={value!r}; expected "
                                 f"{_JSON_EXPECTED.get(name, error[1])}")


def _module_tensors(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": tensor, "B": tensor, "embedding": bool}} from PEFT's keys; rejects every other key."""
    modules: dict[str, dict] = {}
    for key, tensor in state.items():
        name = key.removeprefix("_orig_mod.")
        if not name.startswith(KEY_PREFIX):
            raise AdapterFormatError(f"unexpected key {key!r}: PEFT adapter keys start with {KEY_PREFIX!r}")
        name = name[len(KEY_PREFIX):]
        if name.endswith(_MAG_SUFFIX):
            if tensor.dim() != 1 or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise AdapterFormatError(f"{key} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; expected "
                                         f"a finite floating-point (out_features,) DoRA magnitude")
            modules.setdefault(name[:-len(_MAG_SUFFIX)], {})["M"] = tensor
            continue
        if name.endswith(".lora_B.bias"):
            raise AdapterFormatError(f"key {key!r} is a LoRA bias (lora_bias=True); not supported")
        if name.endswith(_TABLE_SUFFIX):
            modules.setdefault(name[:-len(_TABLE_SUFFIX)], {})["table"] = tensor
            continue
        for suffix, part, embedding in _SUFFIXES:
            if name.endswith(suffix):
                parts = modules.setdefault(name[:-len(suffix)], {})
                if parts.setdefault("embedding", embedding) != embedding:
                    raise AdapterFormatError(f"key {key!r}: module {name[:-len(suffix)]!r} has both Linear "
                                             f"(lora_A / lora_B) and embedding (lora_embedding_A / _B) keys")
                parts[part] = tensor
                break
        else:
            raise AdapterFormatError(f"unexpected key {key!r}: expected <module>.lora_A.weight, "
                                     f"<module>.lora_B.weight, <module>.lora_embedding_A or "
                                     f"<module>.lora_embedding_B (modules_to_save and other tuners are not supported)")
    for name, parts in modules.items():
        embedding = parts.get("embedding", False)
        if "M" in parts and embedding:
            raise AdapterFormatError(f"unexpected key {KEY_PREFIX}{name}{_MAG_SUFFIX}: DoRA magnitudes are read for "
                                     f"Linear LoRA modules (lora_A / lora_B) only, not embeddings")
        if "table" in parts and not embedding:
            raise AdapterFormatError(f"unexpected key {KEY_PREFIX}{name}{_TABLE_SUFFIX}: base weights are read for "
                                     f"embedding LoRA modules (lora_embedding_A / _B) only")
        for part in ("A", "B"):
            if part not in parts:
                raise AdapterFormatError(f"missing key {_key(name, part, embedding)} "
                                         f"(its {_key(name, 'B' if part == 'A' else 'A', embedding)} is present)")
        a, b = parts["A"], parts["B"]
        for part, t in (("A", a), ("B", b)):
            key = _key(name, part, embedding)
            if t.dim() != 2:
                raise AdapterFormatError(f"{key} has shape {tuple(t.shape)}; expected 2-D (a Linear LoRA; conv "
                                         f"LoRA is not supported)")
            if not t.is_floating_point():
                raise AdapterFormatError(f"{key} has dtype {t.dtype}; expected a floating-point tensor")
            if not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{key} contains NaN or inf")
        if b.shape[1] != a.shape[0]:
            raise AdapterFormatError(f"{_key(name, 'B', embedding)} has shape {tuple(b.shape)}; expected "
                                     f"({b.shape[0]}, {a.shape[0]}) to match lora_A's rank {a.shape[0]}")
    return modules


def _is_embedding_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, LoRAEmbedding))


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or LoRALinear; (num_embeddings, embedding_dim) of an
    Embedding or LoRAEmbedding (A is (r, num_embeddings), B (embedding_dim, r), as a Linear's)."""
    if isinstance(module, (nn.Embedding, LoRAEmbedding)):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    nx, nf = module.weight.shape  # Conv1D stores (in, out)
    return nx, nf


def _adapter_loads(model: nn.Module, config: dict, modules: dict
                   ) -> list[tuple[str, nn.Module, int, float, torch.Tensor, torch.Tensor]]:
    """[(module path, target module, r, lora_alpha, lora_A, lora_B)], checked against the model, the tensors cast
    to the layer's dtype; raises before any change."""
    existing = {name: layer for name, layer in lora_layers(model)}
    file_names = set(modules)
    if existing:
        missing = sorted(set(existing) - file_names)
        unexpected = sorted(file_names - set(existing))
        where = "the model's LoRA layers"
    else:
        spec = config["target_modules"]
        targeted = set(match_targets(model, spec))
        exclude = config.get("exclude_modules")
        if exclude:
            targeted = {n for n in targeted if not name_matches(exclude, n)}
        missing = sorted(targeted - file_names)
        unexpected = sorted(file_names - targeted)
        where = f"the modules target_modules={spec!r} selects"
    if missing:
        raise AdapterFormatError(f"missing keys: the adapter has no lora_A/lora_B for {len(missing)} of {where}, "
                                 f"e.g. {_key(missing[0], 'A', _is_embedding_module(model.get_submodule(missing[0])))}")
    if unexpected:
        raise AdapterFormatError(f"unexpected keys: the adapter has weights for {len(unexpected)} module(s) not in "
                                 f"{where}, e.g. {_key(unexpected[0], 'A', modules[unexpected[0]].get('embedding', False))}")

    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    use_dora = config.get("use_dora", False)
    lora_dropout, use_rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    loads = []
    for name in sorted(modules):
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise AdapterFormatError(f"unexpected key {_key(name, 'A', modules[name].get('embedding', False))}: the model has no module "
                                     f"{name!r}") from None
        embedding = modules[name].get("embedding", False)
        if existing:
            if target.merged:
                raise AdapterFormatError(f"{type(target).__name__} {name!r} is merged; unmerge it before loading "
                                         f"an adapter")
            if isinstance(target, LoRAEmbedding) != embedding:
                raise AdapterFormatError(f"{_key(name, 'A', embedding)}: module {name!r} is a "
                                         f"{type(target).__name__}, so its keys must be "
                                         f"{_key(name, 'A', not embedding)} and _B")
        elif embedding:
            if not is_plain_embedding(target):
                raise AdapterFormatError(f"{_key(name, 'A', True)} is an embedding LoRA but module {name!r} is a "
                                         f"{type(target).__name__}; lora_embedding_A / _B target nn.Embedding")
            if target.max_norm is not None or target.sparse:
                raise AdapterFormatError(f"module {name!r} is an nn.Embedding with max_norm / sparse, which "
                                         f"fused_lora does not support")
        elif not _is_linear(target):
            raise AdapterFormatError(f"module {name!r} is a {type(target).__name__}; lora_A / lora_B target "
                                     f"nn.Linear and transformers Conv1D modules")
        if existing and not embedding and target.use_dora != use_dora:
            raise AdapterFormatError(f"adapter_config.json has use_dora={str(use_dora).lower()} but LoRALinear "
                                     f"{name!r} has use_dora={target.use_dora}")
        magnitude = modules[name].get("M")
        if use_dora and embedding:
            raise AdapterFormatError(f"adapter_config.json has use_dora=true and {_key(name, 'A', True)} is an "
                                     f"embedding LoRA: DoRA on embeddings is not supported by fused_lora")
        if use_dora and magnitude is None:
            raise AdapterFormatError(f"missing key {KEY_PREFIX}{name}{_MAG_SUFFIX}: adapter_config.json has "
                                     f"use_dora=true")
        if not use_dora and magnitude is not None:
            raise AdapterFormatError(f"unexpected key {KEY_PREFIX}{name}{_MAG_SUFFIX}: a DoRA magnitude, but "
                                     f"adapter_config.json has use_dora={config.get('use_dora', False)!r}")
        a, b = modules[name]["A"], modules[name]["B"]
        r = a.shape[0]
        r_key = _pattern_key(rank_pattern, name)
        expected_r = rank_pattern[r_key] if r_key is not None else r_default
        if r != expected_r:
            source = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
            raise AdapterFormatError(f"{_key(name, 'A', embedding)} has rank {r} but adapter_config.json "
                                     f"gives {source}={expected_r}")
        in_features, out_features = _features(target)
        if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
            raise AdapterFormatError(f"shape mismatch for {name!r}: lora_A {tuple(a.shape)}, lora_B "
                                     f"{tuple(b.shape)}; the module expects ({r}, {in_features}) and "
                                     f"({out_features}, {r})")
        if existing and target.r != r:
            raise AdapterFormatError(f"{type(target).__name__} {name!r} has r={target.r} but the adapter has "
                                     f"rank {r}")
        alpha_key = _pattern_key(alpha_pattern, name)
        alpha = alpha_pattern[alpha_key] if alpha_key is not None else alpha_default
        try:
            check_lora_config(r, alpha, lora_dropout, use_rslora)
        except (TypeError, ValueError) as exc:
            raise AdapterFormatError(f"adapter_config.json, for module {name!r}: {exc}") from None
        dtype = (target.lora_A if existing else target.weight).dtype
        table = modules[name].get("table")
        if table is not None:
            key = f"{KEY_PREFIX}{name}{_TABLE_SUFFIX}"
            if tuple(table.shape) != tuple(target.weight.shape) or not table.is_floating_point():
                raise AdapterFormatError(f"{key} has shape {tuple(table.shape)} and dtype {table.dtype}; expected a "
                                         f"floating-point {tuple(target.weight.shape)} table, the module's")
            table = table.to(target.weight.dtype)
            if not bool(torch.isfinite(table).all()):
                raise AdapterFormatError(f"{key} contains NaN or inf (or overflows {target.weight.dtype})")
        if magnitude is not None and tuple(magnitude.shape) != (out_features,):
            raise AdapterFormatError(f"{KEY_PREFIX}{name}{_MAG_SUFFIX} has shape {tuple(magnitude.shape)}; the "
                                     f"module expects ({out_features},)")
        cast = {part: modules[name][part].to(dtype) for part in ("A", "B", "M") if part in modules[name]}
        for part, t in cast.items():
            # The file's values are finite (checked on reading); a cast to a narrower dtype can still overflow.
            if not bool(torch.isfinite(t).all()):
                largest = modules[name][part].abs().max().item()
                key = f"{KEY_PREFIX}{name}{_MAG_SUFFIX}" if part == "M" else _key(name, part, embedding)
                raise AdapterFormatError(f"{key} has a value of magnitude "
                                         f"{largest:g} that overflows the model's dtype {dtype} (largest finite "
                                         f"{torch.finfo(dtype).max:g})")
        loads.append((name, target, r, alpha, cast["A"], cast["B"], cast.get("M"), table))
    return loads


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into ``model``.

    Into a model with LoRALinear layers (from inject): the adapter must cover exactly those layers with
    the same ranks; lora_alpha, use_rslora and lora_dropout are taken from the file. Into a plain model:
    LoRALinear layers are injected at the modules the file's keys name (which must be the modules the
    config's target_modules selects). Honours r, lora_alpha, use_rslora, rank_pattern, alpha_pattern
    and fan_in_fan_out (from the base module's type, as PEFT does), and use_dora (DoRA LoRALinear layers with
    the file's lora_magnitude_vector; existing layers must have the same use_dora; embeddings cannot). Tensors are cast to each layer's
    dtype (the base weight's); a value that overflows it is refused. r, lora_alpha, lora_dropout and
    use_rslora (and the patterns' values) are checked as LoRALinear checks them. Everything is checked
    before the model changes: on any AdapterFormatError the model is untouched. Returns ``model``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    config = _read_config(path)
    _check_config(config)
    try:
        state = load_file(os.path.join(path, WEIGHTS_NAME), device="cpu")
    except SafetensorError as exc:
        raise AdapterFormatError(f"{os.path.join(path, WEIGHTS_NAME)} is not a readable safetensors file: {exc}") \
            from None
    if not state:
        raise AdapterFormatError(f"{os.path.join(path, WEIGHTS_NAME)} holds no tensors")
    modules = _module_tensors(state)
    loads = _adapter_loads(model, config, modules)

    use_rslora = config.get("use_rslora", False)
    lora_dropout = float(config.get("lora_dropout", 0.0))
    spec = config["target_modules"]
    injection = InjectionConfig(spec if isinstance(spec, str) else sorted(spec), config.get("r", 8),
                                config.get("lora_alpha", 8), lora_dropout, use_rslora, sorted(modules),
                                config.get("use_dora", False))
    # Everything above is checked; nothing below can fail on the file's content.
    injected_now = []
    with torch.no_grad():
        for name, target, r, alpha, lora_A, lora_B, magnitude, table in loads:
            if isinstance(target, (LoRALinear, LoRAEmbedding)):
                layer = target
                layer.lora_dropout = lora_dropout
                layer.set_scaling(lora_alpha=alpha, use_rslora=use_rslora)
            else:
                if is_plain_embedding(target):
                    layer = LoRAEmbedding.from_embedding(target, r=r, lora_alpha=alpha, lora_dropout=lora_dropout,
                                                         use_rslora=use_rslora)
                else:
                    layer = LoRALinear.from_linear(target, r=r, lora_alpha=alpha, lora_dropout=lora_dropout,
                                                   use_rslora=use_rslora, use_dora=magnitude is not None)
                _set_submodule(model, name, layer)
                injected_now.append(name)
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
            if magnitude is not None:
                layer.lora_magnitude_vector.copy_(magnitude)
            if table is not None:
                layer.weight.copy_(table)  # in place: an output head tied to this table reads it too
    if injected_now:
        freeze_base(model)
    setattr(model, CONFIG_ATTR, injection)
    return model
