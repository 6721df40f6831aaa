"""Finding a wrapped model's adapter layers, its shared method state, and the state checks whole-model
operations share."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from qadapt.errors import AdapterStateError, ConfigError, shorten
from qadapt.model.layer import QuantAdapterLinear
from qadapt.model.targeting import WRAPPER_ATTRS, canonical_names

Layers = list[tuple[str, QuantAdapterLinear]]

#: Above this many layers, long operations show a progress bar.
PROGRESS_MIN_LAYERS = 8
#: Attribute on the wrapped model holding each adapter's shared method state (see Method.create_shared).
SHARED_ATTR = "_qadapt_shared"


def _rank() -> int:
    """This process's rank: the process group's once it exists, else torchrun's ``RANK`` (0 alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def progress(items: Sequence[Any], desc: str) -> Iterable[Any]:
    """``items``, with a tqdm bar when there are more than a few (on rank 0 only under torchrun)."""
    if len(items) <= PROGRESS_MIN_LAYERS or _rank() != 0:
        return items
    return tqdm(items, desc=desc, unit="layer", leave=False)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, QuantAdapterLinear]]:
    """Every ``(fully-qualified name, QuantAdapterLinear)`` in ``model``, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantAdapterLinear):
            yield name, module


def canonical_adapter_layers(model: nn.Module) -> Layers:
    """:func:`adapter_layers` under their canonical names (see :func:`~qadapt.model.targeting.canonical_names`)."""
    names = canonical_names(model)
    return [(names[name], layer) for name, layer in adapter_layers(model)]


def innermost(model: nn.Module) -> nn.Module:
    """The module that torch wrappers around ``model`` (compile, DDP, FSDP) hold, or ``model``."""
    while True:
        parallel = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
        attrs = [*WRAPPER_ATTRS, "module"] if parallel else WRAPPER_ATTRS
        inner = next((model._modules[a] for a in attrs if model._modules.get(a) is not None), None)
        if inner is None:
            return model
        model = inner


def shared_state(model: nn.Module) -> dict[str, nn.Module]:
    """The shared method state per adapter name (only adapters whose method creates one).

    Kept on the innermost wrapped module, so a ``torch.compile``d model and the model it wraps share it.
    """
    return innermost(model).__dict__.setdefault(SHARED_ATTR, {})


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


def refuse_merged(layers: Iterable[tuple[str, QuantAdapterLinear]], doing: str) -> None:
    """Raise :class:`AdapterStateError` when an adapter is merged into any of ``layers``.

    Writing or changing an adapter while it is merged would leave the base computing the old merge.
    """
    merged = [(name, layer.merged_adapter) for name, layer in layers if layer.merged]
    if merged:
        raise AdapterStateError(
            f"cannot {doing} while adapter {merged[0][1]!r} is merged into {len(merged)} layer(s) "
            f"(first: {merged[0][0]}); qadapt.unmerge(model) first"
        )
