"""PEFT adapter directories, both ways: ``load_peft_adapter`` and ``save_peft_adapter``.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.<method key>`` (per layer, adapter name removed) and
``base_model.<key>`` (model-level state). This module handles that layout, the common config
fields and the all-or-nothing wrap; what is specific to a method (its config fields and tensor
names) comes from the method plugin's ``interop`` hooks (see :mod:`qadapt.hooks`), so the core
knows no method by name.

Both files are read once each (see :mod:`qadapt.checkpoint_files`). A directory written here
carries, in the weights header, a digest of the method settings its config file holds
(:data:`SETTINGS_DIGEST_KEY`), so a config from another save is refused; fields that change no
tensor (``base_model_name_or_path``, ...) may still be edited by hand.
Layer names are canonical both ways (no ``torch.compile`` or DDP prefixes).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qadapt import registry
from qadapt.checkpoint import (
    actual_names,
    dedupe_tensors,
    load_shared_tensors,
    mismatch_problem,
    refuse_merged,
    shared_tensors,
    undone_on_failure,
)
from qadapt.checkpoint_files import (
    MAX_CONFIG_BYTES,
    StrictMapping,
    atomic_write,
    parse_json_object,
    parse_safetensors,
    read_once,
    read_pair,
    sha256,
)
from qadapt.config import AUTO_BACKEND, QAdaptConfig, check_adapter_name, validate_config
from qadapt.errors import CheckpointError, PairMismatchError, PluginError, QAdaptError, shorten
from qadapt.hooks import interop_hooks
from qadapt.protocols import Method
from qadapt.targeting import REGEX_PREFIX
from qadapt.wrap import Surgery, canonical_adapter_layers, resolve_wrap_config, wrap_resolved

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
LAYER_PREFIX = "base_model.model."
MODEL_PREFIX = "base_model."
#: The PEFT release whose format this module writes and reads.
PEFT_FORMAT_VERSION = "0.21.2"
#: safetensors header key: SHA-256 of the method settings (peft_type and the qadapt options read
#: from the config) that the tensors were saved with.
SETTINGS_DIGEST_KEY = "qadapt_peft_settings_sha256"
_HOOKS = ("PEFT_TYPE", "PEFT_LAYER_KEYS", "options_from_peft", "options_to_peft", "layer_from_peft", "layer_to_peft")


def _peft_hooks(method: Method | type[Method]) -> ModuleType | None:
    hooks = interop_hooks(method)
    if hooks is None or not all(hasattr(hooks, name) for name in _HOOKS):
        return None
    return hooks


def _method_for_peft_type(peft_type: str, config: Mapping[str, Any]) -> tuple[str, ModuleType]:
    """The installed method whose hooks read ``peft_type`` (and accept ``config``, for types several
    methods share); raises listing the types that are supported."""
    supported, matches = set(), []
    for name in registry.names("methods"):
        try:
            cls = registry.method_class(name)
            hooks = _peft_hooks(cls)
        except PluginError:
            continue
        if hooks is None:
            continue
        supported.add(hooks.PEFT_TYPE)
        accepts = getattr(hooks, "accepts_peft", None)
        if hooks.PEFT_TYPE == peft_type and (accepts is None or accepts(cls, config)):
            matches.append((name, hooks))
    if not matches:
        raise CheckpointError(
            f"no installed qadapt method reads PEFT adapters of type {shorten(peft_type)} with this config; "
            f"supported types: {', '.join(sorted(supported)) or '(none)'}"
        )
    return matches[0]


# ------------------------------------------------------------------------------------------ read


def _settings_digest(peft_type: str, options: Mapping[str, Any]) -> str:
    return sha256(json.dumps({"peft_type": peft_type, "options": options}, sort_keys=True, default=str).encode())


def _read_peft_dir(directory: Path) -> tuple[dict[str, Any], dict[str, str], dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT directory, each file read once; a config field that a hook
    reads but the file lacks raises a CheckpointError naming the file and the field."""
    config_path, weights_path = directory / PEFT_CONFIG_FILE, directory / PEFT_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"not a PEFT adapter directory: {path} is missing")
    config_bytes = read_once(config_path, limit=MAX_CONFIG_BYTES)
    metadata, tensors = parse_safetensors(read_once(weights_path), weights_path)
    config = StrictMapping(parse_json_object(config_bytes, config_path), str(config_path), "field")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise CheckpointError(
            f"{config_path}: field 'peft_type' must be a string such as 'OFT', got {shorten(peft_type)}"
        )
    return config, metadata, tensors


def _read_checked_peft_dir(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str, ModuleType, Any]:
    """``(config, tensors, method name, interop hooks, method options)`` of a PEFT directory whose
    two files were saved together (see :func:`qadapt.checkpoint_files.read_pair`)."""
    peft_config, metadata, tensors = _read_peft_dir(directory)
    method_name, hooks = _method_for_peft_type(peft_config["peft_type"], peft_config)
    _check_unsupported(peft_config, str(directory))
    options = hooks.options_from_peft(peft_config)
    check_settings_digest(metadata.get(SETTINGS_DIGEST_KEY), peft_config, options, directory)
    return peft_config, tensors, method_name, hooks, options


