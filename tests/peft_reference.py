"""PEFT 0.21.2 layers built around a given float weight, as the numerical reference for the method tests."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from qadapt import QuantAdapterLinear

TARGET = "proj"


class Holder(nn.Module):
    """The smallest model PEFT can adapt: one (or more) named linear layers."""

    def __init__(self, **linears: nn.Linear) -> None:
        super().__init__()
        for name, linear in linears.items():
            self.add_module(name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, TARGET)(x)


def float_twin(layer: QuantAdapterLinear) -> nn.Linear:
    """An ``nn.Linear`` holding the dequantized weight and the float bias of ``layer``'s base."""
    weight = layer.backend.dequantize_module(layer.base)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.base.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(layer.base.bias.float())
    return linear


def peft_model(config: Any, **linears: nn.Linear) -> nn.Module:
    """``peft.get_peft_model`` on a :class:`Holder` of ``linears`` (warnings about configs silenced)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(Holder(**linears), config)


def peft_layer(model: nn.Module, name: str = TARGET) -> nn.Module:
    """The PEFT tuner layer that replaced ``name``."""
    return getattr(model.base_model.model, name)


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def inputs(in_f: int, seed: int = 1) -> torch.Tensor:
    """A seeded input ``[3, 5, in_f]``."""
    return torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(seed))


def assert_matches_peft(layer: QuantAdapterLinear, model: nn.Module, twin: nn.Module, x: torch.Tensor) -> None:
    """Unmerged forwards, and the float merged weight before requantization, agree to 1e-5 relative.

    Both stay in training mode: bitsandbytes' int8 CPU path only dequantizes the weight there (in
    eval it also quantizes the activations).
    """
    with torch.no_grad():
        ours, theirs = layer(x), model(x)
        merged = layer.methods["default"].merge_weight(layer.adapters["default"], twin.base_layer.weight.clone())
        twin.merge()
    assert relative(ours, theirs) < 1e-5
    assert relative(merged, twin.base_layer.weight) < 1e-5
