"""bnb4 storage seen as codes and per-block scales: keep-state and calibrated requantize, group scales.

A 4-bit weight of ``n = out * in`` elements is ``code[q[k]] * absmax[k // blocksize]`` over the
row-major flattened weight: ``q`` are 4-bit indices into the 16 NF4/FP4 levels (two per byte, first
in the high nibble), ``absmax [ceil(n / blocksize)]`` the block scales. With double quantization the
scales are held as ``uint8`` codes into ``nested_code`` times ``nested_absmax`` (one per 256 scales)
plus ``offset``; the effective scale is what bitsandbytes' ``dequantize_4bit`` computes from them.
"""

from __future__ import annotations

import functools
import math
import warnings

import bitsandbytes.functional as bnbF
import torch

from qadapt import rounding
from qadapt.protocols import CalibrationStats, GroupLayout, QuantizedWeight

#: Calibration rows per input feature below which a calibrated requantize falls back to keep-state
#: (fewer rows measured to give merges worse than no adapter).
MIN_ROWS_PER_FEATURE = 4


@functools.cache
def _codebook(quant_type: str) -> rounding.Codebook:
    return rounding.Codebook(bnbF.get_4bit_type(quant_type, device="cpu"))


def codebook(quant_type: str, device: torch.device) -> rounding.Codebook:
    """The 16 levels of ``quant_type`` (indices are bitsandbytes' 4-bit codes), on ``device``."""
    book = _codebook(quant_type)
    return book if book.levels.device == device else rounding.Codebook(book.levels).to(device)


def numel(storage: QuantizedWeight) -> int:
    return math.prod(storage.meta["shape"])


