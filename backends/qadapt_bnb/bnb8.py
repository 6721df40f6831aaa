"""``bnb8``: bitsandbytes LLM.int8() linear layers (``Linear8bitLt`` with int8 weights)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from pydantic import Field
from torch import nn

from qadapt import rounding
from qadapt.errors import CapabilityError
from qadapt.protocols import (
    Backend,
    BackendCapabilities,
    CalibrationStats,
    GroupLayout,
    PluginOptions,
    QuantizedWeight,
)
from qadapt_bnb.bnb4_codes import MIN_ROWS_PER_FEATURE, warn_few_rows
from qadapt_bnb.hf_format import bnb_config, read_8bit, skip_modules_config

#: bitsandbytes' int8 dequantize multiplies by this float32 constant (1 / 127), after the row scale.
_INV_127 = torch.tensor(7.874015718698502e-3, dtype=torch.float32)


class Bnb8Options(PluginOptions):
    """Options of the ``bnb8`` backend."""

    threshold: float = Field(
        0.0,
        ge=0.0,
        le=65504.0,
        allow_inf_nan=False,
        description=(
            "Outlier threshold of LLM.int8(): input columns above it run in 16-bit (0 disables); at most 65504, "
            "the largest float16, beyond which no input column can lie."
        ),
    )


def _scales(module: nn.Module) -> torch.Tensor | None:
    # Linear8bitLt moves CB/SCB from the weight into its matmul state on first forward.
    scb = module.state.SCB
    return scb if scb is not None else getattr(module.weight, "SCB", None)


@functools.cache
def _codebook() -> rounding.Codebook:
    return rounding.Codebook(torch.arange(-127, 128, dtype=torch.float32))


def _step(scb: torch.Tensor) -> torch.Tensor:
    """Per-row value of one int8 step ``[out, 1]``: ``SCB / 127`` as the dequantize computes it."""
    return scb.float().reshape(-1, 1) * _INV_127.to(scb.device)


class Bnb8Backend(Backend):
    """Row-wise absmax int8 weights: ``W ~ CB * SCB[:, None] / 127``.

    Storage: ``CB [out, in] int8`` and ``SCB [out] float32``.

    The forward is bitsandbytes' own and follows the module's mode: in training mode it multiplies
    by the dequantized weight (equal to the float reference up to rounding); in eval mode it runs
    LLM.int8(), which also quantizes the activations row-wise (about 1e-2 relative difference).

    Merges keep ``SCB`` bit for bit and choose ``CB`` (:meth:`requantize_keep_state`), or choose
    both against calibration statistics (:meth:`requantize_calibrated`). The group scales are the
    rows' ``SCB`` (one group per row).
    """

    Options = Bnb8Options
    capabilities = BackendCapabilities(keep_state=True, calibrated=True, group_scales=True, checkpoint=True)
    export_targets: ClassVar[Mapping[str, Mapping[str, Any]]] = {"int8": {}}

    def owns(self, module: nn.Module) -> bool:
        return (
            isinstance(module, bnb.nn.Linear8bitLt)
            and not module.state.has_fp16_weights
            and module.weight.dtype == torch.int8
            and _scales(module) is not None
        )

    def quantize(self, linear: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=self.options.threshold,
            device="meta",
        )
        device = linear.weight.device
        storage = self.requantize(linear.weight.detach().float(), like=QuantizedWeight({}, {}))
        layer.weight = bnb.nn.Int8Params(storage.tensors["CB"].to(device), requires_grad=False, has_fp16_weights=False)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.set_storage(layer, QuantizedWeight({k: v.to(device) for k, v in storage.tensors.items()}))
        return layer

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        return QuantizedWeight({"CB": module.weight.data, "SCB": _scales(module)})

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        weight = module.weight
        weight.data = storage.tensors["CB"]
        weight.CB = storage.tensors["CB"]
        weight.SCB = storage.tensors["SCB"]
        # Drop the matmul state's copies; the next forward takes them from the weight again.
        module.state.CB = None
        module.state.SCB = None
        module.state.reset_grads()

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        return bnbF.int8_vectorwise_dequant(storage.tensors["CB"], storage.tensors["SCB"]).float()

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        cb, scb, _ = bnbF.int8_vectorwise_quant(weight.detach().float().contiguous())
        return QuantizedWeight({"CB": cb, "SCB": scb})

    def requantize_keep_state(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        scb = like.tensors["SCB"]
        target = weight.detach().float().to(scb.device)
        if tuple(target.shape) != (scb.numel(), target.shape[-1]) or target.dim() != 2:
            raise ValueError(f"weight of shape {tuple(target.shape)} does not fit bnb8 storage with {scb.numel()} rows")
        codes = rounding.group_codes(target, _step(scb), target.shape[1], _codebook())
        return QuantizedWeight({"CB": codes.sub_(127).to(torch.int8).reshape(target.shape), "SCB": scb})

    def requantize_calibrated(
        self, weight: torch.Tensor, like: QuantizedWeight, stats: CalibrationStats
    ) -> QuantizedWeight:
        """Codes by error feedback and row scales by least squares against ``stats.hessian``."""
        in_features = weight.shape[1]
        if stats.rows < MIN_ROWS_PER_FEATURE * in_features:
            warn_few_rows(stats.rows, in_features)
            return self.requantize_keep_state(weight, like)
        scb = like.tensors["SCB"]
        target = weight.detach().float().to(scb.device)
        result = rounding.calibrated_round(
            target,
            stats.hessian,
            _codebook(),
            GroupLayout(group_size=in_features, num_groups=target.shape[0]),
            _step(scb).reshape(-1),
            damp=stats.damp,
        )
        new_scb = scb if not result.scales_changed else (result.scales / _INV_127.to(scb.device)).float()
        return QuantizedWeight({"CB": (result.codes - 127).to(torch.int8), "SCB": new_scb})

    def group_layout(self, storage: QuantizedWeight) -> GroupLayout:
        out_features, in_features = storage.tensors["CB"].shape
        return GroupLayout(group_size=in_features, num_groups=out_features)

    def get_group_scales(self, storage: QuantizedWeight) -> torch.Tensor:
        return storage.tensors["SCB"].float()

    def with_group_scales(self, storage: QuantizedWeight, scales: torch.Tensor) -> QuantizedWeight:
        expected = storage.tensors["CB"].shape[0]
        if tuple(scales.shape) != (expected,):
            raise ValueError(f"bnb8 group scales must have shape ({expected},), got {tuple(scales.shape)}")
        scb = scales.detach().float().to(storage.tensors["SCB"].device).contiguous().clone()
        return QuantizedWeight({"CB": storage.tensors["CB"], "SCB": scb})

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(module.weight, bnb.nn.Int8Params):
            # FSDP replaced the Int8Params object, and the row scales (CB/SCB) it carried with it.
            raise CapabilityError(
                f"bnb8's int8 weight became a plain {type(module.weight).__name__}: its row scales were attributes "
                "of the Int8Params object, so bnb8 layers cannot be sharded (FSDP). Use DDP, or bnb4 with "
                "quant_storage set to the model's float dtype"
            )
        # Linear8bitLt.forward casts the bias in place to the input's dtype (bias.data = bias.data.to(x.dtype)):
        # one float16 forward would round a float32 bias for good, and an exact unmerge would no longer be.
        # The forward keeps its numbers; the layer gets its own bias tensor back afterwards.
        bias = module.bias
        kept = None if bias is None else bias.data
        try:
            return module(x)
        finally:
            if bias is not None and bias.data is not kept:
                bias.data = kept

    # ------------------------------------------------------------ checkpoint layout (hf_format)

    def from_checkpoint(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
    ) -> QuantizedWeight | None:
        read = read_8bit(tensors)  # SCB checked against the weight's rows before anything is dequantized
        if read is None:
            return None
        return QuantizedWeight({"CB": read[0], "SCB": read[1]})

    def to_checkpoint(self, storage: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {
            "weight": storage.tensors["CB"],
            "SCB": storage.tensors["SCB"],
            "weight_format": torch.tensor(0, dtype=torch.uint8),
        }

    def checkpoint_config(
        self, storage: QuantizedWeight, base_config: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        kept = base_config is not None and base_config.get("quant_method") == "bitsandbytes"
        fields = {} if kept else {"llm_int8_threshold": self.options.threshold}
        return bnb_config(8, base_config, **fields)

    def float_modules_config(self, names: list[str]) -> dict[str, Any]:
        return skip_modules_config(names)

    def storage_options(self, storage: QuantizedWeight) -> dict[str, Any]:
        return {}
