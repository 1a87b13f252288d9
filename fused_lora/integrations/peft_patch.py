"""patch_peft / unpatch_peft: PEFT's LoRA Linear layers compute forward and backward with lora_linear, and its
LoRA Embedding layers with lora_embedding.

A patched layer keeps its PEFT module object, parameters and state; only its class changes, to
``FusedLinear`` (a subclass of ``peft.tuners.lora.layer.Linear`` that overrides ``forward``; for
``lora.Embedding``, ``FusedEmbedding``), so
state_dict, save_pretrained, set_adapter, disable_adapter(), merging, optimizers and gradient
checkpointing see the same module, and its repr keeps PEFT's class name. The model's ``LoraModel``
becomes ``FusedLoraModel`` the same way, whose ``inject_adapter`` (behind add_adapter,
PeftModel.load_adapter, add_weighted_adapter) patches the layers it creates. ``unpatch_peft`` sets the
classes back.

Per call, the fused path is taken only when it computes what PEFT computes; otherwise the layer runs
PEFT's own forward for that call (see ``fused_call_args``): adapter-level configurations (LoRA variants,
lora_bias) and hooks on the base layer are checked there, so a layer fuses again once a
supported adapter is active. Layers that can never fuse keep PEFT's class: LoRA layers other than
lora.Linear and lora.Embedding (PEFT's quantized ones among them), base layers other than nn.Linear /
transformers Conv1D / nn.Embedding or their subclasses that inherit forward, and embeddings with
max_norm or sparse=True. DoRA (use_dora=True) on a lora.Linear computes with fused_lora.dora_linear when it
is the layer's only active adapter; DoRA on lora.Embedding and together with other active adapters runs
PEFT's forward. One warning at patch time (and one per later
inject_adapter), attributed to the user's line, lists every layer that falls back, with the reason.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from .._validation import KERNEL_DTYPES, MAX_RANK
from ..functional import lora_linear
from ..functional_dora import dora_linear
from ..functional_embedding import lora_embedding
from ..nn.embedding import is_plain_embedding
from ..nn.linear import is_conv1d

__all__ = ["patch_peft", "unpatch_peft", "fused_call_args", "FusedFallbackWarning"]  # Fused*: built lazily

# {"FusedLinear": ..., "FusedEmbedding": ..., "FusedLoraModel": ...}, built on first use so that importing fused_lora does not import peft.
_FUSED_CLASSES: dict[str, type] = {}
# dtypes the fused path takes; others (fp64) run PEFT's forward. The parity tests widen it for the reference.
FUSED_DTYPES = KERNEL_DTYPES


class FusedFallbackWarning(UserWarning):
    """Some PEFT LoRA layers keep PEFT's own forward; the message lists them and why."""


def _peft_classes() -> dict[str, type]:
    """{fused class name: the PEFT class it subclasses}."""
    from peft.tuners.lora.layer import Embedding, Linear
    from peft.tuners.lora.model import LoraModel
    return {"FusedLinear": Linear, "FusedEmbedding": Embedding, "FusedLoraModel": LoraModel}


def _fused_class(name: str) -> type:
    if not _FUSED_CLASSES:
        peft_classes = _peft_classes()
        _FUSED_CLASSES.update(FusedLinear=_make_fused_layer("FusedLinear", peft_classes["FusedLinear"], _fused_forward,
                                                            "fused_lora.lora_linear"),
                              FusedEmbedding=_make_fused_layer("FusedEmbedding", peft_classes["FusedEmbedding"],
                                                               _fused_embedding_forward, "fused_lora.lora_embedding"),
                              FusedLoraModel=_make_fused_lora_model(peft_classes["FusedLoraModel"]))
    return _FUSED_CLASSES[name]


