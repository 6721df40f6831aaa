"""Whole-model operations on a wrapped model: merge, unmerge, unwrap, named adapters, summary.

Each one loops over the model's :class:`QuantAdapterLinear` layers. Preconditions are checked on
every layer before the first one is touched; a merge that fails at layer k puts layers 0..k-1
back, so the model is as it was before the call.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qadapt import registry
from qadapt.config import check_adapter_name, validate_plugin_options
from qadapt.errors import AdapterStateError, CapabilityError, ConfigError, TargetError, shorten
from qadapt.layer import DISABLED_MERGE, MergeResult, QuantAdapterLinear, UnmergeMode
from qadapt.protocols import Method, QuantizedWeight
from qadapt.targeting import Targets, canonical_names, name_filter
from qadapt.wrap import adapter_layers, progress, shared_state

# ------------------------------------------------------------------------------------- helpers


def wrapped_layers(model: nn.Module) -> list[tuple[str, QuantAdapterLinear]]:
    """The model's adapter layers; raises when there are none."""
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


def _require_adapter(model: nn.Module, name: str) -> list[tuple[str, QuantAdapterLinear]]:
    """The layers that carry adapter ``name``; raises (listing the adapters there are) when none do."""
    layers = [(n, layer) for n, layer in wrapped_layers(model) if name in layer.adapters]
    if not layers:
        raise ConfigError(
            f"no adapter named {shorten(name)} on this model; adapters: {', '.join(list_adapters(model))}"
        )
    return layers


def _refuse_merged(layers: list[tuple[str, QuantAdapterLinear]], doing: str) -> None:
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise AdapterStateError(
            f"cannot {doing} while an adapter is merged into {len(merged)} layer(s) "
            f"(first: {merged[0]}); qadapt.unmerge(model) first"
        )


