"""``compressed``: symmetric int4 / int8 weights per group of inputs, stored as compressed-tensors packs them.

The format of llm-compressor's ``W4A16`` and ``W8A16`` schemes (what vLLM serves natively):
``W[i, j] = code[i, j] * scale[i, j // group_size]`` with signed ``num_bits`` codes and one float
scale per group; the fresh quantizer maps each group's largest magnitude to ``2**(num_bits-1) - 0.5``
steps (``absmax / 7.5`` for int4, as compressed-tensors computes it) and rounds to nearest.
Pure torch: compressed-tensors is needed only by whoever loads the exported model.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qadapt import rounding
from qadapt.errors import ConfigError
from qadapt.protocols import (
    Backend,
    BackendCapabilities,
    CalibrationStats,
    GroupLayout,
    PluginOptions,
    QuantizedWeight,
)
from qadapt_compressed.hf_format import SCALE_DTYPES, quantization_config, read_layer
from qadapt_compressed.packing import pack, packed_columns, unpack

#: Calibration rows per input feature below which a calibrated choice is worse than none (DESIGN.md).
MIN_ROWS_PER_FEATURE = 4


class CompressedOptions(PluginOptions):
    """Options of the ``compressed`` backend (used when it quantizes a float layer)."""

    num_bits: Literal[4, 8] = Field(4, description="Bits per weight code (signed, symmetric).")
    group_size: int = Field(
        128,
        ge=8,
        le=2**20,
        multiple_of=8,
        description="Inputs per scale (a multiple of 8 that divides in_features); llm-compressor's schemes use 128.",
    )
    scale_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the scales (None: the float layer's own dtype, as llm-compressor stores them)."
    )


class PackedIntLinear(nn.Module):
    """A linear layer holding compressed-tensors ``pack-quantized`` weights.

    Buffers ``weight_packed [out, in * num_bits / 32]`` int32 and ``weight_scale [out, in / group_size]``;
    ``bias [out]`` float or None.
    """

    def __init__(self, in_features: int, out_features: int, num_bits: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_bits, self.group_size = num_bits, group_size
        words = packed_columns(in_features, num_bits)
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size))
        self.bias: nn.Parameter | None = None

    def dequantized(self) -> torch.Tensor:
        """The float32 weight ``[out, in]``."""
        codes = unpack(self.weight_packed, self.num_bits, self.in_features)
        return codes.float() * _per_element(self.weight_scale, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]`` through the dequantized weight (in ``x``'s dtype)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_bits={self.num_bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


@functools.cache
def _codebook(num_bits: int) -> rounding.Codebook:
    half = 1 << (num_bits - 1)
    return rounding.Codebook(torch.arange(-half, half, dtype=torch.float32))


def _per_element(scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in / g]`` scales to float32 ``[out, in]``."""
    return scale.float().repeat_interleave(group_size, dim=1)


def _fresh_scales(weight: torch.Tensor, num_bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' symmetric scales: ``absmax / (2**(b-1) - 0.5)`` per group, zeros replaced by eps."""
    out_f, in_f = weight.shape
    absmax = weight.float().reshape(out_f, in_f // group_size, group_size).abs().amax(-1)
    scale = (absmax / ((1 << (num_bits - 1)) - 0.5)).to(dtype)
    return torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=scale.device), scale)


def _codes(weight: torch.Tensor, scale: torch.Tensor, num_bits: int, group_size: int) -> torch.Tensor:
    """Nearest signed codes ``[out, in]`` int8 of ``weight`` under ``scale [out, in / g]``."""
    half = 1 << (num_bits - 1)
    return torch.round(weight.float() / _per_element(scale, group_size)).clamp_(-half, half - 1).to(torch.int8)


