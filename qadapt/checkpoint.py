"""``save_adapter`` / ``load_adapter``: one adapter's weights, its validated config and versions.

A checkpoint directory holds

* ``qadapt_adapter.safetensors``: the adapter tensors, keyed ``<layer name>.<adapter state key>``
  (shared method state under ``__shared__.<key>``), and in its header the whole checkpoint
  description (config, layer shapes, versions). This file is the checkpoint: it is written to a
  temporary file in the same directory and moved into place with ``os.replace``, so an
  interrupted save leaves the previous checkpoint readable.
* ``qadapt_config.json``: the same description, for people and tools (written after, also atomically).

What a method can rebuild from its options (e.g. RandLora's random bases when they are not
saved) is kept out of the adapter's ``state_dict`` by the method (a non-persistent buffer), so it
is regenerated on load rather than stored.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qadapt import distributed, registry
from qadapt.config import AUTO_BACKEND, PluginSpec, QAdaptConfig, validate_config
from qadapt.errors import CheckpointError, QAdaptError
from qadapt.hooks import interop_hooks
from qadapt.layer import QuantAdapterLinear
from qadapt.model_ops import add_adapter, delete_adapter, list_adapters
from qadapt.protocols import Method
from qadapt.targeting import REGEX_PREFIX
from qadapt.wrap import Surgery, adapter_layers, resolve_wrap_config, shared_state, wrap_resolved

WEIGHTS_FILE = "qadapt_adapter.safetensors"
CONFIG_FILE = "qadapt_config.json"
FORMAT = "qadapt-adapter"
FORMAT_VERSION = 1
SHARED_PREFIX = "__shared__."
_HEADER_KEY = "qadapt"


# ------------------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def _package_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distribution_of(obj: object) -> dict[str, str]:
    """``{"distribution": ..., "version": ...}`` of the installed distribution providing ``obj``'s class."""
    top = type(obj).__module__.split(".")[0]
    dists = _package_distributions().get(top, [])
    if not dists:
        return {"distribution": "?", "version": "?"}
    return {"distribution": dists[0], "version": importlib.metadata.version(dists[0])}


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(temporary path)`` and move the result onto ``path`` in one step."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dedupe_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (contiguous, no two sharing memory) and ``{alias: stored key}`` for repeats.

    Shared method state referenced by every layer's adapter is stored once.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        storage = tensor.untyped_storage().data_ptr()
        if (tensor.numel() and storage in storages) or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(tensor.untyped_storage().data_ptr())
        seen[ident] = key
        stored[key] = tensor.cpu() if tensor.device.type != "cpu" else tensor
    return stored, aliases