def check_settings_digest(saved: str | None, peft_config: Mapping[str, Any], options: Any, directory: Path) -> None:
    """Raise :class:`PairMismatchError` when the weights header's settings digest (``saved``; None
    for directories PEFT itself wrote) does not match the method settings of the config file."""
    if saved is not None and saved != _settings_digest(peft_config["peft_type"], options):
        raise PairMismatchError(
            f"{directory / PEFT_CONFIG_FILE} holds other method settings than the ones "
            f"{PEFT_WEIGHTS_FILE} was saved with: a save was interrupted, another save ran at the same time, or "
            "the method fields were edited; save the adapter again"
        )


def _check_unsupported(config: Mapping[str, Any], source: str) -> None:
    problems = []
    if config.get("bias", "none") != "none":
        problems.append(f"bias={shorten(config['bias'])} (qadapt adapters train no bias; only 'none')")
    if config.get("modules_to_save"):
        modules = shorten(config["modules_to_save"])
        problems.append(f"modules_to_save={modules} (fully trained modules are not adapters)")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=True (Conv1D layers are not supported)")
    if problems:
        raise CheckpointError(f"{source}: unsupported PEFT settings: " + "; ".join(problems))


def _split_keys(
    tensors: Mapping[str, torch.Tensor], layer_keys: tuple[str, ...], source: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{layer: {method key: tensor}}`` and ``{model-level key: tensor}`` from PEFT's flat keys."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    model_level: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(LAYER_PREFIX):
            rest = key[len(LAYER_PREFIX) :]
            suffix = next((s for s in layer_keys if rest.endswith("." + s)), None)
            if suffix is None:
                raise CheckpointError(
                    f"{source}: unexpected tensor {shorten(key)} (known per-layer keys: {layer_keys})"
                )
            layers.setdefault(rest[: -len(suffix) - 1], {})[suffix] = tensor
        elif key.startswith(MODEL_PREFIX):
            model_level[key[len(MODEL_PREFIX) :]] = tensor
        else:
            raise CheckpointError(f"{source}: unexpected tensor {shorten(key)} (PEFT keys start with {MODEL_PREFIX!r})")
    if not layers:
        raise CheckpointError(f"{source}: holds no per-layer adapter tensors")
    return layers, model_level


def load_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    backend: str = AUTO_BACKEND,
    backend_options: Mapping[str, Any] | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Wrap ``model`` (the PEFT adapter's base model, not yet wrapped) with a PEFT adapter directory.

    The method is the installed one whose interop hooks read the directory's ``peft_type``; its
    options come from ``adapter_config.json`` and are validated like any qadapt config. The
    layers are those that have tensors in ``adapter_model.safetensors``; ``backend`` quantizes
    them (``"auto"``: keep each layer's own quantization, float layers stay float).

    Raises:
        CheckpointError: unreadable directory, unsupported type or settings, or tensors that do
            not fit the model; the model is left unchanged.
        AdapterStateError: an adapter is merged into the model (``qadapt.unmerge`` it first).
    """
    check_adapter_name(adapter_name)
    refuse_merged(model, "load an adapter")
    directory = Path(directory)
    source = str(directory)
    peft_config, tensors, method_name, hooks, options = read_pair(lambda: _read_checked_peft_dir(directory))
    layers, model_level = _split_keys(tensors, tuple(hooks.PEFT_LAYER_KEYS), source)
    actual = actual_names(model)
    try:
        cfg = validate_config(
            {
                "method": {"name": method_name, "options": options},
                "backend": {"name": backend, "options": dict(backend_options or {})},
                "targets": [REGEX_PREFIX + re.escape(actual.get(name, name)) for name in sorted(layers)],
                "adapter_name": adapter_name,
            },
            source=f"{directory.name}/{PEFT_CONFIG_FILE}",
        )
    except QAdaptError as exc:
        raise CheckpointError(f"the PEFT config does not translate into a valid qadapt config:\n{exc}") from exc
    weights = directory / PEFT_WEIGHTS_FILE
    states = {
        name: hooks.layer_from_peft(StrictMapping(layer_tensors, f"{weights}: layer {name}"))
        for name, layer_tensors in layers.items()
    }
    shared_from = getattr(hooks, "shared_from_peft", None)
    model_tensors = StrictMapping(model_level, f"{weights}: model-level")
    shared = dict(shared_from(peft_config, model_tensors)) if shared_from is not None else {}
    surgery = Surgery(model)
    with undone_on_failure(surgery, f"the PEFT adapter in {source} does not fit this model"):
        _wrap(model, cfg, surgery)
        _load_states(model, adapter_name, states, shared, source)
    return model


def _wrap(model: nn.Module, cfg: QAdaptConfig, surgery: Surgery) -> None:
    resolved, method, backend_arg, targets, exclude = resolve_wrap_config(
        None, AUTO_BACKEND, None, None, None, None, cfg.adapter_name, cfg
    )
    wrap_resolved(model, resolved, method, backend_arg, targets, exclude, surgery=surgery)


@torch.no_grad()
def _load_states(
    model: nn.Module,
    adapter_name: str,
    states: Mapping[str, Mapping[str, torch.Tensor]],
    shared: Mapping[str, torch.Tensor],
    source: str,
) -> None:
    problems, pairs = [], []
    layers = {name: layer for name, layer in canonical_adapter_layers(model) if adapter_name in layer.adapters}
    for name, state in states.items():
        if name not in layers:
            problems.append(f"{name}: not adapted in the model")
            continue
        target = layers[name].adapters[adapter_name].state_dict()
        if set(target) != set(state):
            problems.append(f"{name}: tensors {sorted(state)}, the adapter has {sorted(target)}")
            continue
        for key, tensor in state.items():
            problem = mismatch_problem(f"{name}.{key}", tensor, target[key], "the PEFT adapter")
            if problem is not None:
                problems.append(problem)
            pairs.append((target[key], tensor))
    current_shared = shared_tensors(model, adapter_name)
    if shared:
        for key, tensor in shared.items():
            if key not in current_shared:
                problems.append(f"shared {key}: shape {tuple(tensor.shape)} in the PEFT adapter, nothing here")
                continue
            problem = mismatch_problem(f"shared {key}", tensor, current_shared[key], "the PEFT adapter")
            if problem is not None:
                problems.append(problem)
    if problems:
        raise CheckpointError(f"the PEFT adapter in {source} does not fit this model:\n  " + "\n  ".join(problems))
    for target, tensor in pairs:
        target.copy_(tensor)
    if shared:
        load_shared_tensors(model, adapter_name, dict(shared))


# ----------------------------------------------------------------------------------------- write


def _peft_config(
    model: nn.Module, method: Method, hooks: ModuleType, layers: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, Any]:
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config: dict[str, Any] = {
        "peft_type": hooks.PEFT_TYPE,
        "peft_version": PEFT_FORMAT_VERSION,
        "task_type": None,
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    config.update(hooks.options_to_peft(method.options.model_dump(mode="json"), layers))
    return config


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as a PEFT adapter directory.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it onto the same base model
    (float; for a quantized qadapt model, the float model with the dequantized weights computes
    what the qadapt model computes). Files are replaced atomically. Returns the directory.

    Raises:
        CheckpointError: the method has no PEFT mapping, or nothing to save.
    """
    carriers = canonical_adapter_layers(model)
    if not carriers:
        raise CheckpointError("this model has no qadapt layers; there is no adapter to save")
    if adapter_name is None:
        active = {layer.active_adapter for _, layer in carriers} - {None}
        if len(active) != 1:
            raise CheckpointError(f"the layers have different active adapters ({sorted(active)}); pass adapter_name=")
        adapter_name = active.pop()
    carriers = [(name, layer) for name, layer in carriers if adapter_name in layer.adapters]
    if not carriers:
        raise CheckpointError(f"no adapter named {adapter_name!r} on this model")
    method = carriers[0][1].methods[adapter_name]
    hooks = _peft_hooks(method)
    if hooks is None:
        raise CheckpointError(
            f"method {method.name or type(method).__name__!r} has no PEFT mapping (its plugin ships no interop "
            "hooks with PEFT_TYPE, see qadapt.hooks)"
        )
    shared = shared_tensors(model, adapter_name)
    states = {name: dict(layer.adapters[adapter_name].state_dict()) for name, layer in carriers}
    tensors: dict[str, torch.Tensor] = {}
    for name, state in states.items():
        for key, tensor in hooks.layer_to_peft(state, shared).items():
            tensors[f"{LAYER_PREFIX}{name}.{key}"] = tensor
    shared_to = getattr(hooks, "shared_to_peft", None)
    if shared_to is not None:
        for key, tensor in shared_to(method.options.model_dump(mode="json"), shared).items():
            tensors[MODEL_PREFIX + key] = tensor
    config = _peft_config(model, method, hooks, states)
    # PEFT's files hold every tensor on its own (no aliases), so repeated ones are copied.
    stored, aliases = dedupe_tensors(tensors)
    for alias, key in aliases.items():
        stored[alias] = stored[key].clone()
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    settings = _settings_digest(config["peft_type"], hooks.options_from_peft(config))
    metadata = {"format": "pt", SETTINGS_DIGEST_KEY: settings}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda tmp: save_file(stored, tmp, metadata=metadata))
    atomic_write(directory / PEFT_CONFIG_FILE, lambda tmp: Path(tmp).write_bytes(config_bytes))
    return directory
