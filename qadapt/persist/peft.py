"""PEFT adapter directories, both ways: ``load_peft_adapter`` and ``save_peft_adapter``.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.<method key>`` (per layer, adapter name removed) and
``base_model.<key>`` (model-level state). This module handles that layout, the common config
fields and the all-or-nothing wrap; what is specific to a method (its config fields and tensor
names) comes from the method plugin's ``interop`` hooks (see :mod:`qadapt.registry.interop`), so the core
knows no method by name.

Both files are read once each (see :mod:`qadapt.formats.checkpoint_files`). A directory written here
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
from qadapt.config import AUTO_BACKEND, REGEX_PREFIX, QAdaptConfig, check_adapter_name, validate_config
from qadapt.errors import CheckpointError, QAdaptError
from qadapt.formats.adapter_layout import planned_shape_problems
from qadapt.formats.checkpoint_files import (
    StrictMapping,
    atomic_write,
    read_pair,
)
from qadapt.formats.peft_layout import (
    LAYER_PREFIX,
    MODEL_PREFIX,
    PEFT_CONFIG_FILE,
    PEFT_FORMAT_VERSION,
    PEFT_WEIGHTS_FILE,
    SETTINGS_DIGEST_KEY,
    peft_hooks,
    read_checked_peft_dir,
    settings_digest,
    split_keys,
)
from qadapt.model import distributed
from qadapt.model.layers import adapter_layers, canonical_adapter_layers, refuse_merged
from qadapt.model.transaction import Transaction, transaction
from qadapt.model.wrap import resolve_wrap_config, wrap_resolved
from qadapt.persist.adapter import (
    actual_names,
    as_checkpoint_error,
    dedupe_tensors,
    load_shared_tensors,
    mismatch_problem,
    shared_tensors,
)
from qadapt.protocols import Method


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
    refuse_merged(adapter_layers(model), "load an adapter")
    directory = Path(directory)
    source = str(directory)
    peft_config, tensors, method_name, hooks, options = read_pair(lambda: read_checked_peft_dir(directory))
    layers, model_level = split_keys(tensors, tuple(hooks.PEFT_LAYER_KEYS), source)
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
    _check_shapes_before_allocating(model, actual, registry.method_class(method_name)(cfg.method.options), states)
    with transaction(model) as tx, as_checkpoint_error(f"the PEFT adapter in {source} does not fit this model"):
        _wrap(model, cfg, tx)
        _load_states(model, adapter_name, states, shared, source)
    return model


def _check_shapes_before_allocating(
    model: nn.Module, actual: Mapping[str, str], method: Method, states: Mapping[str, Mapping[str, torch.Tensor]]
) -> None:
    """Refuse tensors that do not fit the adapters the config describes, before any adapter is made.

    The config chooses the allocation (``r``); the tensors are what the file holds. Each layer's
    adapter is built on the meta device from the model's layer shape and compared with them.
    """
    problems = []
    for name, state in states.items():
        try:
            module = model.get_submodule(actual.get(name, name))
        except AttributeError:
            continue  # a layer the model lacks is reported, with its name, by the load
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if isinstance(in_f, int) and isinstance(out_f, int):
            shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
            problems += planned_shape_problems(method.for_layer(name), in_f, out_f, shapes, name)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(
            f"the PEFT adapter's tensors do not fit its own config (nothing was allocated):\n  {shown}"
        )


def _wrap(model: nn.Module, cfg: QAdaptConfig, tx: Transaction) -> None:
    resolved, method, backend_arg, targets, exclude = resolve_wrap_config(
        None, AUTO_BACKEND, None, None, None, None, cfg.adapter_name, cfg
    )
    wrap_resolved(model, resolved, method, backend_arg, targets, exclude, into=tx)


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
        distributed.assign(target, tensor)  # the one way tensors go into a model (a shard on FSDP2)
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
    hooks = peft_hooks(method)
    if hooks is None:
        raise CheckpointError(
            f"method {method.name or type(method).__name__!r} has no PEFT mapping (its plugin ships no interop "
            "hooks with PEFT_TYPE, see qadapt.registry.interop)"
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
    settings = settings_digest(config["peft_type"], hooks.options_from_peft(config))
    metadata = {"format": "pt", SETTINGS_DIGEST_KEY: settings}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda tmp: save_file(stored, tmp, metadata=metadata))
    atomic_write(directory / PEFT_CONFIG_FILE, lambda tmp: Path(tmp).write_bytes(config_bytes))
    return directory
