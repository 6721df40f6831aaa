"""optimum-quanto's weight tensors as plain tensors, and back, in plain torch (quanto's kernels are not run).

qint8 (``WeightQBytesTensor``, axis 0): ``W = data * scale`` with ``data [out, in]`` int8 and
``scale [out, 1]``. qint4 / qint2 (``WeightQBitsTensor``, axis 0): the weight is cut into rows of
``group_size`` consecutive elements (``[R, g]`` with ``R = out * in / g``; without a group size the
rows are the weight's rows), codes ``q`` are unsigned ``bits``-bit values, and
``W = q * scale - shift`` per row for a float ``shift`` (``(q - shift) * scale`` for an integer zero
point). The codes are packed along dim 0: packed row ``r`` holds the codes of rows ``r + k * P``
(``P = ceil(R / (8 / bits))``) at bits ``k * bits``.

Storage tensors: ``data`` (int8 ``[out, in]``, or the packed uint8 ``[P, g]``), ``scale`` and, for
2/4 bits, ``shift`` (``[R, 1]``). Meta: ``qtype`` (``"qint8"``, ``"qint4"``, ``"qint2"``),
``group_size`` (None: per row), ``shape`` ``(out, in)``.
"""

from __future__ import annotations

import math

import torch

BITS = {"qint8": 8, "qint4": 4, "qint2": 2}


def group_size_for(in_features: int) -> int | None:
    """The group size quanto's ``QLinear`` gives a qint4/qint2 layer: 128, or the largest of 96, 64, 32 that
    divides ``in_features`` when ``in_features > 128``; None (whole rows) otherwise."""
    if in_features <= 128:
        return None
    size = 128
    while in_features % size and size > 32:
        size -= 32
    return size if in_features % size == 0 else None


def rows(shape: tuple[int, int], group_size: int | None) -> tuple[int, int]:
    """``(R, g)``: the grouped shape of a weight ``shape`` (``(out, in)`` without a group size)."""
    out_f, in_f = shape
    if group_size is None:
        return out_f, in_f
    return out_f * in_f // group_size, group_size


def packed_rows(count: int, bits: int) -> int:
    """Rows of the packed uint8 tensor for ``count`` rows of ``bits``-bit codes."""
    return math.ceil(count / (8 // bits))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[R, g]`` (uint8, below ``2**bits``) to quanto's packed uint8 ``[P, g]``."""
    count = codes.shape[0]
    per = packed_rows(count, bits)
    padded = torch.zeros(per * (8 // bits), *codes.shape[1:], dtype=torch.uint8, device=codes.device)
    padded[:count] = codes
    parts = padded.reshape(8 // bits, per, *codes.shape[1:])
    out = torch.zeros(per, *codes.shape[1:], dtype=torch.uint8, device=codes.device)
    for k in range(8 // bits):
        out |= parts[k] << (k * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """quanto's packed uint8 ``[P, g]`` to the unsigned codes ``[count, g]`` uint8 (the inverse of :func:`pack`)."""
    mask = (1 << bits) - 1
    parts = [(packed >> (k * bits)) & mask for k in range(8 // bits)]
    return torch.cat(parts)[:count]


def dequantize(tensors: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """The float32 weight ``[out, in]`` of a storage (float32 arithmetic; quanto's own runs in the scale dtype)."""
    scale = tensors["scale"].float()
    if meta["qtype"] == "qint8":
        return tensors["data"].float() * scale
    count, _ = rows(meta["shape"], meta["group_size"])
    codes = unpack(tensors["data"], BITS[meta["qtype"]], count).float()
    shift = tensors["shift"]
    if shift.dtype.is_floating_point:
        grouped = codes * scale - shift.float()
    else:
        grouped = (codes - shift.float()) * scale
    return grouped.reshape(meta["shape"])