def _make_fused_layer(name: str, peft_layer: type, fused_forward, op: str) -> type:
    """A subclass of PEFT's layer class ``peft_layer`` whose forward runs ``fused_forward`` (the fused op
    ``op``) when ``fused_call_args`` says the op computes the call as PEFT would, else PEFT's forward."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        call_args = fused_call_args(self, x, args, kwargs)
        if call_args is None:
            return peft_layer.forward(self, x, *args, **kwargs)
        return fused_forward(self, x, *call_args)

    doc = f"peft.tuners.lora.layer.{peft_layer.__name__} whose forward runs {op} when it can."
    return _public(type(name, (peft_layer,), {"forward": forward, "__doc__": doc}), peft_layer)


def _make_fused_lora_model(lora_model: type) -> type:
    class FusedLoraModel(lora_model):
        """peft LoraModel whose inject_adapter patches the LoRA layers it creates or extends."""

        def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            layers = list(_lora_layers(self))
            _warn_fallbacks(_patch_layers(layers, new_adapter=adapter_name), len(layers))

    return _public(FusedLoraModel, lora_model)


def _public(cls: type, peft_cls: type) -> type:
    """Named as an attribute of this module, so that pickle finds it; module reprs show ``peft_cls``'s name.

    nn.Module.__repr__ names a module by ``_get_name()``: with PEFT's name, repr(model) and PeftModel's
    get_layer_status() read as they do unpatched.
    """
    def _get_name(self) -> str:
        return peft_cls.__name__

    cls.__module__ = __name__
    cls.__qualname__ = cls.__name__
    cls._get_name = _get_name
    return cls


def __getattr__(name: str):
    if name in ("FusedLinear", "FusedEmbedding", "FusedLoraModel"):
        return _fused_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype PEFT's base layer computes in: the autocast dtype under torch.autocast, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _dropout_p(module: nn.Module) -> float | None:
    """p of a PEFT lora_dropout entry; None for anything but nn.Identity / nn.Dropout."""
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p) if module.training else 0.0
    return None


# Why a layer with given adapters cannot fuse, as (code, adapter name or None); _unfusable_message words it.
# Codes, not messages: fused_call_args runs per call and formats nothing.
_HOOKS, _INSTANCE_FORWARD, _VARIANT, _LORA_BIAS, _CUSTOM_DROPOUT, _RANK, _DORA_STACKED = range(7)


def _is_dora(layer, name: str, embedding: bool) -> bool:
    """Adapter ``name`` of a lora.Linear is PEFT's DoRA (DoraLinearVariant) with its magnitude vector."""
    variant = layer.lora_variant[name]
    cls = variant if isinstance(variant, type) else type(variant)
    # By name: DoraEmbeddingVariant subclasses DoraLinearVariant, and importing peft here would run per call.
    return (not embedding and cls.__name__ == "DoraLinearVariant" and cls.__module__ == "peft.tuners.lora.variants"
            and name in layer.lora_magnitude_vector)


def _unfusable(layer, adapters, active: list) -> tuple[int, str | None] | None:
    """Why the fused op cannot compute ``layer`` as PEFT would, from module state alone, or None.

    ``adapters`` are checked one by one (variants, lora_bias, dropout modules); ``active``, the active
    adapters the layer holds, for their stacked rank. The single source of these conditions for the
    per-call decision (fused_call_args) and the patch-time warning (_fallback_reason).
    """
    base = layer.base_layer
    if base._forward_hooks or base._forward_pre_hooks:
        return _HOOKS, None
    if "forward" in base.__dict__:
        return _INSTANCE_FORWARD, None
    embedding = _is_embedding_layer(layer)
    for name in adapters:
        # PEFT's forward dispatches on lora_variant (DoRA is one); use_dora only names it in the message.
        if name in layer.lora_variant:
            if not _is_dora(layer, name, embedding):
                return _VARIANT, name
            # PEFT's DoRA term scales the result of the adapters before it: no rank stacking.
            if name in active and len(active) > 1:
                return _DORA_STACKED, name
        if layer.lora_bias.get(name, False):
            return _LORA_BIAS, name
        # PEFT's lora.Embedding never calls its dropout module: any module computes the same there.
        if not embedding and _dropout_p(layer.lora_dropout[name]) is None:
            return _CUSTOM_DROPOUT, name
    if _stacked_rank(layer, active) > MAX_RANK:
        return _RANK, None
    return None


