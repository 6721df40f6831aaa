"""Finding a wrapped model's adapter layers, and the state checks whole-model operations share."""

from __future__ import annotations

from torch import nn

from qadapt.errors import AdapterStateError, ConfigError, shorten
from qadapt.layer import QuantAdapterLinear
from qadapt.wrap import adapter_layers

Layers = list[tuple[str, QuantAdapterLinear]]


def wrapped_layers(model: nn.Module) -> Layers:
    """The model's ``(name, QuantAdapterLinear)`` layers in model order; raises when there are none."""
    layers = list(adapter_layers(model))
    if not layers:
        raise AdapterStateError("this model has no qadapt layers; qadapt.wrap() it first")
    return layers


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def require_adapter(model: nn.Module, name: str) -> Layers:
    """The layers that carry adapter ``name``; raises (listing the adapters there are) when none do."""
    layers = [(n, layer) for n, layer in wrapped_layers(model) if name in layer.adapters]
    if not layers:
        raise ConfigError(
            f"no adapter named {shorten(name)} on this model; adapters: {', '.join(list_adapters(model))}"
        )
    return layers


def refuse_merged(layers: Layers, doing: str) -> None:
    """Raise :class:`AdapterStateError` when an adapter is merged into any of ``layers``."""
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise AdapterStateError(
            f"cannot {doing} while an adapter is merged into {len(merged)} layer(s) "
            f"(first: {merged[0]}); qadapt.unmerge(model) first"
        )
