"""Named adapters on a whole wrapped model: add, set, delete, enable and disable.

Each one loops over the model's :class:`QuantAdapterLinear` layers and checks its preconditions on
every layer before the first one is touched. Merges live in :mod:`qadapt.model.model_merge`, the
summary in :mod:`qadapt.model.summary`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from qadapt import registry
from qadapt.config import check_adapter_name, validate_plugin_options
from qadapt.errors import AdapterStateError, ConfigError, TargetError, shorten
from qadapt.model.layers import Layers, list_adapters, refuse_merged, require_adapter, shared_state, wrapped_layers
from qadapt.model.targeting import Targets, canonical_names, name_filter
from qadapt.model.transaction import transaction
from qadapt.protocols import Method

# -------------------------------------------------------------------------------- named adapters


def _method_instance(method: Method | str, method_options: Mapping[str, Any] | None) -> Method:
    if isinstance(method, str):  # validated here first, so errors carry their location (method.options.r)
        method_options = validate_plugin_options("methods", method, method_options, "method")
    return registry.instance("methods", method, method_options)  # type: ignore[return-value]


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
    per_layer = {name: method_obj.for_layer(canonical[name]) for name, _ in chosen}
    problems = []
    for name, layer in chosen:
        try:
            per_layer[name].check_layer(layer.in_features, layer.out_features)
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise TargetError("cannot add the adapter to:\n  " + "\n  ".join(problems))
    with transaction(model) as tx:
        tx.keep_layers(layer for _, layer in layers)
        shared = method_obj.create_shared([(layer.in_features, layer.out_features) for _, layer in chosen])
        for name, layer in chosen:
            layer.add_adapter(adapter_name, per_layer[name], shared=shared)
            layer.adapters[adapter_name].train(layer.training)
        if shared is not None:
            shared_state(model)[adapter_name] = shared
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


class AdaptersDisabled:
    """What :func:`disable_adapters` returns: use it as a context manager to get each layer's previous
    on/off state back on exit (exceptions included); a plain call just leaves the adapters off."""

    def __init__(self, layers: Layers, previous: list[bool]) -> None:
        self._layers = layers
        self._previous = previous

    def __enter__(self) -> AdaptersDisabled:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for (_, layer), enabled in zip(self._layers, self._previous, strict=True):
            layer.enable_adapters(enabled)


def disable_adapters(model: nn.Module) -> AdaptersDisabled:
    """Same as ``enable_adapters(model, False)``; ``with qadapt.disable_adapters(model): ...`` turns them
    back on (as each layer was) when the block ends."""
    layers = wrapped_layers(model)
    previous = [layer.adapters_enabled for _, layer in layers]
    enable_adapters(model, False)
    return AdaptersDisabled(layers, previous)


def set_merge_aware(model: nn.Module, merge_aware: bool = True) -> None:
    """Make every layer compute merge-aware (or not), see :attr:`QuantAdapterLinear.merge_aware`.

    All or nothing: a layer whose backend cannot requantize refuses ``True`` before any layer changes.
    Refused while an adapter is merged (the merged storage was written one way or the other).
    """
    layers = wrapped_layers(model)
    refuse_merged(layers, "change merge_aware")
    with transaction(model):
        previous = [(layer, layer.merge_aware) for _, layer in layers]
        try:
            for _, layer in layers:
                layer.merge_aware = merge_aware
        except BaseException:
            for layer, value in previous:
                layer.merge_aware = value
            raise