def layout(storage: QuantizedWeight) -> GroupLayout:
    """One group per absmax block of the flattened weight."""
    blocksize = storage.meta["blocksize"]
    return GroupLayout(group_size=blocksize, num_groups=-(-numel(storage) // blocksize))


def effective_absmax(storage: QuantizedWeight) -> torch.Tensor:
    """The per-block scales ``[num_blocks]`` float32 that dequantize multiplies the levels by."""
    t, m = storage.tensors, storage.meta
    if not m["nested"]:
        return t["absmax"].float()
    state2 = bnbF.QuantState(
        absmax=t["nested_absmax"], code=t["nested_code"], blocksize=m["nested_blocksize"], dtype=m["nested_dtype"]
    )
    # The same operations, in the same order, as bitsandbytes' dequantize_4bit.
    absmax = bnbF.dequantize_blockwise(t["absmax"], state2)
    absmax += t["offset"]
    return absmax.float()


def nested_tensors(scales: torch.Tensor, like: QuantizedWeight, exact: bool = False) -> dict[str, torch.Tensor]:
    """Double-quantize raw ``scales [num_blocks]`` the way bitsandbytes' ``quantize_4bit`` does (same bits).

    ``offset`` the mean, one ``nested_absmax`` per block of ``nested_blocksize`` scales, 8-bit codes
    into ``like``'s 256-entry ``nested_code`` (bitsandbytes' dynamic map). With ``exact``, where at
    most 256 normalized scales are distinct (layers of up to 256 blocks, or repeating scales), the
    code table is those values instead (:func:`qadapt.rounding.exact_levels`), so every scale is held
    exactly; the fixed map moves them by up to 0.25 %. Any table is valid: ``dequantize_4bit`` reads
    it from the state (``weight.nested_quant_map`` in a checkpoint).
    """
    scales = scales.detach().float().reshape(-1).contiguous()
    blocksize = like.meta["nested_blocksize"]
    offset = scales.mean()
    centred = scales - offset
    if exact:
        blocks = torch.nn.functional.pad(centred, (0, -centred.numel() % blocksize)).view(-1, blocksize)
        nested_absmax = blocks.abs().amax(1)
        safe = torch.where(nested_absmax > 0, nested_absmax, 1.0)
        normalized = (blocks / safe.unsqueeze(1)).reshape(-1)[: centred.numel()]
        table = rounding.exact_levels(normalized, 256)
        if table is not None:
            codes = rounding.nearest_sorted(normalized, table).to(torch.uint8)
            return {"absmax": codes, "offset": offset, "nested_absmax": nested_absmax, "nested_code": table}
    qabsmax, state2 = bnbF.quantize_blockwise(centred, code=like.tensors["nested_code"], blocksize=blocksize)
    return {"absmax": qabsmax, "offset": offset, "nested_absmax": state2.absmax, "nested_code": state2.code}


def unpack(storage: QuantizedWeight) -> torch.Tensor:
    """The 4-bit codes ``[n]`` int64 of ``storage``."""
    data = storage.tensors["data"].reshape(-1).view(torch.uint8)
    codes = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)
    return codes[: numel(storage)].to(torch.int64)


def pack(codes: torch.Tensor, like: QuantizedWeight) -> torch.Tensor:
    """Codes ``[n]`` packed two per byte, in ``like``'s data dtype and shape (an odd tail keeps ``like``'s nibble)."""
    old = like.tensors["data"]
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        tail = old.reshape(-1).view(torch.uint8)[-1:] & 0xF
        codes = torch.cat([codes, tail.to(codes.device)])
    pairs = codes.reshape(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    return packed.view(old.dtype).reshape(old.shape)


def with_codes(like: QuantizedWeight, codes: torch.Tensor, scales: torch.Tensor | None) -> QuantizedWeight:
    """New storage with ``codes [n]`` and raw block ``scales`` (None: ``like``'s scale tensors, shared)."""
    tensors = dict(like.tensors)
    tensors["data"] = pack(codes, like)
    if scales is not None:
        if like.meta["nested"]:
            tensors.update(nested_tensors(scales, like))
        else:
            tensors["absmax"] = scales.float().contiguous().clone()
    return QuantizedWeight(tensors, dict(like.meta))


def with_group_scales(storage: QuantizedWeight, scales: torch.Tensor) -> QuantizedWeight:
    """``storage``'s codes with block scales ``scales [num_blocks]`` (double-quantized again if nested, with
    a nested table that holds them exactly where it can: see :func:`nested_tensors`; this is how the
    ``scales`` method merges exactly)."""
    expected = layout(storage).num_groups
    if tuple(scales.shape) != (expected,):
        raise ValueError(f"bnb4 group scales must have shape ({expected},), got {tuple(scales.shape)}")
    tensors = dict(storage.tensors)
    scales = scales.detach().to(storage.tensors["absmax"].device)
    if storage.meta["nested"]:
        tensors.update(nested_tensors(scales, storage, exact=True))
    else:
        tensors["absmax"] = scales.float().contiguous().clone()
    return QuantizedWeight(tensors, dict(storage.meta))


def _target(weight: torch.Tensor, like: QuantizedWeight) -> torch.Tensor:
    shape = tuple(like.meta["shape"])
    weight = weight.detach().float().to(like.tensors["absmax"].device)
    if weight.numel() != numel(like):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit bnb4 storage of shape {shape}")
    return weight.reshape(shape[0], -1) if len(shape) == 2 else weight.reshape(1, -1)


def keep_state(weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
    """``weight`` with ``like``'s scale state kept bit for bit; each code is the nearest level."""
    target = _target(weight, like)
    book = codebook(like.meta["quant_type"], target.device)
    codes = rounding.group_codes(target, effective_absmax(like), like.meta["blocksize"], book, dtype=torch.uint8)
    return with_codes(like, codes, None)


def calibrated(weight: torch.Tensor, like: QuantizedWeight, stats: CalibrationStats) -> QuantizedWeight:
    """Codes and block scales chosen against ``stats.hessian`` (see :func:`qadapt.rounding.calibrated_round`).

    Blocks that do not lie within rows (``in_features % blocksize != 0``) keep their scales and only
    the codes are chosen by error feedback. With double quantization the nested state is built from
    the refit raw scales and the codes are chosen against the scales it really holds.
    """
    target = _target(weight, like)
    in_features = target.shape[1]
    if stats.rows < MIN_ROWS_PER_FEATURE * in_features:
        warn_few_rows(stats.rows, in_features)
        return keep_state(weight, like)
    nested = like.meta["nested"]

    def project(raw: torch.Tensor) -> torch.Tensor:
        return effective_absmax(QuantizedWeight({**like.tensors, **nested_tensors(raw, like)}, like.meta))

    result = rounding.calibrated_round(
        target,
        stats.hessian,
        codebook(like.meta["quant_type"], target.device),
        layout(like),
        effective_absmax(like),
        damp=stats.damp,
        project=project if nested else None,
    )
    return with_codes(like, result.codes, result.scales if result.scales_changed else None)


def warn_few_rows(rows: int, in_features: int) -> None:
    """Warn that ``rows`` calibration rows are too few for ``in_features`` inputs (keep-state is used)."""
    warnings.warn(
        f"calibrated requantize needs at least {MIN_ROWS_PER_FEATURE} x in_features = "
        f"{MIN_ROWS_PER_FEATURE * in_features} calibration rows for this layer, got {rows}; fewer made merges "
        "worse than no adapter, so the layer's scales are kept and codes chosen by nearest rounding",
        UserWarning,
        stacklevel=4,
    )
