"""Reading and writing the files of a checkpoint directory, for qadapt and PEFT checkpoints alike.

Every file is read **once**, from one open handle, into memory, and parsed from those bytes: a
save that replaces the file meanwhile (``os.replace``) can never mix one file's header with
another file's data. Every way a file can be malformed ends in a :class:`CheckpointError` that
names the file and, where there is one, the field.

A checkpoint is two files written one after the other (tensors, then a JSON config). The tensor
file's header carries the SHA-256 of the config file written with it (:data:`CONFIG_DIGEST_KEY`),
so a config from another save (a concurrent one, or one cut short by a full disk) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from qadapt.errors import CheckpointError, PairMismatchError, clip, shorten
from qadapt.formats.local_files import InputDirectory
from qadapt.formats.safetensors_header import header_length, parse_header

T = TypeVar("T")

#: safetensors header metadata key holding the SHA-256 (hex) of the config file saved with the tensors.
CONFIG_DIGEST_KEY = "qadapt_config_sha256"
#: Checkpoint configs are small; a larger JSON config file is refused unread (user config files: see
#: :data:`qadapt.config.sources.MAX_CONFIG_FILE_BYTES`).
MAX_CONFIG_BYTES = 16 * 2**20


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_once(path: Path, limit: int | None = None) -> bytes:
    """The whole file, read through one open handle (a later rename of ``path`` cannot change it).

    The file is opened inside its own directory only (:class:`~qadapt.formats.local_files.InputDirectory`):
    a symlink out of the checkpoint directory, or a FIFO or device, is refused.
    """
    directory = InputDirectory(path.parent, "the checkpoint directory")
    return directory.read(path.name, limit)


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


def parse_safetensors(data: bytes, path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(header metadata, tensors)`` of a safetensors file's bytes; the tensors own their memory.

    Raises:
        CheckpointError: naming ``path`` and what is wrong (length, header JSON, a header field,
            or the tensor data).
    """
    size = header_length(data[:8], len(data), path)
    metadata, _ = parse_header(data[8 : 8 + size], len(data) - 8 - size, path)
    try:
        views = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        # safetensors reports a bad header entry (dtype, shape, offsets) as one of these.
        raise CheckpointError(f"{path} is not a readable safetensors file: {shorten(exc, 300)}") from exc
    # safetensors' tensors are views of immutable Python ``bytes`` (torch.frombuffer): writable
    # through torch, freed by a Python deleter. Copy each into ordinary tensor memory (one at a
    # time, so the peak is the file plus one tensor) before they reach parameters or collectives.
    tensors = {}
    for key in list(views):
        tensors[key] = views.pop(key).clone()
    return metadata, tensors


def parse_json_object(data: bytes, path: Path) -> dict[str, Any]:
    """The JSON object in ``data`` (a config file's bytes).

    Raises:
        CheckpointError: not UTF-8, not JSON, nested too deep, or not an object; naming ``path``.
    """
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{path} is nested too deeply to be a config") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_pair(read: Callable[[], T]) -> T:
    """``read()``, once more when it met a :class:`PairMismatchError`.

    A save that replaces both files while a load reads them leaves the load with one file of each
    save; reading again after the save has finished gets a consistent pair. A second mismatch is
    raised: the pair on disk really disagrees (an interrupted save, or an edited file).
    """
    try:
        return read()
    except PairMismatchError:
        return read()


def check_pair(metadata: Mapping[str, str], config_bytes: bytes, weights: Path, config: Path) -> None:
    """Refuse a config file that was not written with the tensors file (see the module docstring)."""
    digest = metadata.get(CONFIG_DIGEST_KEY)
    if digest is not None and digest != sha256(config_bytes):
        raise PairMismatchError(
            f"{config} was not written with {weights} (the weights' header holds another config digest): "
            "a save was interrupted or another save ran at the same time; save the adapter again"
        )


class StrictMapping(dict):
    """A checkpoint's tensors or config fields by name; a missing key raises a :class:`CheckpointError`
    naming ``where`` (not a KeyError).

    Handed to plugins' interop hooks so a damaged checkpoint reads as one.
    """

    def __init__(self, tensors: Mapping[str, Any], where: str, what: str = "tensor") -> None:
        super().__init__(tensors)
        self.where = where
        self.what = what

    def __missing__(self, key: str) -> Any:
        have = ", ".join(sorted(map(str, self))[:8]) or "(none)"
        raise CheckpointError(f"{self.where}: {self.what} {shorten(key)} is missing (has: {clip(have, 200)})")
