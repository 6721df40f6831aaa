"""Streaming safetensors input and output for :mod:`qadapt.exporting.run`: one tensor in memory at a time.

Input: the headers of a model directory's ``*.safetensors`` files (one file, or shards listed by
``model.safetensors.index.json``) are read and checked (:mod:`.safetensors_header`) without
touching the data; every file is opened inside the directory only (:mod:`.local_files`). Tensors
are then read by offset from the same, unchanged files, a layer at a time, or streamed in chunks
(copied or cast) without ever being whole in memory.

Output: :class:`ShardWriter` appends tensors to the current shard file as they come. A shard is
written with room reserved for its header (safetensors allows a header padded with spaces), so
nothing is held until the shard is complete; shards are named and indexed as transformers names
and indexes them (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` with
``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from qadapt.errors import CheckpointError, ConfigError, shorten
from qadapt.formats.checkpoint_files import parse_json_object
from qadapt.formats.local_files import FileIdentity, InputDirectory
from qadapt.formats.safetensors_header import header_length, parse_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: An index is a few MB even for the largest models; a larger one is refused unread.
MAX_INDEX_BYTES = 64 * 2**20
#: Bytes copied or cast per step when a tensor is streamed (never held whole).
CHUNK_BYTES = 32 * 2**20
#: Room reserved at the start of each shard for its header; a larger header costs one copy of the shard.
HEADER_RESERVE = 1 * 2**20

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it (no data read)."""

    key: str
    file: Path
    code: str
    shape: tuple[int, ...]
    #: absolute byte range of the data in ``file``.
    start: int
    end: int
    #: the file whose header this entry came from: reads must find the same file, unchanged.
    source: FileIdentity | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype | None:
        """The torch dtype, or None for a code torch has no dtype for (``F4``, ``F6_*``): copied as bytes only."""
        return _DTYPES.get(self.code)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point

    def open(self) -> BinaryIO:
        """The entry's file, opened again (the same, unchanged file whose header was read)."""
        if self.source is None:
            return open(self.file, "rb")
        return self.source.open()


def read_header(handle: BinaryIO, identity: FileIdentity, shown: Path) -> dict[str, TensorEntry]:
    """Every tensor entry of one opened safetensors file, in data order, checked by
    :func:`~qadapt.formats.safetensors_header.parse_header` (no tensor data is read).
    ``shown``: the path errors name."""
    try:
        length = header_length(handle.read(8), identity.size, shown)
        raw = handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"{shown} is not a readable safetensors file: {exc}") from exc
    if len(raw) != length:
        raise CheckpointError(f"{shown} ends inside its own header")
    _, parsed = parse_header(raw, identity.size - 8 - length, shown)
    base = 8 + length
    return {e.key: TensorEntry(e.key, shown, e.code, e.shape, base + e.begin, base + e.end, identity) for e in parsed}


def file_entries(directory: InputDirectory, name: str, field: str | None = None) -> dict[str, TensorEntry]:
    """The checked header entries of safetensors file ``name`` inside ``directory``."""
    handle, identity = directory.open(name, field)
    with handle:
        return read_header(handle, identity, directory.real / name)


def _weight_map(directory: InputDirectory) -> dict[str, str]:
    index = directory.real / INDEX_FILE
    data = parse_json_object(directory.read(INDEX_FILE, MAX_INDEX_BYTES), index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: field 'weight_map' must map tensor names to shard files "
            f'({{"model.norm.weight": "model-00001-of-00002.safetensors", ...}}), got {shorten(weight_map)}'
        )
    for key, name in weight_map.items():
        field = f"{index}: weight_map[{shorten(key)}]"
        directory.check_name(name, field)
        if not name.endswith(".safetensors"):
            raise CheckpointError(f"{field} must name a .safetensors file, got {shorten(name)}")
    return weight_map


