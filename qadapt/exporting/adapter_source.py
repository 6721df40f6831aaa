"""Adapters as :mod:`qadapt.exporting.run` reads them: a qadapt checkpoint or a PEFT adapter directory.

Nothing here builds a model. Per-layer adapter state is read on demand (a PEFT file is opened
per layer), and an adapter module is made for one layer at a time with the method's own
``create_adapter`` / ``init_adapter``, then loaded with that layer's tensors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qadapt import registry
from qadapt.config import AUTO_BACKEND, REGEX_PREFIX, PluginSpec, validate_config
from qadapt.errors import CheckpointError, QAdaptError, shorten
from qadapt.formats import peft_layout as pl
from qadapt.formats.adapter_layout import SHARED_PREFIX, WEIGHTS_FILE, read_adapter
from qadapt.formats.checkpoint_files import MAX_CONFIG_BYTES, StrictMapping, parse_json_object
from qadapt.formats.hf_checkpoint import file_entries, read_tensor
from qadapt.formats.local_files import InputDirectory
from qadapt.protocols import Backend, BaseLayer, Method, QuantizedWeight
from qadapt.registry.interop import interop_hooks


@dataclass
class AdapterSource:
    """One adapter, readable a layer at a time."""

    directory: Path
    #: ``"qadapt"`` or ``"peft"``.
    kind: str
    name: str
    method: Method
    #: layer name -> ``(in_features, out_features)`` where the checkpoint records it.
    shapes: dict[str, tuple[int, int]]
    layers: list[str]
    read_layer: Callable[[str], dict[str, torch.Tensor]]
    shared_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the backend the adapter was trained on (qadapt checkpoints), else None.
    backend: PluginSpec | None = None
    #: bytes of the tensors held for the whole export (shared state).
    held_bytes: int = 0
    #: layer name -> the shapes of its adapter state as the file holds them, without reading data
    #: (PEFT sources, which record no layer shapes: checked against the base before anything is made).
    state_shapes: Callable[[str], dict[str, tuple[int, ...]]] | None = None
    #: the model's plain float linears (not adapted) when the adapter was saved; None: not recorded
    #: (PEFT adapters, qadapt checkpoints written before it was recorded).
    float_linears: frozenset[str] | None = None

    def create_shared(self, shapes: list[tuple[int, int]]) -> nn.Module | None:
        """The method's shared state for these layer shapes, with the checkpoint's saved tensors put in."""
        shared = self.method.create_shared(shapes)
        if shared is None or not self.shared_tensors:
            return shared
        load = getattr(interop_hooks(self.method), "load_shared_checkpoint_tensors", None)
        if load is not None:
            load(shared, dict(self.shared_tensors))
        else:
            shared.load_state_dict(self.shared_tensors, strict=True)
        return shared

    def adapter_for(
        self,
        layer: str,
        shape: tuple[int, int],
        shared: nn.Module | None,
        backend: Backend,
        storage: QuantizedWeight,
        method: Method | None = None,
    ) -> nn.Module:
        """Layer ``layer``'s adapter module (eval mode) over bare ``storage``, loaded from the checkpoint.

        ``method``: the layer's method instance (default ``self.method.for_layer(layer)``)."""
        in_f, out_f = shape
        method = self.method.for_layer(layer) if method is None else method
        method.check_layer(in_f, out_f)
        adapter = method.create_adapter(in_f, out_f, shared)
        method.init_adapter(adapter, BaseLayer(backend, storage=storage))
        state = self.read_layer(layer)
        try:
            adapter.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{self.directory}: the adapter of {layer} does not fit a {in_f} -> {out_f} layer: {exc}"
            ) from exc
        return adapter.eval()


def read_adapter_source(directory: str | Path | InputDirectory) -> AdapterSource:
    """A qadapt checkpoint directory or a PEFT adapter directory, detected by its files; every file is
    read inside the directory only (:class:`~qadapt.formats.local_files.InputDirectory`)."""
    inputs = directory if isinstance(directory, InputDirectory) else InputDirectory(directory, "ADAPTER")
    if inputs.lexists(WEIGHTS_FILE):
        return _qadapt_source(inputs.path)
    if inputs.lexists(pl.PEFT_CONFIG_FILE):
        return _peft_source(inputs)
    raise CheckpointError(
        f"{inputs} is neither a qadapt checkpoint ({WEIGHTS_FILE}) nor a PEFT adapter "
        f"({pl.PEFT_CONFIG_FILE} + {pl.PEFT_WEIGHTS_FILE})"
    )


