"""Streaming safetensors input and output for :mod:`qadapt.exporting.run`: one tensor in memory at a time.

Input: the headers of a model directory's ``*.safetensors`` files (one file, or shards listed by
``model.safetensors.index.json``) are read without touching the data; tensors are then read with
``safetensors.safe_open`` a layer at a time, or streamed in chunks (copied or cast) without ever
being whole in memory.

Output: :class:`ShardWriter` appends tensors to the current shard file as they come. A shard is
written with room reserved for its header (safetensors allows a header padded with spaces), so
nothing is held until the shard is complete; shards are named and indexed as transformers names
and indexes them (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` with
``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qadapt.errors import CheckpointError, ConfigError
from qadapt.formats.safetensors_header import header_length, parse_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Bytes copied or cast per step when a tensor is streamed (never held whole).
CHUNK_BYTES = 32 * 2**20
#: Room reserved at the start of each shard for its header; a larger header costs one copy of the shard.
HEADER_RESERVE = 1 * 2**20

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
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

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.code)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor entry of one safetensors file, in data order, checked by
    :func:`~qadapt.formats.safetensors_header.parse_header` (no tensor data is read)."""
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            length = header_length(handle.read(8), file_size, path)
            raw = handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    _, parsed = parse_header(raw, file_size - 8 - length, path)
    base = 8 + length
    return {e.key: TensorEntry(e.key, path, e.code, e.shape, base + e.begin, base + e.end) for e in parsed}


def model_entries(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of a transformers model directory (single file or sharded), in file order."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (with a weight_map): {exc}") from exc
        files = list(dict.fromkeys(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        raise CheckpointError(
            f"{directory} holds no {SINGLE_FILE} or {INDEX_FILE}; the export reads transformers safetensors "
            f"checkpoints (found: {', '.join(found) or 'no weight files'})"
        )
    entries: dict[str, TensorEntry] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{INDEX_FILE} in {directory} lists {name}, which is missing")
        entries.update(read_header(path))
    return entries


def read_tensors(entries: Iterable[TensorEntry]) -> dict[str, torch.Tensor]:
    """The tensors of ``entries`` (one layer's worth).

    A tensor of a known dtype is read straight into its own memory (no file mapping, whose pages
    would count as resident beside the copy); others through ``safe_open``, each file opened once.
    """
    by_file: dict[Path, list[str]] = {}
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.dtype is None:
            by_file.setdefault(entry.file, []).append(entry.key)
        else:
            out[entry.key] = read_tensor(entry)
    for path, keys in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in keys:
                    out[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read {', '.join(keys)}: {exc}") from exc
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
            with open(entry.file, "rb") as handle:
                handle.seek(entry.start)
                got = handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:
            raise CheckpointError(f"{entry.file}: cannot read {entry.key}: {exc}") from exc
        if got != entry.nbytes:
            raise CheckpointError(f"{entry.file} ends inside tensor {entry.key!r}")
    return tensor


def parse_size(value: int | str, field: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"2e9"`` or an int -> bytes (transformers' units: GB = 10^9, GiB = 2^30)."""
    if isinstance(value, int) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    if match:
        try:
            number = float(match.group(1))
        except ValueError:
            number = -1.0
        size = int(number * units[(match.group(2) or "B").upper()])
        if size > 0:
            return size
    raise ConfigError(f"{field} must be a positive size such as 2000000000, '5GB' or '500MiB', got {value!r}")


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
            with open(entry.file, "rb") as handle:
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
        with open(entry.file, "rb") as handle:
            handle.seek(entry.start)
            left = entry.numel
            while left:
                count = min(step, left)
                raw = bytearray(handle.read(count * size_in))
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
