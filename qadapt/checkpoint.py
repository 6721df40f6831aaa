"""``save_adapter`` / ``load_adapter``: one adapter's weights, its validated config and versions.

A checkpoint directory holds

* ``qadapt_adapter.safetensors``: the adapter tensors, keyed ``<layer name>.<adapter state key>``
  (shared method state under ``__shared__.<key>``), and in its header the whole checkpoint
  description (config, layer shapes, versions). This file is the checkpoint: it is written to a
  temporary file in the same directory and moved into place with ``os.replace``, so an
  interrupted save leaves the previous checkpoint readable.
* ``qadapt_config.json``: the same description, for people and tools (written after, also
  atomically). The weights file's header holds this file's SHA-256, so a config left by another
  save (a concurrent one, or one a full disk cut short) is refused on load, not trusted.

Each file is read once, from one open handle (see :mod:`qadapt.checkpoint_files`). Layer names
are canonical (without ``torch.compile``'s ``_orig_mod.`` or DDP's ``module.``), and plugins are
recorded by the entry-point name they are registered under.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError
from safetensors.torch import save_file
from torch import nn

from qadapt import distributed, registry
from qadapt.checkpoint_files import (
    CONFIG_DIGEST_KEY,
    MAX_CONFIG_BYTES,
    atomic_write,
    check_pair,
    parse_json_object,
    parse_safetensors,
    read_once,
    read_pair,
    sha256,
)
from qadapt.config import AUTO_BACKEND, PluginSpec, QAdaptConfig, check_adapter_name, validate_config
from qadapt.errors import AdapterStateError, CheckpointError, PairMismatchError, QAdaptError, shorten
from qadapt.hooks import interop_hooks
from qadapt.layer import QuantAdapterLinear
from qadapt.model_ops import add_adapter, delete_adapter, list_adapters
from qadapt.protocols import Backend, Method
from qadapt.targeting import REGEX_PREFIX
from qadapt.wrap import (
    Surgery,
    adapter_layers,
    canonical_adapter_layers,
    canonical_names,
    resolve_wrap_config,
    shared_state,
    wrap_resolved,
)

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


def plugin_name(plugin: Method | Backend) -> str:
    """The registered name of ``plugin`` (see :func:`qadapt.registry.registered_name`).

    Raises:
        CheckpointError: its class is not registered, so no checkpoint naming it could be read back.
    """
    name = registry.registered_name(plugin)
    if name is None:
        kind = "method" if isinstance(plugin, Method) else "backend"
        raise CheckpointError(
            f"{kind} {type(plugin).__name__} is not a registered qadapt plugin, so a checkpoint naming it could "
            f"never be loaded; {registry.registration_hint(plugin)}"
        )
    return name


def mismatch_problem(
    key: str, saved: torch.Tensor, expected: torch.Tensor, where: str = "the checkpoint"
) -> str | None:
    """Why tensor ``saved`` cannot be copied into ``expected`` (shape or dtype), or None.

    Floating-point values may change precision (an adapter saved from a ``model.half()``); any
    other dtype must match exactly, and a conversion may not turn finite values into infinities.
    """
    if tuple(saved.shape) != tuple(expected.shape):
        return f"tensor {key!r} has shape {tuple(saved.shape)} in {where}, {tuple(expected.shape)} in the model"
    if saved.dtype == expected.dtype:
        return None
    if not (saved.dtype.is_floating_point and expected.dtype.is_floating_point):
        return f"tensor {key!r} has dtype {saved.dtype} in {where}, the model's adapter holds {expected.dtype}"
    finite = torch.isfinite(saved)
    if bool((finite & ~torch.isfinite(saved.to(expected.dtype))).any()):
        return f"tensor {key!r} holds values that overflow the model's {expected.dtype} ({saved.dtype} in {where})"
    return None


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


def refuse_merged(model: nn.Module, doing: str) -> None:
    """Raise :class:`AdapterStateError` when an adapter is merged anywhere in ``model``.

    Writing an adapter's tensors while it is merged would leave the base computing the old merge.
    """
    merged = [(name, layer.merged_adapter) for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise AdapterStateError(
            f"cannot {doing} while adapter {merged[0][1]!r} is merged into {len(merged)} layer(s) "
            f"(first: {merged[0][0]}); qadapt.unmerge(model) first"
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
    for name, layer in canonical_adapter_layers(model):
        if adapter_name in layer.adapters:
            for key, tensor in layer.adapters[adapter_name].state_dict().items():
                tensors[f"{name}.{key}"] = tensor
    for key, tensor in shared_tensors(model, adapter_name).items():
        tensors[SHARED_PREFIX + key] = tensor
    return tensors


def _describe(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    carriers = [(n, layer) for n, layer in canonical_adapter_layers(model) if adapter_name in layer.adapters]
    if not carriers:
        raise CheckpointError(
            f"no adapter named {adapter_name!r} on this model; adapters: {', '.join(list_adapters(model)) or '(none)'}"
        )
    method: Method = carriers[0][1].methods[adapter_name]
    method_name = plugin_name(method)
    unique = {id(layer.backend): layer.backend for _, layer in carriers}
    backend_names = {key: plugin_name(backend) for key, backend in unique.items()}
    backends = {
        (backend_names[id(layer.backend)], json.dumps(layer.backend.options.model_dump(mode="json")))
        for _, layer in carriers
    }
    if len(backends) == 1:
        backend_name, backend_options = next(iter(backends))
        backend = PluginSpec(name=backend_name, options=json.loads(backend_options))
    else:
        backend = PluginSpec(name=AUTO_BACKEND)
    config = QAdaptConfig(
        method=PluginSpec(name=method_name, options=method.options.model_dump(mode="json")),
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
                name: _distribution_of(backend)
                for name, backend in {backend_names[id(layer.backend)]: layer.backend for _, layer in carriers}.items()
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
        config_bytes = (json.dumps(description, indent=2, sort_keys=True) + "\n").encode("utf-8")
        metadata = {_HEADER_KEY: header, CONFIG_DIGEST_KEY: sha256(config_bytes)}
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(stored, tmp, metadata=metadata))
        atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_bytes(config_bytes))
    distributed.barrier(sharded)
    return directory


# ---------------------------------------------------------------------------------------- load


class _Description(BaseModel):
    """The checkpoint description in the weights file's header (and in ``qadapt_config.json``)."""

    model_config = ConfigDict(extra="allow")

    format: str
    format_version: int
    config: dict[str, Any]
    layers: dict[str, tuple[PositiveInt, PositiveInt]]
    versions: dict[str, Any] = {}
    aliases: dict[str, str] = {}


