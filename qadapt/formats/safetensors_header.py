"""The one safetensors header parser: every check the format makes, before any tensor byte is read.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header + the data. The header
maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data) and may hold ``"__metadata__"``: string to string. Both the in-memory reader of adapter
checkpoints (:mod:`qadapt.formats.checkpoint_files`) and the streamed reader of model checkpoints
(:mod:`qadapt.formats.hf_checkpoint`) parse through here, so a file refused by one is refused by both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qadapt.errors import CheckpointError, shorten

#: The safetensors format's own cap on its JSON header (100 MB); larger is refused unread.
MAX_HEADER_BYTES = 100_000_000

#: Bits per element of every dtype code safetensors (0.8) reads; any other code is refused, as
#: safetensors refuses it. A sub-byte tensor (``F4``, ``F6_*``) must fill whole bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip


_MAX_U64 = 2**64 - 1


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; ``begin``/``end`` are offsets into the data section."""

    key: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file: {what}")


def header_length(prefix: bytes, file_size: int, path: Path) -> int:
    """The header length ``N`` from the file's first 8 bytes, checked against the cap and the file size."""
    if len(prefix) < 8 or file_size < 8:
        raise _bad(path, f"{file_size} bytes, shorter than its header")
    size = int.from_bytes(prefix[:8], "little")
    if size > min(MAX_HEADER_BYTES, file_size - 8):
        raise _bad(path, f"its header length field says {size} bytes, the file holds {file_size - 8} after it")
    return size


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads`` object hook: a key given twice is refused (JSON would keep the last silently)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_header(raw: bytes, data_size: int, path: Path) -> tuple[dict[str, str], list[HeaderEntry]]:
    """``(metadata, entries in data order)`` from the header's bytes; ``data_size``: bytes after the header.

    Raises:
        CheckpointError: naming ``path`` and the field: not UTF-8 JSON, a key given twice, not an
            object, metadata that is not string to string, a dtype code safetensors does not read, a
            shape or offset pair that is malformed, a byte count that does not fit the dtype and
            shape, tensors that overlap, or data not covered exactly.
    """
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise _bad(path, f"its header names {shorten(str(exc))} twice") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad(path, f"its header is not UTF-8 JSON ({shorten(exc, 200)})") from exc
    if not isinstance(header, dict):
        raise _bad(path, f"its header is a {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, f"header field '__metadata__' must map names to strings, got {shorten(metadata)}")
    entries = [_entry(key, value, data_size, path) for key, value in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            what = "overlaps the tensor before it" if entry.begin < position else f"leaves bytes {position}.. unused"
            raise _bad(path, f"tensor {shorten(entry.key)} starts at data byte {entry.begin} and {what}")
        position = entry.end
    if position != data_size:
        raise _bad(path, f"its tensors cover {position} of the {data_size} data bytes after the header")
    return metadata, entries


def _entry(key: str, value: object, data_size: int, path: Path) -> HeaderEntry:
    where = f"header field {shorten(key)}"
    if not isinstance(value, dict):
        raise _bad(path, f"{where} must be an object with dtype, shape and data_offsets, got {shorten(value)}")
    code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPE_BITS:
        codes = ", ".join(DTYPE_BITS)
        raise _bad(path, f"{where}.dtype must be one of the safetensors dtype codes ({codes}), got {shorten(code)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(path, f"{where}.shape must be a list of non-negative integers, got {shorten(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        bound = f"0 <= begin <= end <= {data_size}"
        raise _bad(path, f"{where}.data_offsets must be [begin, end] with {bound}, got {shorten(offsets)}")
    numel = 1
    for d in shape:
        numel *= d
        if numel > _MAX_U64 or d > _MAX_U64:  # safetensors counts elements in 64 bits and refuses an overflow
            raise _bad(path, f"{where}.shape {shorten(shape)} overflows a 64-bit element count")
    bits = numel * DTYPE_BITS[code]
    if bits % 8:
        raise _bad(path, f"tensor {shorten(key)}: {code} {shape} is {bits} bits, not a whole number of bytes")
    if offsets[1] - offsets[0] != bits // 8:
        raise _bad(
            path,
            f"tensor {shorten(key)} holds {offsets[1] - offsets[0]} bytes, but {code} {shape} needs {bits // 8}",
        )
    return HeaderEntry(key, code, tuple(shape), offsets[0], offsets[1])
