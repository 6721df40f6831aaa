"""The torchao weight formats the backend understands, each quantized by torchao's own code.

A format is recognised by the exact tensor subclass of a linear layer's weight. Its *settings*
(a plain dict: block size, bit width, mapping, ...) are read back from the tensor itself, so a
layer that the user quantized with ``quantize_`` is requantized with the configuration it was
built with, not with the backend's options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qadapt_torchao._quiet import import_torchao

import_torchao()

from torchao.quantization import (  # noqa: E402
    Int8Tensor,
    Int8WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    MappingType,
    PerAxis,
    PerGroup,
    PerRow,
    PerTensor,
    quantize_,
)
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, to_nf4  # noqa: E402

Settings = dict[str, Any]

_MAPPINGS = {"symmetric": MappingType.SYMMETRIC, "asymmetric": MappingType.ASYMMETRIC}


@dataclass(frozen=True)
class Format:
    """One torchao weight format: how to recognise, read, build and decode it."""

    name: str
    tensor_type: type
    #: True when the tensor is weight-only (no activation quantization in its linear).
    weight_only: Callable[[torch.Tensor], bool]
    #: The settings a tensor of this format was built with.
    settings: Callable[[torch.Tensor], Settings]
    #: ``(float weight [out, in] in the target dtype, settings) -> quantized tensor``.
    quantize: Callable[[torch.Tensor, Settings], torch.Tensor]
    #: The tensor's float weight ``[out, in]`` in its own dtype.
    dequantize: Callable[[torch.Tensor], torch.Tensor]
    #: ``(float weight [out, in], old tensor) -> tensor`` with the old tensor's scales (same objects),
    #: codes chosen nearest against them.
    keep_state: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _through_quantize_(weight: torch.Tensor, config: Any) -> torch.Tensor:
    """Run torchao's ``quantize_`` with ``config`` on a linear holding ``weight`` and return its new weight."""
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    holder.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(holder, config)
    return holder.weight


def _granularity(block_size: list[int] | tuple[int, ...], shape: torch.Size, per_row: Any) -> Any:
    if block_size[0] == 1 and block_size[1] == shape[1]:
        return per_row
    if tuple(block_size) == tuple(shape):
        return PerTensor()
    return PerGroup(block_size[1])


# --------------------------------------------------------------------- int8 weight-only


def _int8_weight_only(t: torch.Tensor) -> bool:
    return all(getattr(t, name, None) is None for name in ("act_quant_kwargs", "act_quant_scale", "act_pre_scale"))


def _int8_settings(t: torch.Tensor) -> Settings:
    return {"block_size": list(t.block_size)}


def _int8_quantize(weight: torch.Tensor, settings: Settings) -> torch.Tensor:
    granularity = _granularity(settings["block_size"], weight.shape, PerRow())
    return _through_quantize_(weight, Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False))


def _int8_keep_state(weight: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    granularity = _granularity(old.block_size, weight.shape, PerRow())
    return Int8Tensor.from_hp(weight, granularity=granularity, scale=old.scale, zero_point=old.zero_point)


INT8 = Format(
    "int8", Int8Tensor, _int8_weight_only, _int8_settings, _int8_quantize, lambda t: t.dequantize(), _int8_keep_state
)


# ------------------------------------------------------------ intx (int1..int8) weight-only


def _intx_settings(t: torch.Tensor) -> Settings:
    zero = t.zero_point
    return {
        "block_size": list(t.block_size),
        "weight_dtype": t.target_dtype,
        # The tensor does not record its mapping; nonzero zero points can only come from an asymmetric one.
        "mapping": "asymmetric" if zero is not None and bool(zero.any()) else "symmetric",
        "scale_dtype": None if t.scale.dtype == t.dtype else t.scale.dtype,
    }


def _intx_quantize(weight: torch.Tensor, settings: Settings) -> torch.Tensor:
    config = IntxWeightOnlyConfig(
        weight_dtype=settings["weight_dtype"],
        granularity=_granularity(settings["block_size"], weight.shape, PerAxis(0)),
        mapping_type=_MAPPINGS[settings["mapping"]],
        scale_dtype=settings["scale_dtype"],
    )
    return _through_quantize_(weight, config)


def _intx_keep_state(weight: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return IntxUnpackedToInt8Tensor.from_hp(
        weight,
        old.block_size,
        old.target_dtype,
        mapping_type=_MAPPINGS[_intx_settings(old)["mapping"]],
        intx_choose_qparams_algorithm=None,
        custom_scale=old.scale,
        custom_zero_point=old.zero_point,
    )


INTX = Format(
    "intx",
    IntxUnpackedToInt8Tensor,
    lambda t: t.activation_quantization is None,
    _intx_settings,
    _intx_quantize,
    lambda t: t.dequantize(),
    _intx_keep_state,
)


# ------------------------------------------------------------------------------- nf4

#: Weights coded per pass when choosing NF4 codes (the nearest-code search holds 16 floats per weight).
_NF4_CHUNK = 1 << 18


def _nf4_keep_state(weight: torch.Tensor, old: NF4Tensor) -> NF4Tensor:
    """NF4 codes nearest to ``weight`` against ``old``'s (double-quantized) block scales, kept as they are."""
    scalers = old.dequantize_scalers(old.quantized_scalers, old.quantization_factor, old.scaler_block_size)
    scaled = (weight.reshape(old.n_blocks, old.block_size) / scalers.unsqueeze(-1)).reshape(-1)
    codes = torch.cat([NF4Tensor.quantize_tensor_nearest(chunk, old.nf4) for chunk in scaled.split(_NF4_CHUNK)]).to(
        torch.uint8
    )
    packed = (codes[::2] << 4) | codes[1::2]
    attributes = old.__tensor_flatten__()[1]
    return NF4Tensor(
        attributes["tensor_meta"],
        old.block_size,
        old.n_blocks,
        old.scaler_block_size,
        old.quantized_scalers,
        old.quantization_factor,
        old.scaler_mean,
        packed,
        old.nf4,
    )


NF4 = Format(
    "nf4",
    NF4Tensor,
    lambda t: True,
    lambda t: {"block_size": t.block_size, "scaler_block_size": t.scaler_block_size},
    lambda weight, s: to_nf4(weight.contiguous(), s["block_size"], s["scaler_block_size"]),
    lambda t: t.get_original_weight(),
    _nf4_keep_state,
)

FORMATS: dict[type, Format] = {f.tensor_type: f for f in (INT8, INTX, NF4)}
BY_NAME: dict[str, Format] = {f.tensor_type.__name__: f for f in FORMATS.values()}


def format_of(weight: object) -> Format | None:
    """The format of a linear layer's weight, or None when it is not a weight-only torchao tensor."""
    fmt = FORMATS.get(type(weight))
    return fmt if fmt is not None and fmt.weight_only(weight) else None  # type: ignore[arg-type]
