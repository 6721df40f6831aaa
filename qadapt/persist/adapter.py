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

Each file is read once, from one open handle (see :mod:`qadapt.formats.checkpoint_files`). Layer names
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qadapt import registry
from qadapt.config import AUTO_BACKEND, REGEX_PREFIX, PluginSpec, QAdaptConfig, check_adapter_name
from qadapt.errors import CheckpointError, QAdaptError, shorten
from qadapt.formats.adapter_layout import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    HEADER_KEY,
    SHARED_PREFIX,
    WEIGHTS_FILE,
    AdapterCheckpoint,
    dedupe_tensors,
    mismatch_problem,
    read_adapter,
)
from qadapt.formats.checkpoint_files import (
    CONFIG_DIGEST_KEY,
    atomic_write,
    sha256,
)
from qadapt.formats.peft_layout import PEFT_CONFIG_FILE
from qadapt.model import distributed
from qadapt.model.adapters import add_adapter, list_adapters
from qadapt.model.layer import QuantAdapterLinear
from qadapt.model.layers import adapter_layers, canonical_adapter_layers, refuse_merged, shared_state
from qadapt.model.targeting import canonical_names
from qadapt.model.transaction import Transaction, transaction
from qadapt.model.wrap import resolve_wrap_config, wrap_resolved
from qadapt.protocols import Backend, Method
from qadapt.registry.interop import interop_hooks
from qadapt.version import __version__

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
    """The tensors of the adapter's shared method state that a checkpoint stores (see
    :mod:`qadapt.registry.interop`)."""
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


def float_linears(model: nn.Module) -> list[str]:
    """Canonical names of the model's plain float ``nn.Linear`` layers outside every qadapt layer.

    What a float linear stayed at training time: an export to a quantized format keeps these in
    float by default, so the exported model is the one that was trained (a model wrapped with
    ``backend="bnb4", targets=[...]`` has its targets quantized and nothing else).
    """
    names = canonical_names(model)
    carriers = [names[n] for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantAdapterLinear)]
    found = set()
    for actual, module in model.named_modules():
        canonical = names.get(actual, actual)
        if any(canonical == c or canonical.startswith(c + ".") for c in carriers):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and type(weight) is nn.Parameter and weight.dtype.is_floating_point:
            found.add(canonical)
    return sorted(found)


def _checkpoint_description(model: nn.Module, adapter_name: str) -> dict[str, Any]:
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
        merge_aware=all(layer.merge_aware for _, layer in carriers),
    )
    dumped = config.model_dump(mode="json")
    if not dumped["merge_aware"]:  # written only when set: checkpoints of ordinary adapters read as before
        del dumped["merge_aware"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": dumped,
        "layers": {name: [layer.in_features, layer.out_features] for name, layer in carriers},
        "float_linears": float_linears(model),
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
    description = _checkpoint_description(model, name)
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
        metadata = {HEADER_KEY: header, CONFIG_DIGEST_KEY: sha256(config_bytes)}
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(stored, tmp, metadata=metadata))
        atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_bytes(config_bytes))
    distributed.barrier(sharded)
    return directory


