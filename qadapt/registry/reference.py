"""The float reference backend ``none``: a plain ``nn.Linear`` with no quantization.

It is the contract's reference: every other backend is tested against what this one computes on
the dequantized weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.protocols import Backend, BackendCapabilities, BaseLayer, QuantizedWeight


class FloatBackend(Backend):
    """Keeps ``nn.Linear`` as it is; "requantizing" casts back to the layer's dtype.

    In a checkpoint its layers are a plain floating-point ``weight`` (no ``quantization_config``).
    """

    capabilities = BackendCapabilities(checkpoint=True)

    def owns(self, module: nn.Module) -> bool:
        # A quantized subclass of nn.Linear keeps its weight in a Parameter subclass; only a plain
        # floating-point Parameter is ours.
        weight = getattr(module, "weight", None)  # a packed layer may have none (compressed-tensors')
        return isinstance(module, nn.Linear) and type(weight) is nn.Parameter and weight.dtype.is_floating_point

    def quantize(self, linear: nn.Linear) -> nn.Module:
        return linear

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        return QuantizedWeight({"weight": module.weight.data})

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        # Swapping .data keeps the Parameter object, so tied weights and optimizers stay attached.
        module.weight.data = storage.tensors["weight"]

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        return storage.tensors["weight"].float()

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        old = like.tensors["weight"]
        return QuantizedWeight({"weight": weight.to(device=old.device, dtype=old.dtype).contiguous()})

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # torch keeps no autocast state for the meta device (and raises when asked).
        if x.is_meta or not torch.is_autocast_enabled(x.device.type):
            x = x.to(module.weight.dtype)
        return F.linear(x, module.weight, module.bias)

    def from_checkpoint(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
    ) -> QuantizedWeight | None:
        weight = tensors.get("weight")
        if set(tensors) != {"weight"} or weight.dim() != 2 or not weight.dtype.is_floating_point:
            return None
        return QuantizedWeight({"weight": weight})

    def to_checkpoint(self, storage: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"weight": storage.tensors["weight"]}

    def checkpoint_config(
        self, storage: QuantizedWeight, base_config: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        return None

    def storage_options(self, storage: QuantizedWeight) -> dict[str, Any]:
        return {}


def float_base_layer(weight: torch.Tensor, bias: torch.Tensor | None = None) -> BaseLayer:
    """A :class:`BaseLayer` over a plain float linear holding ``weight [out, in]`` and ``bias [out]``.

    The reference a method's forward is compared with: the same call a quantized layer makes,
    on the dequantized weight. The tensors are used as given (not copied).
    """
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    linear.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return BaseLayer(FloatBackend(), linear)
