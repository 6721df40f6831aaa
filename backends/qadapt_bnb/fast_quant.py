"""A one-pass CPU 4-bit quantizer whose output is bit-identical to bitsandbytes' own ``quantize_4bit``.

bitsandbytes 0.50.2 quantizes 4-bit weights on CPU with a pure-PyTorch kernel: per block of
``blocksize`` values it scales by ``1 / absmax`` into ``[-1, 1]`` and finds each value's code with
``torch.bucketize`` over the 15 midpoints between the 16 levels (several eager passes over the
weight plus a binary search). Here the search is a table lookup instead: ``[-1, 1]`` is cut into
:data:`CELLS` equal cells, each holding at most one midpoint, so one table read and one compare
give the code. The whole chain absmax → scale → cell → code → pack is one function that
``torch.compile`` (inductor's C++ backend) fuses; where compilation is unavailable the same
function runs eagerly (same bits, no faster).

Why the bits match: the scaling is the same float32 arithmetic in the same order
(``x * (1 / max(absmax, 1e-38))``, clamped); the cell tables are built from the exact float32
interval of values each cell receives (found with ``nextafter``), so ``base[c] + (x > bound[c])``
equals "number of midpoints below ``x``", which is what ``bucketize`` returns; NaN gets the code
``bucketize`` gives NaN. :func:`self_check` compares against bitsandbytes on awkward inputs, and
:func:`quantize_4bit` is only worth routing through where it passed.

Shapes: ``A`` any shape with ``n`` elements → packed codes ``[ceil(n / 2), 1]`` in
``quant_storage`` (two codes per byte, first in the high nibble), ``absmax [ceil(n / blocksize)]``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import bitsandbytes.functional as bnbF
import torch

#: Cells over [-1, 1]; a power of two so the cell index ``floor((x + 1) * CELLS / 2)`` has one rounding.
CELLS = 4096
_QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class _Tables:
    """Lookup tables for one quant type: ``base [CELLS]`` int32, ``bound [CELLS]`` float32, ``order [16]`` int32.

    ``midpoints [15]``: the midpoints between the sorted levels, as bitsandbytes computes them.
    """

    midpoints: torch.Tensor
    base: torch.Tensor
    bound: torch.Tensor
    order: torch.Tensor
    nan_code: int


def _cell_of(x: torch.Tensor) -> torch.Tensor:
    """The cell index of float32 values in ``[-1, 1]`` (the fused kernel computes the same)."""
    return torch.clamp(torch.floor((x + 1.0) * (CELLS / 2)), 0, CELLS - 1).to(torch.int32)


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 → int64 keys in the same order as the values (-0.0 and +0.0 share a key)."""
    bits = x.float().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_order_key(key: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_order_key` (negative keys give negative floats)."""
    bits = torch.where(key < 0, (-key) | (-(2**31)), key)
    return bits.to(torch.int32).view(torch.float32)


@functools.cache
def _tables(quant_type: str) -> _Tables:
    code = bnbF.get_4bit_type(quant_type, device="cpu").float()
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2  # float32, as bitsandbytes computes them

    # First float32 of each cell, by a binary search over float32 values in order (cells are monotone in x).
    target = torch.arange(CELLS, dtype=torch.int32)
    lo = torch.full((CELLS,), _order_key(torch.tensor(-1.0)).item(), dtype=torch.int64)
    hi = torch.full((CELLS,), _order_key(torch.tensor(1.0)).item(), dtype=torch.int64)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2  # floor division: mid < hi wherever lo < hi
        reached = _cell_of(_from_order_key(mid)) >= target
        hi = torch.where(reached, mid, hi)
        lo = torch.where(reached, lo, mid + 1)
    first = _from_order_key(lo)
    after_last = torch.cat([first[1:], torch.tensor([torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))])])

    base = torch.bucketize(first, midpoints, out_int32=True)
    inside = (midpoints[None, :] >= first[:, None]) & (midpoints[None, :] < after_last[:, None])  # [CELLS, 15]
    if int(inside.sum(dim=1).max()) > 1:
        raise RuntimeError(f"{CELLS} cells are too coarse for the {quant_type} midpoints")
    bound = torch.where(inside.any(dim=1), (inside * midpoints).sum(dim=1), torch.tensor(float("inf"))).float()
    nan_code = int(torch.bucketize(torch.tensor([float("nan")]), midpoints, out_int32=True))
    return _Tables(midpoints, base, bound, order.to(torch.int32), nan_code)


def _codes_packed(
    blocks: torch.Tensor, base: torch.Tensor, bound: torch.Tensor, order: torch.Tensor, nan_code: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocks [B, blocksize]`` float32 → (packed codes ``[B * blocksize / 2]`` uint8, absmax ``[B]``)."""
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
    is_nan = torch.isnan(scaled)
    cell = torch.clamp(torch.floor((torch.where(is_nan, 0.0, scaled) + 1.0) * (CELLS / 2)), 0, CELLS - 1).long()
    sorted_code = base[cell] + (scaled > bound[cell]).to(torch.int32)
    sorted_code = torch.where(is_nan, nan_code, sorted_code)
    q = order[sorted_code.long()].to(torch.uint8).reshape(-1, 2)
    return (q[:, 0] << 4) | q[:, 1], absmax


_compiled = None
_compile_failed = False


def _kernel(use_compile: bool):
    global _compiled, _compile_failed
    if not use_compile or _compile_failed:
        return _codes_packed
    if _compiled is None:
        _compiled = torch.compile(_codes_packed, dynamic=True, fullgraph=True)
    return _compiled


def _packed_and_absmax(
    flat: torch.Tensor, blocksize: int, quant_type: str, use_compile: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    global _compile_failed
    t = _tables(quant_type)
    n = flat.numel()
    full = n - n % blocksize
    parts: list[torch.Tensor] = []
    absmaxes: list[torch.Tensor] = []
    if full:
        blocks = flat[:full].reshape(-1, blocksize)
        try:
            packed, absmax = _kernel(use_compile)(blocks, t.base, t.bound, t.order, t.nan_code)
        except Exception as exc:  # compilation can fail in many ways (no compiler, sandbox, ...)
            if not use_compile:
                raise
            _compile_failed = True
            warnings.warn(
                f"qadapt fast 4-bit quantizer: torch.compile unavailable ({exc!r}); running eagerly", stacklevel=2
            )
            packed, absmax = _codes_packed(blocks, t.base, t.bound, t.order, t.nan_code)
        nan_blocks = torch.isnan(absmax)
        if bool(nan_blocks.any()):
            # A compiled max reduction may return a NaN with another bit pattern than eager's; take eager's.
            absmax = absmax.clone()
            absmax[nan_blocks] = blocks[nan_blocks].abs().max(dim=-1)[0]
        parts.append(packed)
        absmaxes.append(absmax)
    if n > full:
        # The last, partial block: bitsandbytes divides by its absmax here instead of multiplying.
        tail = flat[full:]
        am = tail.abs().max().clamp(min=1e-38)
        scaled = torch.clamp(tail / am, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = t.order[torch.bucketize(scaled, t.midpoints, out_int32=True).long()].to(torch.uint8).reshape(-1, 2)
        parts.append((q[:, 0] << 4) | q[:, 1])
        absmaxes.append(am.reshape(1))
    packed = parts[0] if len(parts) == 1 else torch.cat(parts)
    absmax = absmaxes[0] if len(absmaxes) == 1 else torch.cat(absmaxes)
    return packed, absmax


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
    *,
    use_compile: bool = True,
) -> tuple[torch.Tensor, bnbF.QuantState]:
    """Drop-in for ``bitsandbytes.functional.quantize_4bit`` on CPU tensors (same arguments, same bits).

    ``use_compile=False`` runs the eager version of the same kernel.
    """
    if A.device.type != "cpu":
        raise ValueError(f"the fast 4-bit quantizer runs on CPU tensors, got one on {A.device}")
    if quant_type not in _QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize}")
    if A.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"A must be float32, float16 or bfloat16, got {A.dtype}")
    packed, absmax = _packed_and_absmax(A.reshape(-1).float().contiguous(), blocksize, quant_type, use_compile)
    packed = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    code = bnbF.get_4bit_type(quant_type, device=A.device)
    if compress_statistics:
        offset = absmax.mean()
        nested_absmax, nested_state = bnbF.quantize_blockwise(absmax - offset, blocksize=256)
        state = bnbF.QuantState(
            absmax=nested_absmax,
            shape=A.shape,
            dtype=A.dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
            offset=offset,
            state2=nested_state,
        )
    else:
        state = bnbF.QuantState(
            absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code, quant_type=quant_type
        )
    return packed, state


def _probe() -> torch.Tensor:
    """Awkward values: zeros, exact midpoints (ties), subnormals, huge/tiny scales, NaN, ±inf, ±0."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(64 * 64, generator=g), torch.zeros(128)]
    for quant_type in _QUANT_TYPES:
        levels = bnbF.get_4bit_type(quant_type, device="cpu").float().sort().values
        mids = (levels[:-1] + levels[1:]) / 2
        # A block whose absmax is 1: its midpoints are exact ties after scaling.
        tie_block = torch.cat(
            [torch.tensor([1.0]), mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)]
        )
        parts.append(torch.nn.functional.pad(tie_block, (0, 64 - tie_block.numel() % 64)))
    parts += [
        torch.randn(64, generator=g) * 1e-40,  # subnormals
        torch.randn(64, generator=g) * 1e30,
        torch.tensor([float("nan")] + [0.5] * 63),
        torch.tensor([float("inf"), -1.0] + [0.25] * 62),
        torch.tensor([-0.0, 0.0] * 32),
        torch.randn(37, generator=g),  # a partial last block, odd count
    ]
    return torch.cat(parts)


def self_check(use_compile: bool = True) -> bool:
    """True when this quantizer reproduces bitsandbytes bit for bit on :func:`_probe` for every setting."""
    data = _probe()
    for quant_type in _QUANT_TYPES:
        for blocksize in (32, 64, 128, 4096):
            for nested in (False, True):
                ref, ref_state = bnbF.quantize_4bit(
                    data, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
                )
                got, got_state = quantize_4bit(
                    data,
                    blocksize=blocksize,
                    compress_statistics=nested,
                    quant_type=quant_type,
                    use_compile=use_compile,
                )
                if not (_same(ref, got) and _same(ref_state.absmax, got_state.absmax)):
                    return False
                if nested and not (_same(ref_state.offset, got_state.offset)):
                    return False
    return True


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


#: Below this many elements bitsandbytes' own quantizer is used: the compiled kernel's one-time
#: compilation (seconds) only pays off on large weights.
FAST_MIN_ELEMENTS = 1 << 20

_verified: bool | None = None


def verified() -> bool:
    """Whether the compiled quantizer passed :func:`self_check` in this process (checked once, lazily)."""
    global _verified
    if _verified is None:
        try:
            _verified = self_check(use_compile=True)
        except Exception as exc:  # a broken toolchain must not break quantization: fall back to bitsandbytes
            warnings.warn(f"qadapt fast 4-bit quantizer disabled: its self-check raised {exc!r}", stacklevel=2)
            _verified = False
        if _verified is False:
            warnings.warn("qadapt fast 4-bit quantizer disabled: it does not reproduce bitsandbytes here", stacklevel=2)
    return _verified and not _compile_failed


def quantize_4bit_auto(
    A: torch.Tensor,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, bnbF.QuantState]:
    """``bitsandbytes.functional.quantize_4bit``, through the fast kernel where it is known to give the same bits.

    That is: a CPU tensor of at least :data:`FAST_MIN_ELEMENTS` elements, in a process where
    :func:`verified` holds. Everything else goes to bitsandbytes unchanged.
    """
    kwargs = {
        "blocksize": blocksize,
        "compress_statistics": compress_statistics,
        "quant_type": quant_type,
        "quant_storage": quant_storage,
    }
    if A.device.type == "cpu" and A.numel() >= FAST_MIN_ELEMENTS and quant_type in _QUANT_TYPES and verified():
        return quantize_4bit(A, **kwargs)
    return bnbF.quantize_4bit(A, **kwargs)