# ---------------------------------------------------------------------------------------- load


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
def as_checkpoint_error(what: str) -> Iterator[None]:
    """Re-raise a qadapt error other than a :class:`CheckpointError` as a CheckpointError starting with ``what``.

    (The undo on failure is the enclosing :func:`~qadapt.model.transaction.transaction`'s.)
    """
    try:
        yield
    except CheckpointError:
        raise
    except QAdaptError as exc:
        raise CheckpointError(f"{what}: {exc}") from exc


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    backend: str | None = None,
    is_trainable: bool = True,
) -> nn.Module:
    """Load a :func:`save_adapter` checkpoint (or a PEFT adapter directory) onto ``model``; returns the same
    model object.

    * ``model`` already carries the adapter (same name): its tensors are replaced.
    * ``model`` is wrapped at the checkpoint's layers but lacks the adapter: it is added.
    * ``model`` is not wrapped: it is wrapped from the checkpoint's config first (``backend``
      overrides the saved backend, e.g. to load an adapter trained on ``bnb4`` onto a float model).
      This is PEFT's ``PeftModel.from_pretrained(model, directory)`` in one call.

    A directory with only PEFT's files (``adapter_config.json``) goes to :func:`qadapt.load_peft_adapter`
    (onto a model not wrapped yet). ``adapter_name`` renames the adapter on load. ``is_trainable``:
    the loaded adapter's parameters train (qadapt's default; PEFT's ``from_pretrained`` defaults to
    False, inference only). The values round-trip exactly.

    Raises:
        CheckpointError: the checkpoint is unreadable or does not fit (method, options, layer names,
            tensor shapes or dtypes); the model is left unchanged.
        AdapterStateError: an adapter is merged into the model (``qadapt.unmerge`` it first).
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    refuse_merged(adapter_layers(model), "load an adapter")
    if not (Path(directory) / WEIGHTS_FILE).is_file() and (Path(directory) / PEFT_CONFIG_FILE).is_file():
        from qadapt.persist.peft import load_peft_adapter

        name = adapter_name or "default"
        model = load_peft_adapter(model, directory, backend=backend or AUTO_BACKEND, adapter_name=name)
        _set_trainable(model, name, is_trainable)
        return model
    ckpt = read_adapter(directory)
    name = adapter_name or ckpt.config.adapter_name
    layers = canonical_adapter_layers(model)
    wrapped = {n for n, _ in layers}
    targets = set(ckpt.layers)
    carriers = {n for n, layer in layers if name in layer.adapters}
    if targets & wrapped and not targets <= wrapped and not carriers:
        raise CheckpointError(
            f"the model is wrapped at some of the checkpoint's layers but not all "
            f"(not wrapped: {', '.join(sorted(targets - wrapped)[:5])})"
        )
    with transaction(model) as tx:
        tx.keep_layers(layer for _, layer in layers)
        if carriers:
            pass  # the adapter is there: only its tensors are replaced
        elif targets <= wrapped:
            method = registry.method_class(ckpt.config.method.name)(ckpt.config.method.options)
            actual = actual_names(model)
            add_adapter(model, name, method, targets=[_exact(actual[t]) for t in sorted(targets)])
        else:
            _wrap_from(model, ckpt, name, backend, tx)
        problems = _check_fit(model, ckpt, name)
        if problems:
            raise CheckpointError(f"checkpoint {directory} does not fit this model:\n  " + "\n  ".join(problems))
        _copy_in(model, ckpt, name)
    _set_trainable(model, name, is_trainable)
    return model


def _set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    for _, layer in adapter_layers(model):
        if name in layer.adapters:
            layer.adapters[name].requires_grad_(trainable)


def _exact(name: str) -> str:
    return REGEX_PREFIX + re.escape(name)


def actual_names(model: nn.Module) -> dict[str, str]:
    """``{canonical name: name in model}`` for every module (see :func:`qadapt.model.targeting.canonical_names`)."""
    return {canonical: actual for actual, canonical in canonical_names(model).items()}


def _wrap_from(model: nn.Module, ckpt: AdapterCheckpoint, name: str, backend: str | None, tx: Transaction) -> None:
    actual = actual_names(model)
    targets = [_exact(actual.get(t, t)) for t in ckpt.layers]
    cfg = ckpt.config.model_copy(update={"adapter_name": name, "targets": targets})
    if backend is not None:
        cfg = cfg.model_copy(update={"backend": PluginSpec(name=backend)})
    with as_checkpoint_error("cannot wrap the model from the checkpoint's config"):
        resolved, method, backend_arg, targets, exclude = resolve_wrap_config(
            None, AUTO_BACKEND, None, None, None, None, name, cfg
        )
        wrap_resolved(model, resolved, method, backend_arg, targets, exclude, into=tx)


@torch.no_grad()
def _copy_in(model: nn.Module, ckpt: AdapterCheckpoint, name: str) -> None:
    shared = {}
    for key, target in adapter_tensors(model, name).items():
        if key.startswith(SHARED_PREFIX):
            shared[key[len(SHARED_PREFIX) :]] = ckpt.tensors[key]
        else:
            distributed.assign(target, ckpt.tensors[key])
    load_shared_tensors(model, name, shared)