def _stacked_rank(layer, adapters: list) -> int:
    return sum(layer.r[name] for name in adapters)


def _unfusable_message(layer, code: int, name: str | None, active: list) -> str:
    if code == _HOOKS:
        return "the base layer has forward hooks, which the fused op would bypass"
    if code == _INSTANCE_FORWARD:
        return "the base layer has an instance-level forward (e.g. an accelerate hook), which the fused op would bypass"
    if code == _VARIANT:
        if getattr(layer, "use_dora", {}).get(name, False):
            return f"adapter {name!r} uses DoRA (fused on lora.Linear only)"
        return f"adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__})"
    if code == _LORA_BIAS:
        return f"adapter {name!r} has lora_bias=True"
    if code == _DORA_STACKED:
        return f"adapter {name!r} uses DoRA with other active adapters {active} (fused: DoRA as the only one)"
    if code == _CUSTOM_DROPOUT:
        return f"adapter {name!r} has a custom dropout module {type(layer.lora_dropout[name]).__name__}"
    return f"active adapters {active} stack to rank {_stacked_rank(layer, active)} > {MAX_RANK}"


def _is_embedding_layer(layer) -> bool:
    """A PEFT lora.Embedding (patched or not): its adapters are in lora_embedding_A / _B."""
    return len(layer.lora_embedding_A) > 0 and len(layer.lora_A) == 0


def _adapter_weights(layer):
    """The dict holding the layer's adapters: lora_A, or lora_embedding_A for embeddings."""
    return layer.lora_embedding_A if _is_embedding_layer(layer) else layer.lora_A


def _active_adapters(layer) -> list:
    adapters = _adapter_weights(layer)
    return [name for name in layer.active_adapters if name in adapters]


def fused_call_args(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """(adapters, dtype, dropout_p) for _fused_forward when the fused op computes this call as PEFT would, else None.

    Cheap Python checks on module state and dtypes only (no tensor values), so torch.compile can guard
    on them. PEFT's forward runs instead when: extra forward arguments are given (``adapter_names`` for
    mixed batches, variant kwargs); adapters are disabled or merged (PEFT then runs the base layer);
    the layer with its active adapters cannot fuse (_unfusable: base-layer hooks or an instance-level
    forward, a LoRA variant other than DoRA on lora.Linear, DoRA with other active adapters, lora_bias, a
    custom dropout module, a stacked rank above MAX_RANK); several active adapters in training with dropout (PEFT draws an independent
    mask per adapter, one fused call would share one); the compute dtype is not fp16 / bf16 / fp32; the
    base weight's dtype differs from the compute dtype outside autocast.
    """
    if args or any(value is not None for value in kwargs.values()):
        return None
    if layer.disable_adapters or layer.merged:
        return None
    adapters = _active_adapters(layer)
    if not adapters:
        return None
    if _unfusable(layer, adapters, adapters) is not None:
        return None
    if _is_embedding_layer(layer):
        # PEFT computes in the table's dtype (autocast does not apply to embeddings).
        dtype = layer.base_layer.weight.dtype
        return (adapters, dtype, 0.0) if dtype in FUSED_DTYPES else None
    dropout_ps = [_dropout_p(layer.lora_dropout[name]) for name in adapters]
    if len(adapters) > 1 and any(p > 0.0 for p in dropout_ps):
        return None
    dtype = _compute_dtype(x)
    if dtype not in FUSED_DTYPES:
        return None
    if layer.base_layer.weight.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return None
    return adapters, dtype, dropout_ps[0]


def _fused_forward(layer, x: torch.Tensor, adapters: list, dtype: torch.dtype, dropout_p: float) -> torch.Tensor:
    base = layer.base_layer
    weight = base.weight.t() if is_conv1d(base) else base.weight
    bias = base.bias
    # One dtype for the fused op: PEFT's default fp32 adapters on a bf16/fp16 base are cast to the base's
    # dtype here (grads flow back to the fp32 parameters through the cast). PEFT instead runs that branch
    # in fp32; the measured difference is in the README (tests/peft_parity.py, config bf16-base-fp32-adapters).
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    x = x.to(dtype)
    if len(adapters) == 1:
        name = adapters[0]
        lora_A = layer.lora_A[name].weight.to(dtype)
        lora_B = layer.lora_B[name].weight.to(dtype)
        scaling = float(layer.scaling[name])
        if name in layer.lora_variant:  # DoRA (fused_call_args admits no other variant); m in its own dtype
            magnitude = layer.lora_magnitude_vector[name].weight
            return dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, dropout_p=dropout_p,
                               training=dropout_p > 0.0)
    else:
        # Several adapters: one call with the ranks stacked, each B pre-multiplied by its own scale.
        # Autograd through cat / mul hands each adapter its own gradient.
        lora_A = torch.cat([layer.lora_A[name].weight.to(dtype) for name in adapters], dim=0)
        # The scale is applied before the cast: one rounding for fp32 adapters on a bf16 base.
        lora_B = torch.cat([(layer.lora_B[name].weight * float(layer.scaling[name])).to(dtype) for name in adapters],
                           dim=1)
        scaling = 1.0
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, training=dropout_p > 0.0)


