"""GGUF block formats in torch: decode and encode the blocks exactly as the ``gguf`` package stores them.

Every supported type stores a weight row as blocks of ``block`` weights in ``nbytes`` bytes. Inside a block,
weights fall into groups of ``group`` (the whole block for the legacy types, 32 or 16 for the K-quants), and
each weight is ``level * scale + offset`` of its group: ``level = index + low`` with ``index`` the stored
bits (an unsigned integer), ``scale`` and ``offset`` (absent: no add) decoded from the block header in float32
exactly as ``gguf.quants`` does, so dequantizing here is bit-equal to ``gguf.quants.dequantize``.

Shapes: ``blocks [n, nbytes]`` uint8 (one block a row), ``index [n, block]`` int64, ``scale`` and
``offset`` ``[n, block // group]`` float32. A layer's storage is ``[out, in // block * nbytes]`` uint8, the
rows of the file's own tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qadapt.errors import CapabilityError


@dataclass(frozen=True)
class BitField:
    """Where some bits of each weight's index live: ``bits`` bits at ``shift`` in byte ``start + byte[e]``."""

    start: int
    byte: tuple[int, ...]
    shift: tuple[int, ...]
    bits: int


def _nibbles(start: int, block: int, half: int) -> BitField:
    """Low nibbles then high nibbles in runs of ``half`` bytes (element ``e`` of a run of ``2*half``)."""
    byte, shift = [], []
    for e in range(block):
        run, rest = divmod(e, 2 * half)
        byte.append(run * half + rest % half)
        shift.append(4 * (rest // half))
    return BitField(start, tuple(byte), tuple(shift), 4)


def _packed(start: int, block: int, width: int) -> BitField:
    """``width``-bit fields packed in order, little-endian: element ``e`` in byte ``e // (8 // width)``."""
    per = 8 // width
    return BitField(start, tuple(e // per for e in range(block)), tuple(e % per * width for e in range(block)), width)


def _bits(start: int, block: int, width: int, run: int) -> BitField:
    """``width``-bit fields: element ``e = a*run*(8//width) + s*run + j`` in byte ``a*run + j`` at ``s*width``."""
    per = 8 // width
    byte, shift = [], []
    for e in range(block):
        a, rest = divmod(e, run * per)
        s, j = divmod(rest, run)
        byte.append(a * run + j)
        shift.append(s * width)
    return BitField(start, tuple(byte), tuple(shift), width)


@dataclass(frozen=True)
class BlockType:
    """One GGUF block format (see the module docstring)."""

    name: str
    type_id: int
    block: int
    nbytes: int
    group: int
    low: int
    fields: tuple[BitField, ...]
    has_offset: bool = False
    #: "fp16": one float16 scale (and min) in the header, writable; "k": 6- or 8-bit sub-block scales.
    header: str = "fp16"
    #: Q8_0 stores signed bytes: index = byte ^ 0x80.
    signed_bytes: bool = False
    _maps: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def high(self) -> int:
        return self.low + (1 << sum(f.bits for f in self.fields)) - 1

    @property
    def fresh(self) -> bool:
        """True where this module reproduces the ``gguf`` package's quantizer (the legacy types)."""
        return self.header == "fp16"

    def levels(self) -> torch.Tensor:
        """The levels ``[L]`` float32 an index stands for."""
        return torch.arange(self.low, self.high + 1, dtype=torch.float32)

    def _map(self, f: BitField, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(byte index [block], shift [block] uint8, bytes covered)`` of a field, cached per device."""
        key = (f.start, f.bits, str(device))
        if key not in self._maps:
            byte = torch.tensor(f.byte, dtype=torch.int64, device=device) + f.start
            shift = torch.tensor(f.shift, dtype=torch.uint8, device=device)
            self._maps[key] = (byte, shift, torch.unique(byte))
        return self._maps[key]

    # ------------------------------------------------------------------ decode

    def index(self, blocks: torch.Tensor) -> torch.Tensor:
        """Stored indices ``[n, block]`` uint8 of ``blocks [n, nbytes]`` (at most 8 bits: uint8 throughout)."""
        out: torch.Tensor | None = None
        low_bits = 0
        for f in self.fields:
            byte, shift, _ = self._map(f, blocks.device)
            part = (blocks[:, byte] >> shift) & ((1 << f.bits) - 1)
            out = part if out is None else out | (part << low_bits)
            low_bits += f.bits
        assert out is not None
        return out ^ 0x80 if self.signed_bytes else out

    def params(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, offset)`` ``[n, block // group]`` float32 (offset None when the type has none)."""
        if self.header == "fp16":
            d = _f16(blocks, 0)
            return d, (_f16(blocks, 2) if self.has_offset else None)
        if self.name == "Q6_K":
            scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
            return _f16(blocks, 208) * scales, None
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _k_scale_min(blocks[:, 4:16])
        return d * sc.float(), -(dmin * mn.float())

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        """Float32 weights ``[n, block]`` of ``blocks [n, nbytes]`` (bit-equal to ``gguf.quants``)."""
        n = blocks.shape[0]
        groups = self.block // self.group
        level = self.index(blocks).float().add_(self.low).reshape(n, groups, self.group)
        scale, offset = self.params(blocks)
        out = scale.unsqueeze(-1) * level
        if offset is not None:
            out = out + offset.unsqueeze(-1)
        return out.reshape(n, self.block)

    # ------------------------------------------------------------------ encode

    def with_index(self, blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """New blocks: ``blocks``' headers (scales, mins) kept byte for byte, indices ``[n, block]`` written."""
        index = index.to(torch.uint8)
        if self.signed_bytes:
            index = index ^ 0x80
        out = blocks.clone()
        low_bits = 0
        for f in self.fields:
            byte, shift, covered = self._map(f, blocks.device)
            part = ((index >> low_bits) & ((1 << f.bits) - 1)) << shift
            packed = torch.zeros(blocks.shape[0], self.nbytes, dtype=torch.uint8, device=blocks.device)
            packed.scatter_add_(1, byte.expand(blocks.shape[0], -1), part)  # the bits are disjoint: add is or
            out[:, covered] = packed[:, covered]
            low_bits += f.bits
        return out

    def with_header(self, blocks: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """New blocks with float16 scales ``d [n]`` (and mins ``m [n]``); indices kept. Legacy types only."""
        if self.header != "fp16":
            raise CapabilityError(f"{self.name} stores sub-block scales as small integers; they are kept as they are")
        out = blocks.clone()
        out[:, 0:2] = d.to(torch.float16).reshape(-1, 1).view(torch.uint8)
        if self.has_offset and m is not None:
            out[:, 2:4] = m.to(torch.float16).reshape(-1, 1).view(torch.uint8)
        return out

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks ``[n, nbytes]`` of float32 ``x [n, block]``, bit-equal to ``gguf.quants.quantize``."""
        if not self.fresh:
            raise CapabilityError(
                f"a fresh {self.name} quantizer (llama.cpp's K-quant scale search) is not reproduced here; {self.name} "
                "layers are requantized keeping their block scales and mins"
            )
        x = x.float()
        if self.has_offset:
            hi, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
            d = (hi - lo) / float(self.high)
            inv = torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))
            index = torch.trunc((x - lo) * inv + 0.5).clamp(0, self.high)
            m = lo
        elif self.signed_bytes:
            d = x.abs().amax(-1, keepdim=True) / 127.0
            inv = torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))
            index = _round_away(x * inv) + 128
            m = None
        else:
            pick = x.abs().argmax(-1, keepdim=True)
            d = x.gather(-1, pick) / float(self.low)
            inv = torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))
            index = torch.trunc(x * inv + (-self.low + 0.5)).clamp(0, self.high - self.low)
            m = None
        empty = torch.zeros(x.shape[0], self.nbytes, dtype=torch.uint8, device=x.device)
        return self.with_index(self.with_header(empty, d, m), index.to(torch.int64))


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of each block, as float32 ``[n, 1]``."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes ``[n, 12]`` -> the 6-bit sub-block scales and mins, ``[n, 8]`` each."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as ggml's ``roundf`` (the ``gguf`` package's ``np_roundf``)."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


_Q4 = _nibbles(0, 32, 16)
TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q8_0", 8, 32, 34, 32, -128, (BitField(2, tuple(range(32)), (0,) * 32, 8),), signed_bytes=True),
        BlockType("Q4_0", 2, 32, 18, 32, -8, (_nibbles(2, 32, 16),)),
        BlockType("Q4_1", 3, 32, 20, 32, 0, (_nibbles(4, 32, 16),), has_offset=True),
        BlockType("Q5_0", 6, 32, 22, 32, -16, (_nibbles(6, 32, 16), _packed(2, 32, 1))),
        BlockType("Q5_1", 7, 32, 24, 32, 0, (_nibbles(8, 32, 16), _packed(4, 32, 1)), has_offset=True),
        BlockType("Q4_K", 12, 256, 144, 32, 0, (_nibbles(16, 256, 32),), has_offset=True, header="k"),
        BlockType(
            "Q5_K", 13, 256, 176, 32, 0, (_nibbles(48, 256, 32), _bits(16, 256, 1, 32)), has_offset=True, header="k"
        ),
        BlockType("Q6_K", 14, 256, 210, 16, -32, (_nibbles(0, 256, 64), _bits(128, 256, 2, 32)), header="k"),
    )
}
BY_ID: dict[int, BlockType] = {t.type_id: t for t in TYPES.values()}
