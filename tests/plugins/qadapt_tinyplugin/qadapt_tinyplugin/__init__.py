"""A third-party qadapt plugin, written only against qadapt's public protocol.

``rowscale``: a trainable scale per input column, ``y = base(x * (1 + s))``, merged as ``W @ diag(1 + s)``.
``half``: "quantizes" a float linear layer by storing its weight in float16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qadapt.protocols import Backend, BaseForward, Method, PluginOptions, QuantizedWeight


class RowScaleOptions(PluginOptions):
    init: float = Field(0.0, description="Initial value of every column's scale offset s.")


class RowScale(Method):
    Options = RowScaleOptions

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> nn.Module:
        adapter = nn.Module()
        adapter.scale = nn.Parameter(torch.full((in_features,), float(self.options.init)))
        return adapter

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        return base_forward(x * (1 + adapter.scale.to(x.dtype)))

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight * (1 + adapter.scale.float())[None, :]

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight / (1 + adapter.scale.float())[None, :]


class HalfLinear(nn.Module):
    """A linear layer whose weight ``[out, in]`` is kept in float16 (bias in float32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight16", weight.detach().to(torch.float16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)


class HalfBackend(Backend):
    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, HalfLinear)

    def quantize(self, linear: nn.Linear) -> nn.Module:
        return HalfLinear(linear.weight, linear.bias)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        return QuantizedWeight({"weight16": module.weight16})

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        module.weight16 = storage.tensors["weight16"]

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        return storage.tensors["weight16"].float()

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        return QuantizedWeight({"weight16": weight.to(torch.float16)})

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(x, module.weight16.to(x.dtype), bias)