class CompressedBackend(Backend):
    """Symmetric int4 / int8 weights with one scale per ``group_size`` inputs, compressed-tensors' layout.

    Storage: ``weight_packed`` (int32 words) and ``weight_scale`` (``[out, in / group_size]``);
    ``meta``: ``num_bits``, ``group_size``, ``shape`` ``(out, in)``. Merges keep the scales and choose
    codes (:meth:`requantize_keep_state`), or choose codes and scales against calibration statistics
    (:meth:`requantize_calibrated`). Exports ``w4a16`` and ``w8a16`` (group size 128).
    """

    Options = CompressedOptions
    capabilities = BackendCapabilities(keep_state=True, calibrated=True, group_scales=True, checkpoint=True)
    export_targets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "w4a16": {"num_bits": 4, "group_size": 128},
        "w8a16": {"num_bits": 8, "group_size": 128},
    }

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, PackedIntLinear)

    def check_layer(self, in_features: int, out_features: int) -> None:
        size = self.options.group_size
        if in_features % size:
            raise ConfigError(
                f"backend compressed ({in_features} -> {out_features}): group_size={size} must divide "
                f"in_features={in_features}; choose a group_size that does (a multiple of 8)"
            )

    def quantize(self, linear: nn.Linear) -> nn.Module:
        opts = self.options
        self.check_layer(linear.in_features, linear.out_features)
        weight = linear.weight.detach()
        dtype = SCALE_DTYPES[opts.scale_dtype] if opts.scale_dtype else weight.dtype
        if dtype not in SCALE_DTYPES.values():
            dtype = torch.float32
        storage = self._fresh(weight, opts.num_bits, opts.group_size, dtype)
        layer = PackedIntLinear(linear.in_features, linear.out_features, opts.num_bits, opts.group_size)
        layer.to(weight.device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.set_storage(layer, storage)
        return layer

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        shape = (module.out_features, module.in_features)
        meta = {"num_bits": module.num_bits, "group_size": module.group_size, "shape": shape}
        return QuantizedWeight({"weight_packed": module.weight_packed, "weight_scale": module.weight_scale}, meta)

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        module.weight_packed = storage.tensors["weight_packed"]
        module.weight_scale = storage.tensors["weight_scale"]

    def dtype_fixed_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The packed codes and the scales: their dtypes are the format's (a cast must not round the scales)."""
        return {"weight_packed": module.weight_packed, "weight_scale": module.weight_scale}

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        m, t = storage.meta, storage.tensors
        codes = unpack(t["weight_packed"], m["num_bits"], m["shape"][1])
        return codes.float() * _per_element(t["weight_scale"], m["group_size"])

    def _fresh(self, weight: torch.Tensor, num_bits: int, group_size: int, dtype: torch.dtype) -> QuantizedWeight:
        weight = weight.detach()
        scale = _fresh_scales(weight, num_bits, group_size, dtype)
        return self._with_codes(_codes(weight, scale, num_bits, group_size), scale, num_bits, group_size)

    @staticmethod
    def _with_codes(codes: torch.Tensor, scale: torch.Tensor, num_bits: int, group_size: int) -> QuantizedWeight:
        meta = {"num_bits": num_bits, "group_size": group_size, "shape": tuple(codes.shape)}
        return QuantizedWeight({"weight_packed": pack(codes, num_bits), "weight_scale": scale}, meta)

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        m, scale = like.meta, like.tensors["weight_scale"]
        return self._fresh(weight.to(scale.device), m["num_bits"], m["group_size"], scale.dtype)

    def requantize_keep_state(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """Nearest codes under ``like``'s scales (kept, the same tensor)."""
        m, scale = like.meta, like.tensors["weight_scale"]
        codes = _codes(weight.detach().to(scale.device), scale, m["num_bits"], m["group_size"])
        return self._with_codes(codes, scale, m["num_bits"], m["group_size"])

    def requantize_calibrated(
        self, weight: torch.Tensor, like: QuantizedWeight, stats: CalibrationStats
    ) -> QuantizedWeight:
        """Codes by error feedback and group scales by least squares against ``stats.hessian``; the scales
        are rounded to the format's scale dtype before the final codes are chosen."""
        m, scale = like.meta, like.tensors["weight_scale"]
        in_features = weight.shape[1]
        if stats.rows < MIN_ROWS_PER_FEATURE * in_features:
            warnings.warn(
                f"calibrated requantize: {stats.rows} calibration rows for {in_features} input features is below "
                f"{MIN_ROWS_PER_FEATURE} per feature; keeping the scales and choosing nearest codes instead",
                stacklevel=2,
            )
            return self.requantize_keep_state(weight, like)
        dtype, eps = scale.dtype, torch.finfo(scale.dtype).eps

        def project(raw: torch.Tensor) -> torch.Tensor:
            held = raw.clamp(min=eps).to(dtype)
            return held.float()

        result = rounding.calibrated_round(
            weight.detach().float().to(scale.device),
            stats.hessian,
            _codebook(m["num_bits"]),
            self.group_layout(like),
            scale.float().reshape(-1),
            damp=stats.damp,
            project=project,
        )
        new_scale = scale if not result.scales_changed else project(result.scales).to(dtype).reshape(scale.shape)
        codes = (result.codes - (1 << (m["num_bits"] - 1))).to(torch.int8)
        return self._with_codes(codes, new_scale, m["num_bits"], m["group_size"])

    # ------------------------------------------------------------ per-group scales

    def group_layout(self, storage: QuantizedWeight) -> GroupLayout:
        out_f, in_f = storage.meta["shape"]
        size = storage.meta["group_size"]
        return GroupLayout(group_size=size, num_groups=out_f * in_f // size)

    def get_group_scales(self, storage: QuantizedWeight) -> torch.Tensor:
        return storage.tensors["weight_scale"].float().reshape(-1)

    def with_group_scales(self, storage: QuantizedWeight, scales: torch.Tensor) -> QuantizedWeight:
        old = storage.tensors["weight_scale"]
        if scales.numel() != old.numel():
            raise ValueError(f"compressed group scales must have {old.numel()} values, got shape {tuple(scales.shape)}")
        new = scales.detach().float().reshape(old.shape).to(old.device, old.dtype).contiguous().clone()
        return QuantizedWeight({**storage.tensors, "weight_scale": new}, dict(storage.meta))

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    # ------------------------------------------------------------ checkpoint layout (hf_format)

    def from_checkpoint(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
    ) -> QuantizedWeight | None:
        read = read_layer(tensors, config)
        if read is None:
            return None
        packed, scale, meta = read
        return QuantizedWeight({"weight_packed": packed, "weight_scale": scale}, meta)

    def to_checkpoint(self, storage: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {
            "weight_packed": storage.tensors["weight_packed"],
            "weight_scale": storage.tensors["weight_scale"],
            "weight_shape": torch.tensor(storage.meta["shape"], dtype=torch.int64),
        }

    def checkpoint_config(
        self, storage: QuantizedWeight, base_config: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        m = storage.meta
        ignore = ["lm_head"]
        if base_config is not None and base_config.get("quant_method") == "compressed-tensors":
            ignore = list(base_config.get("ignore") or [])
        return quantization_config(m["num_bits"], m["group_size"], ignore)

    def float_modules_config(self, names: list[str]) -> dict[str, Any]:
        return {"ignore": sorted(names)}

    def storage_options(self, storage: QuantizedWeight) -> dict[str, Any]:
        m = storage.meta
        dtype = str(storage.tensors["weight_scale"].dtype).removeprefix("torch.")
        return {"num_bits": m["num_bits"], "group_size": m["group_size"], "scale_dtype": dtype}