def _fused_embedding_forward(layer, ids: torch.Tensor, adapters: list, dtype: torch.dtype, _dropout_p: float):
    base = layer.base_layer
    # PEFT's default fp32 adapters on a bf16 / fp16 table are cast to the table's dtype here (grads flow back to
    # the fp32 parameters through the cast); PEFT adds its fp32 LoRA term to the bf16 rows and rounds once.
    if len(adapters) == 1:
        name = adapters[0]
        lora_A = layer.lora_embedding_A[name].to(dtype)
        lora_B = layer.lora_embedding_B[name].to(dtype)
        scaling = float(layer.scaling[name])
    else:
        # Several adapters: the ranks stacked (A along r, B along r with each scale applied before the cast).
        lora_A = torch.cat([layer.lora_embedding_A[name].to(dtype) for name in adapters], dim=0)
        lora_B = torch.cat([(layer.lora_embedding_B[name] * float(layer.scaling[name])).to(dtype)
                            for name in adapters], dim=1)
        scaling = 1.0
    return lora_embedding(ids, base.weight, lora_A, lora_B, scaling, padding_idx=base.padding_idx,
                          scale_grad_by_freq=base.scale_grad_by_freq)


# ---- patch time ---------------------------------------------------------------------------------

# Modules defining quantized layers or tensors: quantization libraries, torch's quantized / QAT modules, and
# PEFT's LoRA layers for quantized base layers (peft.tuners.lora.bnb, ...). A class counts as quantized when it
# or a class it derives from is defined under one of these; its name says nothing (torch's
# NonDynamicallyQuantizableLinear, MultiheadAttention's out_proj, is a plain nn.Linear).
_QUANTIZED_MODULES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "aqlm", "eetq", "hqq", "torchao",
                      "optimum.quanto", "neural_compressor", "torch.ao.nn.quantized", "torch.ao.nn.qat",
                      "torch.ao.nn.intrinsic.quantized", "torch.ao.nn.intrinsic.qat") + tuple(
    f"peft.tuners.lora.{name}" for name in ("bnb", "gptq", "awq", "aqlm", "eetq", "hqq", "inc", "torchao"))
# Entry points of nn.Module a base-layer class must inherit unchanged: the fused op replaces the call
# ``base(x)`` by a matmul on base.weight / base.bias, so an override of any of them would be skipped.
_CALL_PATH = ("forward", "__call__", "_call_impl")