# --------------------------------------------------------------------------------------- merge


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge` did: one :class:`MergeResult` per merged layer, and layers left unmerged."""

    adapter: str | None
    layers: dict[str, MergeResult]
    #: layer name -> why it was not merged (e.g. its backend cannot requantize).
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """The largest relative merge error over the merged layers (0.0 when none)."""
        return max((r.error for r in self.layers.values()), default=0.0)

    @property
    def min_delta_retained(self) -> float | None:
        """The smallest share of an adapter's change that survived requantization (None: no change)."""
        kept = [r.delta_retained for r in self.layers.values() if r.delta_retained is not None]
        return min(kept) if kept else None

    def __str__(self) -> str:
        kept = self.min_delta_retained
        text = f"merged {len(self.layers)} layer(s), max relative error {self.max_error:.3g}"
        if kept is not None:
            text += f", min change retained {kept:.3g}"
        if self.skipped:
            text += f"; {len(self.skipped)} left unmerged"
        return text


def _refuse_disabled(layers: list[tuple[str, QuantAdapterLinear]]) -> None:
    disabled = [name for name, layer in layers if not layer.adapters_enabled]
    if disabled:
        raise AdapterStateError(f"cannot merge into {disabled[0]} (and {len(disabled) - 1} more): {DISABLED_MERGE}")


def _merge_plan(model: nn.Module, adapter_name: str | None) -> tuple[list, dict[str, str]]:
    layers = wrapped_layers(model)
    _refuse_merged(layers, "merge")
    _refuse_disabled(layers)
    plan, skipped = [], {}
    for name, layer in layers:
        adapter = adapter_name or layer.active_adapter
        if adapter is None or adapter not in layer.adapters:
            continue
        if not layer.backend.capabilities.requantize:
            skipped[name] = f"backend {layer.backend.name!r} cannot requantize; the adapter stays unmerged"
            continue
        plan.append((name, layer, adapter))
    if adapter_name is not None and not plan and not skipped:
        _require_adapter(model, adapter_name)
    return plan, skipped


@torch.no_grad()
def merge(
    model: nn.Module, safe: bool = True, adapter_name: str | None = None, keep_snapshot: bool = True
) -> MergeReport:
    """Merge an adapter into every layer's quantized weight (each layer's active one by default).

    With ``safe``, non-finite merged weights are refused. With ``keep_snapshot``, each layer keeps
    its old storage for a bit-identical :func:`unmerge`; without, copies are still held until the
    whole merge succeeded (so a failure can be rolled back) and released then. Layers whose backend
    cannot requantize keep their adapter unmerged; the report lists them, with the reason.

    Raises:
        AdapterStateError: an adapter is already merged somewhere, or adapters are disabled
            (nothing was changed).
        UnsafeMergeError / other: a layer failed; the layers merged before it were put back.
    """
    plan, skipped = _merge_plan(model, adapter_name)
    if keep_snapshot:
        cannot = [n for n, layer, _ in plan if not layer.backend.capabilities.snapshot]
        if cannot:
            raise CapabilityError(f"backend of {cannot[0]} cannot snapshot its storage; merge with keep_snapshot=False")
    if skipped:
        warnings.warn(f"{len(skipped)} layer(s) left unmerged: {next(iter(skipped.values()))}", stacklevel=2)
    done: list[tuple[QuantAdapterLinear, QuantizedWeight | None]] = []
    results: dict[str, MergeResult] = {}
    try:
        for name, layer, adapter in progress(plan, "qadapt merge"):
            undo = None if keep_snapshot else layer.backend.snapshot(layer.base)
            results[name] = layer.merge(safe=safe, adapter_name=adapter, keep_snapshot=keep_snapshot)
            done.append((layer, undo))
    except BaseException:
        for layer, undo in reversed(done):
            if undo is None:
                layer.unmerge("exact")
            else:
                layer.unmerge("inverse", safe=False)
                layer.backend.restore(layer.base, undo)
        raise
    names = {adapter for _, _, adapter in plan}
    return MergeReport(names.pop() if len(names) == 1 else None, results, skipped)


@torch.no_grad()
def unmerge(model: nn.Module, mode: UnmergeMode = "exact") -> None:
    """Take merged adapters back out of every layer (see :meth:`QuantAdapterLinear.unmerge`).

    If a layer fails, the layers unmerged before it are merged again, so the model keeps its state.
    """
    if mode not in ("exact", "inverse"):
        raise ConfigError(f"unmerge mode must be 'exact' or 'inverse', got {shorten(mode)}")
    merged = [(name, layer) for name, layer in wrapped_layers(model) if layer.merged]
    if not merged:
        raise AdapterStateError("no adapter is merged into this model; there is nothing to unmerge")
    done: list[tuple[QuantAdapterLinear, QuantizedWeight, Any]] = []
    try:
        for _, layer in progress(merged, "qadapt unmerge"):
            # Backends swap storage rather than write into it, so holding the merged storage costs no copy;
            # putting it back is bit-identical, where merging again would requantize an inverse-unmerged weight.
            before = (layer.backend.get_storage(layer.base), layer._merged)
            layer.unmerge(mode)
            done.append((layer, *before))
    except BaseException:
        for layer, storage, merged_state in reversed(done):
            layer.backend.set_storage(layer.base, storage)
            layer._merged = merged_state
        raise


def unwrap(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer by its quantized base layer; returns the same model object.

    ``merge=True`` merges each layer's active adapter first (layers already merged stay so), so the
    result computes what the adapted model did. ``merge=False`` unmerges merged layers exactly and
    drops the adapters: the plain quantized model. No qadapt module is left either way.

    Raises:
        AdapterStateError: ``merge=True`` while adapters are disabled (the model computes the plain
            base, which a merge would change); enable them first, or use ``merge=False``.
    """
    layers = wrapped_layers(model)
    if merge:
        cannot = [n for n, layer in layers if not layer.merged and not layer.backend.capabilities.requantize]
        if cannot:
            raise CapabilityError(
                f"cannot unwrap with merge=True: the backend of {cannot[0]} (and {len(cannot) - 1} more) cannot "
                "requantize; use unwrap(model, merge=False) to drop the adapters instead"
            )
        pending = [(n, layer) for n, layer in layers if not layer.merged and layer.active_adapter is not None]
        _refuse_disabled(pending)
        _merge_layers(pending)
    else:
        merged = [layer for _, layer in layers if layer.merged]
        for layer in merged:
            layer.unmerge("exact")
    for name, layer in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer.base)
    shared_state(model).clear()
    return model


def _merge_layers(layers: list[tuple[str, QuantAdapterLinear]]) -> None:
    done: list[QuantAdapterLinear] = []
    try:
        for _, layer in progress(layers, "qadapt merge"):
            layer.merge(safe=True, keep_snapshot=True)
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge("exact")
        raise


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
    _refuse_merged(layers, "add an adapter")
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
    layers = _require_adapter(model, adapter_name)
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
    layers = _require_adapter(model, adapter_name)
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
        _refuse_merged(layers, "disable adapters")
    for _, layer in layers:
        layer.enable_adapters(enabled)


def disable_adapters(model: nn.Module) -> None:
    """Same as ``enable_adapters(model, False)``."""
    enable_adapters(model, False)


# --------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class WrapSummary:
    """Figures of a wrapped model, as returned by :func:`summary`."""

    layers: int
    adapters: list[str]
    backends: dict[str, int]
    merged_layers: int
    trainable_params: int
    total_params: int
    #: bytes of the wrapped layers' quantized weight storage (codes, scales, ...).
    quantized_bytes: int

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
            ]
        )


def summary(model: nn.Module) -> WrapSummary:
    """Layers wrapped, adapters, trainable / total parameters (as stored), bytes of quantized weights."""
    layers = list(adapter_layers(model))
    params = {id(p): p for p in model.parameters()}.values()
    backends = Counter(layer.backend.name or type(layer.backend).__name__ for _, layer in layers)
    return WrapSummary(
        layers=len(layers),
        adapters=list_adapters(model),
        backends=dict(backends),
        merged_layers=sum(layer.merged for _, layer in layers),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        quantized_bytes=sum(layer.backend.get_storage(layer.base).nbytes for _, layer in layers),
    )
