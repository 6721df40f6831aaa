"""``int8sym``: symmetric per-output-channel int8 weights, written against qadapt's public protocol only.

Storage: ``q [out, in] int8`` and ``scale [out] float32`` with ``W ~ q * scale[:, None]``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qadapt.protocols import Backend, PluginOptions, QuantizedWeight


class Int8SymOptions(PluginOptions):
    """Options of the ``int8sym`` backend."""

    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the matmul runs in; None runs in the input's dtype."
    )


class Int8SymLinear(nn.Module):
    """A linear layer holding int8 codes ``q [out, in]``, scales ``scale [out]`` and a float bias ``[out]``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` -> ``(q [out, in] int8, scale [out] float32)``; all-zero rows get scale 1."""
    weight = weight.detach().float()
    absmax = weight.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class Int8SymBackend(Backend):
    """Symmetric int8, one scale per output channel."""

    Options = Int8SymOptions

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, Int8SymLinear)

    def quantize(self, linear: nn.Linear) -> nn.Module:
        q, scale = quantize_rows(linear.weight)
        return Int8SymLinear(q, scale, linear.bias)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        return QuantizedWeight({"q": module.q, "scale": module.scale})

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        module.q = storage.tensors["q"]
        module.scale = storage.tensors["scale"]

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        return storage.tensors["q"].float() * storage.tensors["scale"][:, None]

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        q, scale = quantize_rows(weight.to(like.tensors["q"].device))
        return QuantizedWeight({"q": q, "scale": scale})

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dtype = getattr(torch, self.options.compute_dtype) if self.options.compute_dtype else x.dtype
        weight = module.q.to(dtype) * module.scale.to(dtype)[:, None]
        bias = None if module.bias is None else module.bias.to(dtype)
        return F.linear(x.to(dtype), weight, bias)
