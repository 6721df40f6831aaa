"""compressed-tensors' ``pack-quantized`` layout in plain torch (no compressed-tensors import).

A row of ``n`` signed ``b``-bit codes (``b`` in 4, 8) is shifted to unsigned (``code + 2**(b-1)``) and
packed little-endian into ``int32`` words: element ``j`` of a row sits in word ``j * b // 32`` at bit
``(j * b) % 32``. With ``n * b`` a multiple of 32 (the backend requires it), a row of ``n`` codes is
``n * b / 32`` words and no code crosses a word boundary.

Shapes: codes ``[out, in]`` int8, packed ``[out, in * b / 32]`` int32.
"""

from __future__ import annotations

import torch

#: Bit widths this module packs (a code never straddles two words).
PACKABLE_BITS = (4, 8)


def packed_columns(in_features: int, num_bits: int) -> int:
    """Words per row for ``in_features`` codes of ``num_bits`` bits (``in_features * num_bits`` divisible by 32)."""
    return in_features * num_bits // 32


def pack(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed codes ``[out, in]`` (int8, within ``num_bits``) to ``int32 [out, in * num_bits / 32]``."""
    per_word = 32 // num_bits
    out_f, in_f = codes.shape
    unsigned = (codes.to(torch.int64) + (1 << (num_bits - 1))).reshape(out_f, in_f // per_word, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * num_bits
    words = (unsigned << shifts).sum(-1)  # < 2**32: the bit fields are disjoint
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: torch.Tensor, num_bits: int, in_features: int) -> torch.Tensor:
    """``int32 [out, in * num_bits / 32]`` to signed int8 codes ``[out, in_features]`` (the inverse of :func:`pack`)."""
    per_word = 32 // num_bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * num_bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    return (fields.reshape(packed.shape[0], -1)[:, :in_features] - (1 << (num_bits - 1))).to(torch.int8)