def _is_quantized(cls: type) -> bool:
    return any(klass.__module__ == prefix or klass.__module__.startswith(prefix + ".")
               for klass in cls.__mro__ for prefix in _QUANTIZED_MODULES)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _linear_root(base: nn.Module) -> type | None:
    """nn.Linear or transformers' Conv1D when ``base`` is one (or a subclass), else None."""
    if isinstance(base, nn.Linear):
        return nn.Linear
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is not None and isinstance(base, pytorch_utils.Conv1D):
        return pytorch_utils.Conv1D
    return None


def _base_layer_reason(base: nn.Module) -> str | None:
    """Why the fused op cannot stand in for this base layer's class or weight, or None."""
    cls = type(base)
    kind = "quantized" if _is_quantized(cls) else "unsupported"
    root = _linear_root(base)
    if root is None:
        return f"{kind} base layer {_qualified(cls)} (fused: nn.Linear, transformers Conv1D, and their subclasses)"
    overridden = [name for name in _CALL_PATH if getattr(cls, name) is not getattr(root, name)]
    if overridden:
        return (f"{kind} base layer {_qualified(cls)} overrides {', '.join(overridden)} of {root.__name__}, "
                f"which the fused op would bypass")
    weight = base.weight
    subclass = next((t for t in (type(weight), type(weight.data)) if t not in (nn.Parameter, torch.Tensor)), None)
    if subclass is not None:
        return f"quantized base weight: a {_qualified(subclass)} (tensor subclass; fused: plain tensors)"
    if type(weight) is not nn.Parameter:
        return "the base weight is not an nn.Parameter (e.g. a parametrization computes it)"
    return None


def _embedding_base_reason(base: nn.Module) -> str | None:
    """Why the fused op cannot stand in for this embedding base layer, or None."""
    if not is_plain_embedding(base):
        what = "overrides forward of nn.Embedding" if isinstance(base, nn.Embedding) else "is not an nn.Embedding"
        return f"unsupported base layer {_qualified(type(base))} ({what}, which the fused op would bypass)"
    if base.max_norm is not None:
        return f"the base embedding has max_norm={base.max_norm} (renormalises rows in place; not supported)"
    if base.sparse:
        return "the base embedding has sparse=True (sparse gradients are not supported)"
    if hasattr(base, "embed_scale"):
        return "the base embedding has an embed_scale"
    weight = base.weight
    if type(weight) is not nn.Parameter or type(weight.data) is not torch.Tensor:
        return "the base weight is not a plain nn.Parameter"
    return None


def _unsupported_layer_reason(module: nn.Module) -> str | None:
    """Why a LoRA layer can never be fused (its class or base layer), or None."""
    cls = type(module)
    peft_classes = _peft_classes()
    if cls not in (peft_classes["FusedLinear"], peft_classes["FusedEmbedding"]):
        if _is_quantized(cls):
            return f"quantized base layer ({_qualified(cls)})"
        return (f"LoRA layer type {cls.__name__} is not supported (fused_lora fuses lora.Linear and "
                f"lora.Embedding only)")
    if "forward" in module.__dict__:
        return "the LoRA layer has an instance-level forward (e.g. an accelerate hook), which replaces any class forward"
    if cls is peft_classes["FusedEmbedding"]:
        return _embedding_base_reason(module.base_layer)
    return _base_layer_reason(module.base_layer)


def _fallback_reason(module: nn.Module, adapters) -> str | None:
    """Why a patched layer runs PEFT's forward now (its base layer, or one of ``adapters``), or None."""
    active = _active_adapters(module)
    unfusable = _unfusable(module, adapters, active)
    if unfusable is None:
        return None
    code, name = unfusable
    message = _unfusable_message(module, code, name, active)
    # Hooks are run-time state (added and removed without PEFT): the layer fuses again once they are gone.
    return message + " (checked per call)" if code in (_HOOKS, _INSTANCE_FORWARD) else message