def model_entries(directory: InputDirectory) -> dict[str, TensorEntry]:
    """Every tensor of a transformers model directory (single file or sharded), in file order.

    Raises:
        CheckpointError: no weights, an index that is not a JSON object with a ``weight_map`` of
            file names inside the directory, a shard header that does not check, or an index and
            shards that disagree (a tensor in two shards, listed for a shard that lacks it, or in a
            shard the index does not map it to).
    """
    if directory.lexists(INDEX_FILE):
        weight_map = _weight_map(directory)
        files = list(dict.fromkeys(weight_map.values()))
    elif directory.lexists(SINGLE_FILE):
        weight_map, files = None, [SINGLE_FILE]
    else:
        found = sorted(p.name for p in directory.real.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        raise CheckpointError(
            f"{directory} holds no {SINGLE_FILE} or {INDEX_FILE}; the export reads transformers safetensors "
            f"checkpoints (found: {', '.join(found) or 'no weight files'})"
        )
    entries: dict[str, TensorEntry] = {}
    owner: dict[str, str] = {}
    for name in files:
        field = None if weight_map is None else f"{INDEX_FILE} shard {shorten(name)}"
        for key, entry in file_entries(directory, name, field).items():
            if key in owner:
                raise CheckpointError(
                    f"{directory}: tensor {shorten(key)} is in two shards, {owner[key]} and {name}; "
                    "a checkpoint holds each tensor once"
                )
            if weight_map is not None and weight_map.get(key) != name:
                mapped = weight_map.get(key)
                where = "does not list it" if mapped is None else f"maps it to {shorten(mapped)}"
                raise CheckpointError(
                    f"{directory}: tensor {shorten(key)} is in shard {name}, but {INDEX_FILE} {where}"
                )
            owner[key] = name
            entries[key] = entry
    if weight_map is not None:
        missing = [key for key in weight_map if key not in entries]
        if missing:
            raise CheckpointError(
                f"{directory}: {INDEX_FILE} maps {len(missing)} tensor(s) to shards that do not hold them "
                f"(e.g. {shorten(missing[0])} in {shorten(weight_map[missing[0]])})"
            )
    return entries


def read_tensors(entries: Iterable[TensorEntry]) -> dict[str, torch.Tensor]:
    """The tensors of ``entries`` (one layer's worth), each read straight into its own memory (no file
    mapping, whose pages would count as resident beside the copy).

    Raises:
        CheckpointError: a dtype torch has no type for (such tensors are only copied as bytes), or a
            file that changed or ends early.
    """
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.dtype is None:
            raise CheckpointError(
                f"{entry.file}: tensor {entry.key!r} has dtype {entry.code}, which torch has no type for; "
                "the export can copy such a tensor but not read it as a layer's weight"
            )
        out[entry.key] = read_tensor(entry)
    return out


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """``entry``'s tensor, read from its file into a new tensor of its dtype and shape."""
    assert entry.dtype is not None
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes != tensor.numel() * tensor.element_size():
        raise CheckpointError(
            f"{entry.file}: tensor {entry.key!r} holds {entry.nbytes} bytes, but {entry.code} {list(entry.shape)} "
            f"needs {tensor.numel() * tensor.element_size()}"
        )
    if entry.nbytes:
        try:
            with entry.open() as handle:
                handle.seek(entry.start)
                got = handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:
            raise CheckpointError(f"{entry.file}: cannot read {entry.key}: {exc}") from exc
        if got != entry.nbytes:
            raise CheckpointError(f"{entry.file} ends inside tensor {entry.key!r}")
    return tensor


#: The largest size accepted (an exabyte: any larger is a typo, and floats lose whole bytes there).
MAX_SIZE = 2**60


def parse_size(value: int | str, field: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"2e9"`` or an int -> bytes (transformers' units: GB = 10^9, GiB = 2^30).

    Raises:
        ConfigError: naming ``field`` and the value: not a size, not positive, not finite, a bool, or
            above :data:`MAX_SIZE`.
    """
    size = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B|B)?\s*", value, flags=re.IGNORECASE)
        units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
        units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
        if match:
            try:
                number = float(match.group(1))
            except ValueError:
                number = math.nan
            scaled = number * units[(match.group(2) or "B").upper()]
            if math.isfinite(scaled):
                size = int(scaled)
    if size is not None and 0 < size <= MAX_SIZE:
        return size
    raise ConfigError(
        f"{field} must be a positive size of at most 2**60 bytes, such as 2000000000, '5GB' or '500MiB', "
        f"got {shorten(value)}"
    )


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_size`` bytes of data, as they come.

    A tensor larger than the limit gets a shard of its own (as in transformers). :meth:`finish`
    names the shards and writes the index; the writer never holds more than one tensor (or one
    chunk of a streamed one).
    """

    def __init__(self, directory: Path, max_shard_size: int) -> None:
        self.directory = directory
        self.max_shard_size = max_shard_size
        self.shards: list[tuple[Path, dict[str, dict]]] = []
        self.bytes_written = 0
        self.numel_written = 0
        self._handle = None
        self._header: dict[str, dict] = {}
        self._offset = 0

    def _room_for(self, nbytes: int) -> None:
        if self._handle is not None and self._offset and self._offset + nbytes > self.max_shard_size:
            self._close_shard()
        if self._handle is None:
            path = self.directory / f".shard-{len(self.shards):05d}.tmp"
            self._handle = open(path, "wb")
            self._handle.seek(8 + HEADER_RESERVE)
            self._path = path
            self._header, self._offset = {}, 0

    def _record(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int, numel: int) -> None:
        if dtype not in _CODES:
            raise CheckpointError(f"tensor {key!r} has dtype {dtype}, which safetensors cannot store")
        self._header[key] = {
            "dtype": _CODES[dtype],
            "shape": list(shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes
        self.bytes_written += nbytes
        self.numel_written += numel

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Append one tensor (written now; the caller may drop it)."""
        nbytes = tensor.numel() * tensor.element_size()
        self._room_for(nbytes)
        self._handle.write(_tensor_bytes(tensor))
        self._record(key, tensor.dtype, tuple(tensor.shape), nbytes, tensor.numel())

    def add_blocks(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], blocks: Iterable[torch.Tensor]) -> None:
        """Append one tensor of ``dtype`` and ``shape`` written as ``blocks`` (its rows in order) come."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.tensor([], dtype=dtype).element_size()
        self._room_for(nbytes)
        start = self._handle.tell()
        written = 0
        try:
            for block in blocks:
                if block.dtype != dtype:
                    raise CheckpointError(f"tensor {key!r}: a block of {block.dtype} in a {dtype} tensor")
                data = _tensor_bytes(block)
                self._handle.write(data)
                written += data.nbytes
            if written != nbytes:
                raise CheckpointError(
                    f"tensor {key!r}: its blocks hold {written} bytes, its shape {list(shape)} needs {nbytes}"
                )
        except BaseException:
            # Take back what was written, so the shard stays consistent with its recorded tensors.
            self._handle.seek(start)
            self._handle.truncate()
            raise
        self._record(key, dtype, shape, nbytes, numel)

    def add_streamed(self, key: str, entry: TensorEntry, dtype: torch.dtype | None = None) -> None:
        """Append ``entry``'s tensor copied from its file in chunks, cast to ``dtype`` when given."""
        source = entry.dtype
        if dtype is None or source is None or dtype == source:
            self._room_for(entry.nbytes)
            with entry.open() as handle:
                handle.seek(entry.start)
                left = entry.nbytes
                while left:
                    chunk = handle.read(min(CHUNK_BYTES, left))
                    if not chunk:
                        raise CheckpointError(f"{entry.file} ends inside tensor {entry.key!r}")
                    self._handle.write(chunk)
                    left -= len(chunk)
            self._record(key, source or torch.uint8, entry.shape, entry.nbytes, entry.numel)
            if source is None:  # an unknown dtype code is copied as it is
                self._header[key]["dtype"] = entry.code
            return
        size_in = torch.tensor([], dtype=source).element_size()
        size_out = torch.tensor([], dtype=dtype).element_size()
        nbytes = entry.numel * size_out
        self._room_for(nbytes)
        step = max(1, CHUNK_BYTES // size_in)
        with entry.open() as handle:
            handle.seek(entry.start)
            left = entry.numel
            while left:
                count = min(step, left)
                raw = bytearray(handle.read(count * size_in))
                if len(raw) != count * size_in:
                    raise CheckpointError(f"{entry.file} ends inside tensor {entry.key!r}")
                part = torch.frombuffer(raw, dtype=source).to(dtype)
                self._handle.write(_tensor_bytes(part))
                left -= count
        self._record(key, dtype, entry.shape, nbytes, entry.numel)

    def _close_shard(self) -> None:
        header = dict(sorted(self._header.items()))
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        handle, path = self._handle, self._path
        if len(text) <= HEADER_RESERVE:
            handle.seek(0)
            handle.write(struct.pack("<Q", HEADER_RESERVE) + text + b" " * (HEADER_RESERVE - len(text)))
            handle.close()
        else:  # a very long header: write it at its own size and move the data behind it
            handle.close()
            padded = text + b" " * (-len(text) % 8)
            moved = path.with_suffix(".moved")
            with open(path, "rb") as src, open(moved, "wb") as dst:
                dst.write(struct.pack("<Q", len(padded)) + padded)
                src.seek(8 + HEADER_RESERVE)
                while chunk := src.read(CHUNK_BYTES):
                    dst.write(chunk)
            os.replace(moved, path)
        self.shards.append((path, self._header))
        self._handle = None

    def finish(self) -> list[Path]:
        """Close the last shard, name the shards as transformers does, write the index; returns the files."""
        if self._handle is not None:
            self._close_shard()
        if not self.shards:
            raise CheckpointError("the export produced no tensors")
        count = len(self.shards)
        names = (
            [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        files = []
        for (path, _), name in zip(self.shards, names, strict=True):
            os.replace(path, self.directory / name)
            files.append(self.directory / name)
        if count > 1:
            weight_map = {key: name for (_, header), name in zip(self.shards, names, strict=True) for key in header}
            index = {
                "metadata": {"total_parameters": self.numel_written, "total_size": self.bytes_written},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.directory / INDEX_FILE).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
            files.append(self.directory / INDEX_FILE)
        return files

    def abort(self) -> None:
        """Close an open shard file (the caller removes the directory)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