def _adapter_name(layers: list[tuple[str, QuantAdapterLinear]], adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    active = {layer.active_adapter for _, layer in layers} - {None}
    if len(active) != 1:
        raise CheckpointError(f"the layers have different active adapters ({sorted(active)}); pass adapter_name=")
    return active.pop()


# ---------------------------------------------------------------------------------------- save


def _method_of(model: nn.Module, adapter_name: str) -> Method | None:
    return next(
        (layer.methods[adapter_name] for _, layer in adapter_layers(model) if adapter_name in layer.adapters), None
    )


def shared_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of the adapter's shared method state that a checkpoint stores (see :mod:`qadapt.hooks`)."""
    shared = shared_state(model).get(adapter_name)
    method = _method_of(model, adapter_name)
    if shared is None or method is None:
        return {}
    hooks = interop_hooks(method)
    save = getattr(hooks, "shared_checkpoint_tensors", None)
    return dict(save(shared)) if save is not None else dict(shared.state_dict())


def load_shared_tensors(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Put :func:`shared_tensors` back into the adapter's shared method state."""
    shared = shared_state(model).get(adapter_name)
    method = _method_of(model, adapter_name)
    if shared is None or method is None or not tensors:
        return
    load = getattr(interop_hooks(method), "load_shared_checkpoint_tensors", None)
    if load is not None:
        load(shared, tensors)
    else:
        shared.load_state_dict(tensors, strict=True)


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``adapter_name``: ``<layer>.<key>`` per layer and ``__shared__.<key>``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            for key, tensor in layer.adapters[adapter_name].state_dict().items():
                tensors[f"{name}.{key}"] = tensor
    for key, tensor in shared_tensors(model, adapter_name).items():
        tensors[SHARED_PREFIX + key] = tensor
    return tensors


def _describe(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    carriers = [(n, layer) for n, layer in adapter_layers(model) if adapter_name in layer.adapters]
    if not carriers:
        raise CheckpointError(
            f"no adapter named {adapter_name!r} on this model; adapters: {', '.join(list_adapters(model)) or '(none)'}"
        )
    method: Method = carriers[0][1].methods[adapter_name]
    backends = {
        (layer.backend.name, json.dumps(layer.backend.options.model_dump(mode="json"))) for _, layer in carriers
    }
    if len(backends) == 1:
        backend_name, backend_options = next(iter(backends))
        backend = PluginSpec(name=backend_name or AUTO_BACKEND, options=json.loads(backend_options))
    else:
        backend = PluginSpec(name=AUTO_BACKEND)
    config = QAdaptConfig(
        method=PluginSpec(name=method.name or type(method).__name__, options=method.options.model_dump(mode="json")),
        backend=backend,
        targets=[name for name, _ in carriers],
        adapter_name=adapter_name,
    )
    from qadapt import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.model_dump(mode="json"),
        "layers": {name: [layer.in_features, layer.out_features] for name, layer in carriers},
        "versions": {
            "qadapt": __version__,
            "method": _distribution_of(method),
            "backends": {
                backend.name: _distribution_of(backend)
                for backend in {layer.backend.name: layer.backend for _, layer in carriers}.values()
                if backend.name
            },
        },
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) of ``model`` to ``directory``.

    Returns the directory. The weights file is replaced atomically; see the module docstring.
    """
    layers = list(adapter_layers(model))
    if not layers:
        raise CheckpointError("this model has no qadapt layers; there is no adapter to save")
    name = _adapter_name(layers, adapter_name)
    description = _describe(model, name)
    tensors = adapter_tensors(model, name)
    # A sharded (FSDP2) model: every rank joins the gather, rank 0 writes the whole adapter.
    sharded = any(distributed.is_sharded(t) for t in tensors.values())
    tensors = {key: distributed.full(t) for key, t in tensors.items()}
    directory = Path(directory)
    if distributed.is_writer(sharded):
        stored, aliases = dedupe_tensors(tensors)
        description["aliases"] = aliases
        header = json.dumps(description, sort_keys=True)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(stored, tmp, metadata={_HEADER_KEY: header}))
        text = json.dumps(description, indent=2, sort_keys=True) + "\n"
        atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    distributed.barrier(sharded)
    return directory


# ---------------------------------------------------------------------------------------- load


@dataclass
class AdapterCheckpoint:
    """A checkpoint as read from disk: its description, config and tensors (on CPU)."""

    description: dict[str, Any]
    config: QAdaptConfig
    tensors: dict[str, torch.Tensor]

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        return {name: (shape[0], shape[1]) for name, shape in self.description["layers"].items()}


def read_adapter(directory: str | os.PathLike[str]) -> AdapterCheckpoint:
    """Read and check a checkpoint directory without touching any model.

    Raises:
        CheckpointError: missing or corrupt files, a foreign format, or a config that does not validate.
    """
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        hint = (
            " (it looks like a PEFT adapter: use qadapt.load_peft_adapter)"
            if (Path(directory) / "adapter_config.json").is_file()
            else ""
        )
        raise CheckpointError(f"no qadapt checkpoint in {directory}: {WEIGHTS_FILE} is missing{hint}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(_HEADER_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if header is None:
        raise CheckpointError(f"{path} has no qadapt description in its header; it was not written by save_adapter")
    description = json.loads(header)
    if description.get("format") != FORMAT or description.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format {description.get('format')!r} version {description.get('format_version')!r}; "
            f"this qadapt reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    try:
        config = validate_config(description["config"], source=f"{path.name} (saved config)")
    except QAdaptError as exc:
        raise CheckpointError(f"the checkpoint's config no longer validates:\n{exc}") from exc
    for alias, key in description.get("aliases", {}).items():
        if key not in tensors:
            raise CheckpointError(f"{path}: alias {alias!r} points to missing tensor {key!r}")
        tensors[alias] = tensors[key]
    return AdapterCheckpoint(description, config, tensors)


def _check_fit(model: nn.Module, ckpt: AdapterCheckpoint, name: str) -> list[str]:
    """Every way the checkpoint does not fit the model's adapter ``name``; empty when it fits."""
    problems = []
    carriers = {n: layer for n, layer in adapter_layers(model) if name in layer.adapters}
    missing = sorted(set(ckpt.layers) - set(carriers))
    extra = sorted(set(carriers) - set(ckpt.layers))
    if missing:
        problems.append(f"layers in the checkpoint but not adapted in the model: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"layers adapted in the model but not in the checkpoint: {', '.join(extra[:5])}")
    want = ckpt.config.method
    for layer_name, layer in carriers.items():
        method = layer.methods[name]
        if (method.name or type(method).__name__) != want.name:
            problems.append(f"{layer_name}: the checkpoint holds method {want.name!r}, the layer has {method.name!r}")
            break
        have = method.options.model_dump(mode="json")
        differ = sorted(k for k in set(have) | set(want.options) if have.get(k) != want.options.get(k))
        if differ:
            problems.append(
                f"{layer_name}: method options differ from the checkpoint's: "
                + ", ".join(f"{k}={want.options.get(k)!r} saved vs {have.get(k)!r}" for k in differ)
            )
            break
        shape = ckpt.layers.get(layer_name)
        if shape is not None and shape != (layer.in_features, layer.out_features):
            problems.append(
                f"{layer_name}: {shape[0]} -> {shape[1]} in the checkpoint, "
                f"{layer.in_features} -> {layer.out_features} in the model"
            )
    if problems:
        return problems
    expected = adapter_tensors(model, name)
    for key in sorted(set(ckpt.tensors) - set(expected))[:5]:
        problems.append(f"unexpected tensor {key!r}")
    for key in sorted(set(expected) - set(ckpt.tensors))[:5]:
        problems.append(f"missing tensor {key!r}")
    for key in sorted(set(expected) & set(ckpt.tensors)):
        if tuple(expected[key].shape) != tuple(ckpt.tensors[key].shape):
            problems.append(
                f"tensor {key!r} has shape {tuple(ckpt.tensors[key].shape)} in the checkpoint, "
                f"{tuple(expected[key].shape)} in the model"
            )
    return problems


@contextmanager
def undone_on_failure(surgery: Surgery, what: str) -> Iterator[None]:
    """Undo ``surgery`` if the block raises; a qadapt error other than a CheckpointError is re-raised
    as a CheckpointError starting with ``what``."""
    try:
        yield
    except QAdaptError as exc:
        surgery.undo()
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{what}: {exc}") from exc
    except BaseException:
        surgery.undo()
        raise


@contextmanager
def _all_or_nothing(undo: Callable[[], None]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        undo()
        raise


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Load a :func:`save_adapter` checkpoint onto ``model``; returns the same model object.

    * ``model`` already carries the adapter (same name): its tensors are replaced.
    * ``model`` is wrapped at the checkpoint's layers but lacks the adapter: it is added.
    * ``model`` is not wrapped: it is wrapped from the checkpoint's config first (``backend``
      overrides the saved backend, e.g. to load an adapter trained on ``bnb4`` onto a float model).

    ``adapter_name`` renames the adapter on load. The values round-trip exactly.

    Raises:
        CheckpointError: the checkpoint is unreadable or does not fit (method, options, layer names
            or shapes); the model is left unchanged.
    """
    ckpt = read_adapter(directory)
    name = adapter_name or ckpt.config.adapter_name
    wrapped = {n for n, _ in adapter_layers(model)}
    targets = set(ckpt.layers)
    carriers = {n for n, layer in adapter_layers(model) if name in layer.adapters}
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    actives = [(layer, layer.active_adapter) for _, layer in adapter_layers(model)]
    if carriers:
        undo: Callable[[], None] = lambda: None  # noqa: E731
    elif targets <= wrapped:
        method = registry.method_class(ckpt.config.method.name)(ckpt.config.method.options)
        add_adapter(model, name, method, targets=[_exact(t) for t in sorted(targets)])

        def undo() -> None:
            delete_adapter(model, name)
            for layer, active in actives:
                layer.active_adapter = active
            for param, flag in grad_flags:
                param.requires_grad_(flag)

    elif targets & wrapped:
        raise CheckpointError(
            f"the model is wrapped at some of the checkpoint's layers but not all "
            f"(not wrapped: {', '.join(sorted(targets - wrapped)[:5])})"
        )
    else:
        surgery = Surgery(model)
        undo = surgery.undo
        _wrap_from(model, ckpt, name, backend, surgery)
    with _all_or_nothing(undo):
        problems = _check_fit(model, ckpt, name)
        if problems:
            raise CheckpointError(f"checkpoint {directory} does not fit this model:\n  " + "\n  ".join(problems))
        _copy_in(model, ckpt, name)
    return model


def _exact(name: str) -> str:
    return REGEX_PREFIX + re.escape(name)


def _wrap_from(model: nn.Module, ckpt: AdapterCheckpoint, name: str, backend: str | None, surgery: Surgery) -> None:
    cfg = ckpt.config.model_copy(update={"adapter_name": name, "targets": [_exact(t) for t in ckpt.layers]})
    if backend is not None:
        cfg = cfg.model_copy(update={"backend": PluginSpec(name=backend)})
    with undone_on_failure(surgery, "cannot wrap the model from the checkpoint's config"):
        resolved, method, backend_arg, targets, exclude = resolve_wrap_config(
            None, AUTO_BACKEND, None, None, None, None, name, cfg
        )
        wrap_resolved(model, resolved, method, backend_arg, targets, exclude, surgery=surgery)


@torch.no_grad()
def _copy_in(model: nn.Module, ckpt: AdapterCheckpoint, name: str) -> None:
    shared = {}
    for key, target in adapter_tensors(model, name).items():
        if key.startswith(SHARED_PREFIX):
            shared[key[len(SHARED_PREFIX) :]] = ckpt.tensors[key]
        else:
            distributed.assign(target, ckpt.tensors[key])
    load_shared_tensors(model, name, shared)
