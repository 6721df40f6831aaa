"""``bnb4``: bitsandbytes 4-bit linear layers (``Linear4bit``, NF4 or FP4, blockwise absmax)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qadapt.errors import AdapterStateError
from qadapt.protocols import (
    Backend,
    BackendCapabilities,
    CalibrationStats,
    GroupLayout,
    PluginOptions,
    QuantizedWeight,
)
from qadapt_bnb import bnb4_codes, fast_quant
from qadapt_bnb._dtypes import FLOAT_DTYPES, FloatName, float_dtype
from qadapt_bnb.hf_format import bnb_config, dtype_name, read_4bit, skip_modules_config

_STORAGE_DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, **FLOAT_DTYPES}
_KERNEL_DTYPES = frozenset(FLOAT_DTYPES.values())


class Bnb4Options(PluginOptions):
    """Options of the ``bnb4`` backend (used when it quantizes a float layer)."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit code: NormalFloat4 or FP4.")
    compute_dtype: FloatName | None = Field(
        None, description="dtype the matmul runs in; None runs in the input's dtype."
    )
    compress_statistics: bool = Field(
        True, description="Quantize the per-block absmax scales again (double quantization)."
    )
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(64, description="Weights per absmax block.")
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = Field(
        "uint8", description="dtype the packed 4-bit codes are stored in (FSDP wants the float dtype)."
    )
    fast_requantize: bool = Field(
        True,
        description=(
            "On CPU, quantize weights of 2^20 elements or more with qadapt's compiled quantizer: bytes and "
            "state bit-identical to bitsandbytes' own, 3-5x faster. It is checked against bitsandbytes once "
            "per process (compiling takes ~10 s) and is not used if that check fails."
        ),
    )


def _to_storage(data: torch.Tensor, state: bnbF.QuantState) -> QuantizedWeight:
    tensors = {"data": data, "absmax": state.absmax, "code": state.code}
    meta: dict = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "shape": tuple(state.shape),
        "dtype": state.dtype,
        "nested": state.nested,
    }
    if state.nested:
        tensors.update(offset=state.offset, nested_absmax=state.state2.absmax, nested_code=state.state2.code)
        meta.update(nested_blocksize=state.state2.blocksize, nested_dtype=state.state2.dtype)
    return QuantizedWeight(tensors, meta)


def _to_quant_state(storage: QuantizedWeight, shape: tuple[int, ...] | None = None) -> bnbF.QuantState:
    t, m = storage.tensors, storage.meta
    state2 = None
    if m["nested"]:
        state2 = bnbF.QuantState(
            absmax=t["nested_absmax"], code=t["nested_code"], blocksize=m["nested_blocksize"], dtype=m["nested_dtype"]
        )
    return bnbF.QuantState(
        absmax=t["absmax"],
        shape=torch.Size(m["shape"] if shape is None else shape),
        code=t["code"],
        blocksize=m["blocksize"],
        quant_type=m["quant_type"],
        dtype=m["dtype"],
        offset=t.get("offset"),
        state2=state2,
    )


def _quant_state(module: nn.Module) -> bnbF.QuantState:
    # FSDP2 swaps the Params4bit for a plain (sharded, then all-gathered) Parameter, which has
    # no quant_state; the module keeps its own reference to the state.
    state = getattr(module.weight, "quant_state", None)
    return module.quant_state if state is None else state


