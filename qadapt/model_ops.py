"""Whole-model operations on a wrapped model: named adapters and the summary.

Each one loops over the model's :class:`QuantAdapterLinear` layers and checks its preconditions on
every layer before the first one is touched. Merges live in :mod:`qadapt.merge_ops`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qadapt import registry
from qadapt.config import check_adapter_name, validate_plugin_options
from qadapt.errors import AdapterStateError, ConfigError, TargetError, shorten
from qadapt.layer import QuantAdapterLinear
from qadapt.model_layers import list_adapters, refuse_merged, require_adapter, wrapped_layers
from qadapt.protocols import Method
from qadapt.targeting import Targets, canonical_names, name_filter
from qadapt.wrap import adapter_layers, shared_state

# -------------------------------------------------------------------------------- named adapters


def _method_instance(method: Method | str, method_options: Mapping[str, Any] | None) -> Method:
    if isinstance(method, Method):
        if method_options:
            raise ConfigError("method_options given with a Method instance; put the options in the instance")
        return method
    options = validate_plugin_options("methods", method, method_options, "method")
    return registry.method_class(method)(options)


def add_adapter(
    model: nn.Module,
    adapter_name: str,
    method: Method | str,
    *,
    method_options: Mapping[str, Any] | None = None,
    targets: Targets | None = None,
    exclude: Targets | None = None,
) -> nn.Module:
    """Add a second (third, ...) adapter to the wrapped layers and make it active there.

    ``targets``/``exclude`` pick among the wrapped layers (default: all of them). The method's
    shared state is created once for the chosen layers. All or nothing: on failure, the layers
    that got the adapter lose it again. Returns the model.
    """
    layers = wrapped_layers(model)
    refuse_merged(layers, "add an adapter")
    check_adapter_name(adapter_name)
    if adapter_name in list_adapters(model):
        raise ConfigError(f"adapter {adapter_name!r} already exists on this model; delete_adapter() it first")
    keep = name_filter(targets, exclude)
    canonical = canonical_names(model)
    chosen = [(name, layer) for name, layer in layers if keep(name, canonical[name])]
    if not chosen:
        raise TargetError(f"no wrapped layer matched targets {shorten(targets)}; wrapped layers: {layers[0][0]}, ...")
    method_obj = _method_instance(method, method_options)
    problems = []
    for name, layer in chosen:
        try:
            method_obj.check_layer(layer.in_features, layer.out_features)
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise TargetError("cannot add the adapter to:\n  " + "\n  ".join(problems))
    previous = {id(layer): layer.active_adapter for _, layer in layers}
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    done: list[QuantAdapterLinear] = []
    try:
        shared = method_obj.create_shared([(layer.in_features, layer.out_features) for _, layer in chosen])
        for _, layer in chosen:
            layer.add_adapter(adapter_name, method_obj, shared=shared)
            layer.adapters[adapter_name].train(layer.training)
            done.append(layer)
        if shared is not None:
            shared_state(model)[adapter_name] = shared
    except BaseException:
        for layer in done:
            layer.delete_adapter(adapter_name)
            layer.active_adapter = previous[id(layer)]
        for param, flag in grad_flags:
            param.requires_grad_(flag)
        raise
    for _, layer in layers:
        if adapter_name not in layer.adapters:
            layer.active_adapter = None
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` active on every layer; layers without it run the plain quantized layer."""
    layers = require_adapter(model, adapter_name)
    everything = wrapped_layers(model)
    merged = [n for n, layer in everything if layer.merged and layer.merged_adapter != adapter_name]
    if merged:
        raise AdapterStateError(f"another adapter is merged into {merged[0]}; qadapt.unmerge(model) first")
    for _, layer in layers:
        layer.set_adapter(adapter_name)
    carriers = {id(layer) for _, layer in layers}
    for _, layer in everything:
        if id(layer) not in carriers:
            layer.active_adapter = None


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer (it must not be merged anywhere)."""
    layers = require_adapter(model, adapter_name)
    merged = [n for n, layer in layers if layer.merged_adapter == adapter_name]
    if merged:
        raise AdapterStateError(f"adapter {adapter_name!r} is merged into {merged[0]}; qadapt.unmerge(model) first")
    for _, layer in layers:
        layer.delete_adapter(adapter_name)
    shared_state(model).pop(adapter_name, None)


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    """Turn the adapters on or off on every layer (off: the plain quantized model)."""
    layers = wrapped_layers(model)
    if not enabled:
        refuse_merged(layers, "disable adapters")
    for _, layer in layers:
        layer.enable_adapters(enabled)


def disable_adapters(model: nn.Module) -> None:
    """Same as ``enable_adapters(model, False)``."""
    enable_adapters(model, False)


# --------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class WrapSummary:
    """Figures of a wrapped model, as returned by :func:`summary`.

    Counted the same whatever a backend stores its codes in (parameters, buffers, or plain
    attributes): each wrapped layer's weight counts as the ``out x in`` weights it represents
    (not as packed codes), and bytes count every tensor the model holds once. A base layer's
    ``bias`` counts even where the layer keeps it as a plain tensor attribute.
    """

    layers: int
    adapters: list[str]
    backends: dict[str, int]
    merged_layers: int
    #: parameters that train (the adapters').
    trainable_params: int
    #: every parameter outside the wrapped layers' quantized storage, plus ``out x in`` per wrapped layer.
    total_params: int
    #: bytes of the wrapped layers' quantized weight storage (codes, scales, ...).
    quantized_bytes: int
    #: bytes of every tensor the model holds (parameters, buffers, quantized storage), each once.
    total_bytes: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        backends = ", ".join(f"{name} x{count}" for name, count in sorted(self.backends.items()))
        return "\n".join(
            [
                f"layers wrapped:   {self.layers} ({backends})",
                f"adapters:         {', '.join(self.adapters) or '(none)'}",
                f"merged layers:    {self.merged_layers}",
                f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({share:.3f}%)",
                f"quantized weights: {self.quantized_bytes:,} bytes",
                f"model tensors:    {self.total_bytes:,} bytes",
            ]
        )


def _memory_key(tensor: torch.Tensor) -> tuple[str, int, int]:
    """Identifies the memory a tensor uses (views and aliases of one storage share the key)."""
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr(), storage.nbytes())


def _plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that hold ``tensor``'s memory: itself, or a wrapper subclass's inner tensors.

    A wrapper subclass (a quantized weight held as a parameter, say) has no storage of its own:
    asking for its data pointer raises.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    inner = (getattr(tensor, name) for name in names)
    return [t for part in inner if part is not None for t in _plain(part)]


def summary(model: nn.Module) -> WrapSummary:
    """Layers wrapped, adapters, trainable / total parameters, bytes of quantized weights and of the model.

    See :class:`WrapSummary` for how parameters and bytes are counted.
    """
    layers = list(adapter_layers(model))
    storage_tensors = [
        plain
        for _, layer in layers
        for t in layer.backend.get_storage(layer.base).tensors.values()
        for plain in _plain(t)
    ]
    in_storage = {_memory_key(t) for t in storage_tensors if not t.is_meta}
    params = list({id(p): p for p in model.parameters()}.values())
    outside = [p for p in params if p.is_meta or any(_memory_key(t) not in in_storage for t in _plain(p))]
    # A base layer may keep its bias as a plain tensor attribute, neither parameter nor buffer.
    held = {_memory_key(t) for p in [*params, *model.buffers()] if not p.is_meta for t in _plain(p)} | in_storage
    loose_biases = list(
        {
            id(bias): bias
            for _, layer in layers
            if isinstance(bias := getattr(layer.base, "bias", None), torch.Tensor)
            and not bias.is_meta
            and all(_memory_key(t) not in held for t in _plain(bias))
        }.values()
    )
    outside += loose_biases
    represented = sum(layer.in_features * layer.out_features for _, layer in layers)
    unique: dict[tuple[str, int, int], int] = {}
    for tensor in [*params, *model.buffers(), *storage_tensors, *loose_biases]:
        for plain in [] if tensor.is_meta else _plain(tensor):
            unique[_memory_key(plain)] = plain.untyped_storage().nbytes()
    backends = Counter(layer.backend.name or type(layer.backend).__name__ for _, layer in layers)
    return WrapSummary(
        layers=len(layers),
        adapters=list_adapters(model),
        backends=dict(backends),
        merged_layers=sum(layer.merged for _, layer in layers),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in outside) + represented,
        quantized_bytes=sum(layer.backend.get_storage(layer.base).nbytes for _, layer in layers),
        total_bytes=sum(unique.values()),
    )