@dataclass
class AdapterCheckpoint:
    """A checkpoint as read from disk: its description, config and tensors (on CPU)."""

    description: dict[str, Any]
    config: QAdaptConfig
    tensors: dict[str, torch.Tensor]

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        return {name: (shape[0], shape[1]) for name, shape in self.description["layers"].items()}


def _parse_description(header: str, path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(header)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: header field {_HEADER_KEY!r} is not valid JSON: {shorten(exc, 200)}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: header field {_HEADER_KEY!r} must be a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format {shorten(raw.get('format'))} version {shorten(raw.get('format_version'))}; "
            f"this qadapt reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    try:
        return _Description.model_validate(raw).model_dump()
    except ValidationError as exc:
        problems = [
            f"field {'.'.join(map(str, e['loc']))}: {e['msg']} (got {shorten(e['input'])})"
            for e in exc.errors(include_url=False)[:5]
        ]
        raise CheckpointError(f"{path}: the checkpoint description is damaged:\n  " + "\n  ".join(problems)) from exc


def _check_config_file(directory: Path, metadata: dict[str, str], description: dict[str, Any], path: Path) -> None:
    """Refuse a ``qadapt_config.json`` that was not written with the weights file."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        return  # the weights file describes itself; the config is a copy for people and tools
    data = read_once(config_path, limit=MAX_CONFIG_BYTES)
    if CONFIG_DIGEST_KEY in metadata:
        check_pair(metadata, data, path, config_path)
        return
    # Checkpoints written before the digest: the config must say what the header says.
    if parse_json_object(data, config_path) != json.loads(metadata[_HEADER_KEY]):
        raise PairMismatchError(
            f"{config_path} describes another adapter than {path}: a save was interrupted or another save ran "
            "at the same time; save the adapter again"
        )


def read_adapter(directory: str | os.PathLike[str]) -> AdapterCheckpoint:
    """Read and check a checkpoint directory without touching any model.

    The weights file is read once, from one open handle, and its config file must be the one
    saved with it.

    Raises:
        CheckpointError: missing or corrupt files (naming the file and the field), a foreign
            format, a config file from another save, or a config that does not validate.
    """
    return read_pair(lambda: _read_adapter_once(Path(directory)))


def _read_adapter_once(directory: Path) -> AdapterCheckpoint:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        hint = (
            " (it looks like a PEFT adapter: use qadapt.load_peft_adapter)"
            if (directory / "adapter_config.json").is_file()
            else ""
        )
        raise CheckpointError(f"no qadapt checkpoint in {directory}: {WEIGHTS_FILE} is missing{hint}")
    metadata, tensors = parse_safetensors(read_once(path), path)
    header = metadata.get(_HEADER_KEY)
    if header is None:
        raise CheckpointError(f"{path} has no qadapt description in its header; it was not written by save_adapter")
    description = _parse_description(header, path)
    _check_config_file(directory, metadata, description, path)
    try:
        config = validate_config(description["config"], source=f"{path.name} (saved config)")
    except QAdaptError as exc:
        raise CheckpointError(f"the checkpoint's config no longer validates:\n{exc}") from exc
    for alias, key in description["aliases"].items():
        if key not in tensors:
            raise CheckpointError(f"{path}: alias {shorten(alias)} points to missing tensor {shorten(key)}")
        tensors[alias] = tensors[key]
    return AdapterCheckpoint(description, config, tensors)


def _check_fit(model: nn.Module, ckpt: AdapterCheckpoint, name: str) -> list[str]:
    """Every way the checkpoint does not fit the model's adapter ``name``; empty when it fits."""
    problems = []
    carriers = {n: layer for n, layer in canonical_adapter_layers(model) if name in layer.adapters}
    missing = sorted(set(ckpt.layers) - set(carriers))
    extra = sorted(set(carriers) - set(ckpt.layers))
    if missing:
        problems.append(f"layers in the checkpoint but not adapted in the model: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"layers adapted in the model but not in the checkpoint: {', '.join(extra[:5])}")
    want = ckpt.config.method
    for layer_name, layer in carriers.items():
        method = layer.methods[name]
        have_name = registry.registered_name(method) or type(method).__name__
        if have_name != want.name:
            problems.append(f"{layer_name}: the checkpoint holds method {want.name!r}, the layer has {have_name!r}")
            break
        have = method.options.model_dump(mode="json")
        differ = sorted(k for k in set(have) | set(want.options) if have.get(k) != want.options.get(k))
        if differ:
            problems.append(
                f"{layer_name}: method options differ from the checkpoint's: "
                + ", ".join(f"{k}={shorten(want.options.get(k))} saved vs {shorten(have.get(k))}" for k in differ[:5])
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
        problems.append(f"unexpected tensor {shorten(key)}")
    for key in sorted(set(expected) - set(ckpt.tensors))[:5]:
        problems.append(f"missing tensor {key!r}")
    for key in sorted(set(expected) & set(ckpt.tensors)):
        problem = mismatch_problem(key, ckpt.tensors[key], expected[key])
        if problem is not None:
            problems.append(problem)
    return problems[:20]


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
        CheckpointError: the checkpoint is unreadable or does not fit (method, options, layer names,
            tensor shapes or dtypes); the model is left unchanged.
        AdapterStateError: an adapter is merged into the model (``qadapt.unmerge`` it first).
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    refuse_merged(model, "load an adapter")
    ckpt = read_adapter(directory)
    name = adapter_name or ckpt.config.adapter_name
    layers = canonical_adapter_layers(model)
    wrapped = {n for n, _ in layers}
    targets = set(ckpt.layers)
    carriers = {n for n, layer in layers if name in layer.adapters}
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    actives = [(layer, layer.active_adapter) for _, layer in layers]
    if carriers:
        undo: Callable[[], None] = lambda: None  # noqa: E731
    elif targets <= wrapped:
        method = registry.method_class(ckpt.config.method.name)(ckpt.config.method.options)
        actual = actual_names(model)
        add_adapter(model, name, method, targets=[_exact(actual[t]) for t in sorted(targets)])

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


def actual_names(model: nn.Module) -> dict[str, str]:
    """``{canonical name: name in model}`` for every module (see :func:`qadapt.wrap.canonical_names`)."""
    return {canonical: actual for actual, canonical in canonical_names(model).items()}


def _wrap_from(model: nn.Module, ckpt: AdapterCheckpoint, name: str, backend: str | None, surgery: Surgery) -> None:
    actual = actual_names(model)
    targets = [_exact(actual.get(t, t)) for t in ckpt.layers]
    cfg = ckpt.config.model_copy(update={"adapter_name": name, "targets": targets})
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