def _canonical(module: nn.Module) -> None:
    # On CPUs with AVX512-BF16, Linear4bit's own eval forward repacks the weight into a
    # CPU-only layout. Storage, merges and snapshots all use the portable layout.
    state = getattr(module.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        module.weight.data, module.weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(
            module.weight.data, state
        )
        module.quant_state = module.weight.quant_state


def _check_container(module: nn.Module, weight: torch.Tensor) -> None:
    """Refuse packed codes whose container was converted by value (their bits are gone)."""
    expected = getattr(module, "quant_storage", None)
    if expected is not None and weight.dtype != expected:
        raise AdapterStateError(
            f"the 4-bit codes of this layer are stored as {expected} but the weight now is {weight.dtype}: "
            "something converted the packed codes by value (a cast of the bare Linear4bit, or FSDP "
            "MixedPrecisionPolicy(param_dtype=...) different from quant_storage); the codes are no longer "
            "valid. Cast the wrapped model (QuantAdapterLinear keeps the codes), or set quant_storage to "
            f"{weight.dtype}"
        )


class Bnb4Backend(Backend):
    """Blockwise 4-bit weights.

    Storage: ``data`` (packed codes, two per byte), ``absmax`` (one scale per block), ``code``
    (the 16 levels); with double quantization also ``offset``, ``nested_absmax``, ``nested_code``.

    Merges keep the scale state bit for bit and choose codes (:meth:`requantize_keep_state`), or
    choose codes and scales against calibration statistics (:meth:`requantize_calibrated`); the
    per-block scales are the group scales (one group per absmax block of the flattened weight).
    """

    Options = Bnb4Options
    capabilities = BackendCapabilities(keep_state=True, calibrated=True, group_scales=True, checkpoint=True)
    export_targets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "nf4": {"quant_type": "nf4"},
        "fp4": {"quant_type": "fp4"},
    }

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight, "quant_state", None) is not None

    def quantize(self, linear: nn.Linear) -> nn.Module:
        opts = self.options
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=float_dtype(opts.compute_dtype),
            compress_statistics=opts.compress_statistics,
            quant_type=opts.quant_type,
            quant_storage=_STORAGE_DTYPES[opts.quant_storage],
            device="meta",
        )
        storage = self._quantize_weight(linear.weight.detach(), linear.weight.dtype)
        layer.weight = bnb.nn.Params4bit(
            storage.tensors["data"],
            requires_grad=False,
            quant_state=_to_quant_state(storage),
            blocksize=opts.blocksize,
            compress_statistics=opts.compress_statistics,
            quant_type=opts.quant_type,
            quant_storage=_STORAGE_DTYPES[opts.quant_storage],
            module=layer,
            bnb_quantized=True,
        )
        layer.quant_state = layer.weight.quant_state
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _quantize_weight(
        self,
        weight: torch.Tensor,
        dtype: torch.dtype,
        *,
        quant_type: str | None = None,
        blocksize: int | None = None,
        compress_statistics: bool | None = None,
        quant_storage: torch.dtype | None = None,
    ) -> QuantizedWeight:
        opts = self.options
        quantize = fast_quant.quantize_4bit_auto if opts.fast_requantize else bnbF.quantize_4bit
        data, state = quantize(
            weight.contiguous(),
            blocksize=blocksize or opts.blocksize,
            compress_statistics=opts.compress_statistics if compress_statistics is None else compress_statistics,
            quant_type=quant_type or opts.quant_type,
            quant_storage=quant_storage or _STORAGE_DTYPES[opts.quant_storage],
        )
        # Scales are computed from the float32 weight; dequantize still returns the layer's dtype.
        state.dtype = dtype
        return _to_storage(data, state)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dtype_fixed_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        # The packed codes, whatever their container (uint8, or a float quant_storage for FSDP).
        return {**super().dtype_fixed_tensors(module), "weight": module.weight}

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        _canonical(module)
        _check_container(module, module.weight)
        return _to_storage(module.weight.data, _quant_state(module))

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        state = _to_quant_state(storage)
        module.weight.data = storage.tensors["data"]
        module.weight.quant_state = state
        module.quant_state = state

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        # Dequantize as one flat row, then reshape: bitsandbytes 0.50.2's CPU kernel treats a 2-D
        # shape as rows of whole blocks and returns wrong values when in_features is not a
        # multiple of the block size (e.g. 352 with blocksize 64: 2.7x the quantization error).
        shape = tuple(storage.meta["shape"])
        flat = _to_quant_state(storage, shape=(math.prod(shape),))
        return bnbF.dequantize_4bit(storage.tensors["data"], flat).reshape(shape).float()

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        m = like.meta
        return self._quantize_weight(
            weight.detach().float().to(like.tensors["data"].device),
            m["dtype"],
            quant_type=m["quant_type"],
            blocksize=m["blocksize"],
            compress_statistics=m["nested"],
            quant_storage=like.tensors["data"].dtype,
        )

    def requantize_keep_state(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        return bnb4_codes.keep_state(weight, like)

    def requantize_calibrated(
        self, weight: torch.Tensor, like: QuantizedWeight, stats: CalibrationStats
    ) -> QuantizedWeight:
        return bnb4_codes.calibrated(weight, like, stats)

    def group_layout(self, storage: QuantizedWeight) -> GroupLayout:
        return bnb4_codes.layout(storage)

    def get_group_scales(self, storage: QuantizedWeight) -> torch.Tensor:
        return bnb4_codes.effective_absmax(storage)

    def with_group_scales(self, storage: QuantizedWeight, scales: torch.Tensor) -> QuantizedWeight:
        return bnb4_codes.with_group_scales(storage, scales)

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        _canonical(module)
        compute = module.compute_dtype or x.dtype
        if compute not in _KERNEL_DTYPES:
            # bitsandbytes' 4-bit matmul takes 16/32-bit floats; on float64 it silently returns garbage.
            compute = torch.float32
        bias = None if module.bias is None else module.bias.to(compute)
        state = _quant_state(module)
        _check_container(module, module.weight)
        if x.device.type == "cpu" and state.shape[-1] % state.blocksize != 0:
            # bitsandbytes' CPU matmul dequantizes with the faulty 2-D kernel (see dequantize).
            weight = self.dequantize(self.get_storage(module)).to(compute)
            return F.linear(x.to(compute), weight, bias)
        out = bnb.matmul_4bit(x.to(compute), module.weight, bias=bias, quant_state=state)
        # Autograd through a view of the 4-bit matmul's output can fail; give callers a fresh tensor.
        return out.clone()

    # ------------------------------------------------------------ checkpoint layout (hf_format)

    def from_checkpoint(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
    ) -> QuantizedWeight | None:
        # Checked against the layer's declared shape before anything is dequantized: bitsandbytes'
        # kernels read as many scales and codes as the shape says, past the end of shorter tensors.
        read = read_4bit(tensors)
        if read is None:
            return None
        data, state, meta = read
        return QuantizedWeight({"data": data, **state}, meta)

    def to_checkpoint(self, storage: QuantizedWeight) -> dict[str, torch.Tensor]:
        out = {"weight": storage.tensors["data"]}
        for key, value in _to_quant_state(storage).as_dict(packed=True).items():
            out[f"weight.{key}"] = value
        return out

    def checkpoint_config(
        self, storage: QuantizedWeight, base_config: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        m = storage.meta
        fields: dict[str, Any] = {
            "bnb_4bit_quant_type": m["quant_type"],
            "bnb_4bit_use_double_quant": bool(m["nested"]),
            "bnb_4bit_quant_storage": dtype_name(storage.tensors["data"].dtype),
        }
        if base_config is None or base_config.get("quant_method") != "bitsandbytes":
            fields["bnb_4bit_compute_dtype"] = self.options.compute_dtype or dtype_name(m["dtype"])
        return bnb_config(4, base_config, **fields)

    def float_modules_config(self, names: list[str]) -> dict[str, Any]:
        return skip_modules_config(names)

    def storage_options(self, storage: QuantizedWeight) -> dict[str, Any]:
        m = storage.meta
        return {
            "quant_type": m["quant_type"],
            "blocksize": m["blocksize"],
            "compress_statistics": bool(m["nested"]),
            "quant_storage": dtype_name(storage.tensors["data"].dtype),
        }