def _qadapt_source(directory: Path) -> AdapterSource:
    ckpt = read_adapter(directory)
    cfg = ckpt.config
    method = registry.method_class(cfg.method.name)(cfg.method.options)
    layers = sorted(ckpt.layers, key=len, reverse=True)
    per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    shared: dict[str, torch.Tensor] = {}
    for key, tensor in ckpt.tensors.items():
        if key.startswith(SHARED_PREFIX):
            shared[key[len(SHARED_PREFIX) :]] = tensor
            continue
        owner = next((name for name in layers if key.startswith(name + ".")), None)
        if owner is None:
            raise CheckpointError(f"{directory}: tensor {key!r} belongs to no layer of the checkpoint")
        per_layer[owner][key[len(owner) + 1 :]] = tensor
    backend = None if cfg.backend.name == AUTO_BACKEND else cfg.backend
    recorded = ckpt.description.get("float_linears")
    return AdapterSource(
        directory,
        "qadapt",
        cfg.adapter_name,
        method,
        dict(ckpt.layers),
        list(ckpt.layers),
        lambda name: per_layer[name],
        shared,
        backend,
        held_bytes=sum(t.numel() * t.element_size() for t in ckpt.tensors.values()),
        float_linears=None if recorded is None else frozenset(recorded),
    )


def _peft_source(inputs: InputDirectory) -> AdapterSource:
    # The PEFT directory's own readers are in qadapt.formats.peft_layout; only the headers are read here, and
    # each layer's tensors are read when that layer is merged (PEFT may repeat shared bases per layer).
    directory = inputs.path
    config_path = inputs.real / pl.PEFT_CONFIG_FILE
    peft_config: dict[str, Any] = StrictMapping(
        parse_json_object(inputs.read(pl.PEFT_CONFIG_FILE, MAX_CONFIG_BYTES), config_path), str(config_path), "field"
    )
    entries = file_entries(inputs, pl.PEFT_WEIGHTS_FILE)
    with inputs.open(pl.PEFT_WEIGHTS_FILE)[0] as handle:
        saved_digest = _header_metadata(handle, inputs.real / pl.PEFT_WEIGHTS_FILE).get(pl.SETTINGS_DIGEST_KEY)
    peft_type = peft_config.get("peft_type")
    if not isinstance(peft_type, str):
        raise CheckpointError(
            f"{config_path}: field 'peft_type' must be a string such as 'OFT', got {shorten(peft_type)}"
        )
    method_name, hooks = pl.method_for_peft_type(peft_type, peft_config)
    pl.check_unsupported(peft_config, str(directory))
    pl.check_settings_digest(saved_digest, peft_config, hooks.options_from_peft(peft_config), directory)
    layer_keys, model_keys = pl.split_keys({k: k for k in entries}, tuple(hooks.PEFT_LAYER_KEYS), str(directory))
    try:
        cfg = validate_config(
            {
                "method": {"name": method_name, "options": hooks.options_from_peft(peft_config)},
                "targets": [REGEX_PREFIX + re.escape(name) for name in sorted(layer_keys)],
            },
            source=f"{directory.name}/{pl.PEFT_CONFIG_FILE}",
        )
    except QAdaptError as exc:
        raise CheckpointError(f"the PEFT config does not translate into a valid qadapt config:\n{exc}") from exc
    method = registry.method_class(method_name)(cfg.method.options)
    weights = inputs.real / pl.PEFT_WEIGHTS_FILE

    def read(names: Mapping[str, str], where: str) -> StrictMapping:
        tensors = {}
        for suffix, key in names.items():
            entry = entries[key]
            if entry.dtype is None or not entry.dtype.is_floating_point:
                raise CheckpointError(f"{weights}: tensor {shorten(key)} has dtype {entry.code}; adapters are float")
            tensors[suffix] = read_tensor(entry)
        return StrictMapping(tensors, f"{weights}: {where}")

    def state_shapes(name: str) -> dict[str, tuple[int, ...]]:
        metas = {suffix: torch.empty(entries[key].shape, device="meta") for suffix, key in layer_keys[name].items()}
        state = hooks.layer_from_peft(StrictMapping(metas, f"{weights}: layer {name}"))
        return {key: tuple(t.shape) for key, t in state.items()}

    model_level = read(model_keys, "model-level")
    shared_from = getattr(hooks, "shared_from_peft", None)
    shared = dict(shared_from(peft_config, model_level)) if shared_from is not None else {}
    return AdapterSource(
        directory,
        "peft",
        "default",
        method,
        {},
        sorted(layer_keys),
        lambda name: dict(hooks.layer_from_peft(read(layer_keys[name], f"layer {name}"))),
        shared,
        None,
        held_bytes=sum(t.numel() * t.element_size() for t in shared.values()),
        state_shapes=state_shapes,
    )


def _header_metadata(handle: Any, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of an opened safetensors file, checked by the one header parser."""
    from qadapt.formats.safetensors_header import header_length, parse_header

    size = os.fstat(handle.fileno()).st_size
    length = header_length(handle.read(8), size, path)
    metadata, _ = parse_header(handle.read(length), size - 8 - length, path)
    return metadata
