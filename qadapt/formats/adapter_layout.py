"""The qadapt adapter checkpoint layout, read and checked without touching any model.

A checkpoint directory holds

* ``qadapt_adapter.safetensors``: the adapter tensors, keyed ``<layer name>.<adapter state key>``
  (shared method state under ``__shared__.<key>``), and in its header the whole checkpoint
  description (config, layer shapes, versions);
* ``qadapt_config.json``: the same description, for people and tools. The weights file's header
  holds this file's SHA-256, so a config left by another save is refused on load, not trusted.

Each file is read once, from one open handle (see :mod:`qadapt.formats.checkpoint_files`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from qadapt.config import QAdaptConfig, validate_config
from qadapt.errors import CheckpointError, PairMismatchError, QAdaptError, shorten
from qadapt.formats.checkpoint_files import (
    CONFIG_DIGEST_KEY,
    MAX_CONFIG_BYTES,
    check_pair,
    parse_json_object,
    parse_safetensors,
    read_once,
    read_pair,
)
from qadapt.protocols import Method

WEIGHTS_FILE = "qadapt_adapter.safetensors"
CONFIG_FILE = "qadapt_config.json"
FORMAT = "qadapt-adapter"
FORMAT_VERSION = 1
SHARED_PREFIX = "__shared__."
HEADER_KEY = "qadapt"


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


def planned_shape_problems(
    method: Method, in_features: int, out_features: int, shapes: Mapping[str, tuple[int, ...]], layer: str
) -> list[str]:
    """How a file's tensor shapes (``shapes``: the adapter's state-dict keys) differ from the adapter
    ``method`` builds for an ``in_features -> out_features`` layer, found on the meta device: nothing is
    allocated, so a config that asks for ``r=65536`` over rank-4 tensors is refused before it costs memory.

    [] when they agree, or when the method's adapter cannot be built on the meta device (then the
    load's own check, after allocating, decides).
    """
    try:
        with torch.device("meta"):
            adapter = method.create_adapter(in_features, out_features, None)
        expected = {key: tuple(t.shape) for key, t in adapter.state_dict().items()}
    except Exception:  # a plugin's create_adapter may need real tensors (random draws, .item())
        return []
    problems = []
    for key in sorted(set(expected) | set(shapes)):
        if key not in shapes or key not in expected:
            continue  # missing and unexpected keys are reported by the load with their names
        if tuple(shapes[key]) != expected[key]:
            problems.append(
                f"tensor {layer}.{key!s} has shape {tuple(shapes[key])} in the file; an adapter with the config's "
                f"options on this {in_features} -> {out_features} layer holds {expected[key]}"
            )
    return problems


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


class _Description(BaseModel):
    """The checkpoint description in the weights file's header (and in ``qadapt_config.json``)."""

    model_config = ConfigDict(extra="allow")

    format: str
    format_version: int
    config: dict[str, Any]
    layers: dict[str, tuple[PositiveInt, PositiveInt]]
    #: the model's plain float linears outside the adapted layers when it was saved (None: not recorded).
    float_linears: list[str] | None = None
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
        raise CheckpointError(f"{path}: header field {HEADER_KEY!r} is not valid JSON: {shorten(exc, 200)}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: header field {HEADER_KEY!r} must be a JSON object, got {type(raw).__name__}")
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
    if not os.path.lexists(config_path):
        return  # the weights file describes itself; the config is a copy for people and tools
    data = read_once(config_path, limit=MAX_CONFIG_BYTES)
    if CONFIG_DIGEST_KEY in metadata:
        check_pair(metadata, data, path, config_path)
        return
    # Checkpoints written before the digest: the config must say what the header says.
    if parse_json_object(data, config_path) != json.loads(metadata[HEADER_KEY]):
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
    if not os.path.lexists(path):
        hint = (
            " (it looks like a PEFT adapter: use qadapt.load_peft_adapter)"
            if (directory / "adapter_config.json").is_file()
            else ""
        )
        raise CheckpointError(f"no qadapt checkpoint in {directory}: {WEIGHTS_FILE} is missing{hint}")
    metadata, tensors = parse_safetensors(read_once(path), path)
    header = metadata.get(HEADER_KEY)
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
