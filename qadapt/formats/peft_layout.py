"""The PEFT adapter directory layout, read and checked without touching any model.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.<method key>`` (per layer, adapter name removed) and
``base_model.<key>`` (model-level state). What is specific to a method (its config fields and
tensor names) comes from the method plugin's ``interop`` hooks (:mod:`qadapt.registry.interop`).
A directory qadapt writes carries, in the weights header, a digest of the method settings its
config holds (:data:`SETTINGS_DIGEST_KEY`), so a config from another save is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from qadapt import registry
from qadapt.errors import CheckpointError, PairMismatchError, PluginError, shorten
from qadapt.formats.checkpoint_files import (
    MAX_CONFIG_BYTES,
    StrictMapping,
    parse_json_object,
    parse_safetensors,
    read_once,
    sha256,
)
from qadapt.protocols import Method
from qadapt.registry.interop import interop_hooks

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


def peft_hooks(method: Method | type[Method]) -> ModuleType | None:
    hooks = interop_hooks(method)
    if hooks is None or not all(hasattr(hooks, name) for name in _HOOKS):
        return None
    return hooks


def method_for_peft_type(peft_type: str, config: Mapping[str, Any]) -> tuple[str, ModuleType]:
    """The installed method whose hooks read ``peft_type`` (and accept ``config``, for types several
    methods share); raises listing the types that are supported."""
    supported, matches = set(), []
    for name in registry.names("methods"):
        try:
            cls = registry.method_class(name)
            hooks = peft_hooks(cls)
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


def settings_digest(peft_type: str, options: Mapping[str, Any]) -> str:
    return sha256(json.dumps({"peft_type": peft_type, "options": options}, sort_keys=True, default=str).encode())


def read_peft_dir(directory: Path) -> tuple[dict[str, Any], dict[str, str], dict[str, torch.Tensor]]:
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


def read_checked_peft_dir(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str, ModuleType, Any]:
    """``(config, tensors, method name, interop hooks, method options)`` of a PEFT directory whose
    two files were saved together (see :func:`qadapt.formats.checkpoint_files.read_pair`)."""
    peft_config, metadata, tensors = read_peft_dir(directory)
    method_name, hooks = method_for_peft_type(peft_config["peft_type"], peft_config)
    check_unsupported(peft_config, str(directory))
    options = hooks.options_from_peft(peft_config)
    check_settings_digest(metadata.get(SETTINGS_DIGEST_KEY), peft_config, options, directory)
    return peft_config, tensors, method_name, hooks, options


def check_settings_digest(saved: str | None, peft_config: Mapping[str, Any], options: Any, directory: Path) -> None:
    """Raise :class:`PairMismatchError` when the weights header's settings digest (``saved``; None
    for directories PEFT itself wrote) does not match the method settings of the config file."""
    if saved is not None and saved != settings_digest(peft_config["peft_type"], options):
        raise PairMismatchError(
            f"{directory / PEFT_CONFIG_FILE} holds other method settings than the ones "
            f"{PEFT_WEIGHTS_FILE} was saved with: a save was interrupted, another save ran at the same time, or "
            "the method fields were edited; save the adapter again"
        )


def check_unsupported(config: Mapping[str, Any], source: str) -> None:
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


def split_keys(
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