def _lora_layers(model: nn.Module):
    from peft.tuners.lora.layer import LoraLayer
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _patch_layers(layers, new_adapter: str | None = None) -> list[tuple[str, str]]:
    """Give every supported layer the FusedLinear class; (name, reason) for each layer that falls back.

    new_adapter=None (patch_peft): every layer not patched yet. new_adapter=name (after PEFT's
    inject_adapter): the layers holding that adapter, and only that adapter's configuration is reported.
    """
    peft_classes = _peft_classes()
    fused_for = {peft_classes[name]: _fused_class(name) for name in ("FusedLinear", "FusedEmbedding")}
    fused_classes = set(fused_for.values())
    fallbacks = []
    for name, module in layers:
        patched = type(module) in fused_classes
        if new_adapter is None and patched:
            continue
        if new_adapter is not None and new_adapter not in module.r:
            continue
        reason = None if patched else _unsupported_layer_reason(module)
        if reason is None:
            # Adapter-level reasons (DoRA, lora_bias, rank) and base-layer hooks are checked again per call,
            # so a layer whose adapter is unsupported now fuses once a supported adapter is active.
            module.__class__ = fused_for.get(type(module), type(module))
            adapters = _adapter_weights(module) if new_adapter is None else [new_adapter]
            reason = _fallback_reason(module, adapters)
        if reason is not None:
            fallbacks.append((name, reason))
    return fallbacks


# Packages whose frames a fallback warning skips, so that it names the user's line that called patch_peft,
# add_adapter, load_adapter, ... (Python 3.11's warnings.warn has no skip_file_prefixes).
_LIBRARY_PACKAGES = ("fused_lora", "peft", "transformers", "torch")


def _library_dirs() -> tuple[str, ...]:
    dirs = []
    for name in _LIBRARY_PACKAGES:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            dirs.append(os.path.dirname(path) + os.sep)
    return tuple(dirs)


def _user_stacklevel() -> int:
    """The stacklevel, for a warnings.warn in this function's caller, of the first frame outside the libraries."""
    dirs = _library_dirs()
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(dirs):
        frame, level = frame.f_back, level + 1
    return level


def _warn_fallbacks(fallbacks: list[tuple[str, str]], n_layers: int) -> None:
    """One FusedFallbackWarning listing ``fallbacks``, attributed to the user's code."""
    if fallbacks:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in fallbacks)
        warnings.warn(f"fused_lora.patch_peft: {len(fallbacks)} of {n_layers} LoRA layers run PEFT's own "
                      f"forward:\n{lines}", FusedFallbackWarning, stacklevel=_user_stacklevel())


def patch_peft(model: nn.Module) -> nn.Module:
    """Make every supported LoRA Linear layer of a PEFT model compute with fused_lora.lora_linear, and every
    supported LoRA Embedding layer with fused_lora.lora_embedding.

    Uses PEFT's own parameters and modules (in place; returns ``model``). Layers with an unsupported
    configuration keep PEFT's forward; one FusedFallbackWarning lists them with the reason. Layers that
    PEFT creates later (add_adapter, PeftModel.load_adapter, add_weighted_adapter) are patched as they
    are created, with a warning of their own for those that fall back. Raises TypeError when the model
    contains no PEFT LoRA layer. Patching twice is a no-op.
    """
    layers = list(_lora_layers(model))
    if not layers:
        raise TypeError(f"patch_peft expects a PEFT model with LoRA layers (get_peft_model with a LoraConfig); "
                        f"{type(model).__name__} contains none")
    peft_classes = _peft_classes()
    for module in model.modules():
        if type(module) is peft_classes["FusedLoraModel"]:
            module.__class__ = _fused_class("FusedLoraModel")
    _warn_fallbacks(_patch_layers(layers), len(layers))
    return model


def unpatch_peft(model: nn.Module) -> nn.Module:
    """Restore PEFT's own classes on every patched module (in place; returns ``model``)."""
    if not _FUSED_CLASSES:
        return model
    originals = {_FUSED_CLASSES[name]: cls for name, cls in _peft_classes().items()}
    for module in model.modules():
        original = originals.get(type(module))
        if original is not None:
            module.__class__ = original
    return model
