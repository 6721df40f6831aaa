"""Two small methods with known math, used to test the core against every backend.

``AddDelta`` adds a fixed matrix to the weight (an additive method); ``MixInput`` multiplies the
input by a fixed invertible matrix before the base layer (an input-transform method, like OFT).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from qadapt.protocols import BaseForward, Method, PluginOptions


class KnownOptions(PluginOptions):
    scale: float = Field(0.05, description="Size of the known change.")
    seed: int = 0


class AddDelta(Method):
    """``y = base(x) + x @ D.T`` with ``D [out, in]`` a seeded random matrix times ``scale``."""

    name = "add_delta"
    Options = KnownOptions

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> nn.Module:
        g = torch.Generator().manual_seed(self.options.seed)
        module = nn.Module()
        module.delta = nn.Parameter(torch.randn(out_features, in_features, generator=g) * self.options.scale)
        return module

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        return base_forward(x) + x @ adapter.delta.to(x.dtype).T

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight + adapter.delta.float()

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight - adapter.delta.float()


class MixInput(Method):
    """``y = base(x @ M)`` with ``M [in, in] = I + scale * G / sqrt(in)``; merged weight ``W @ M.T``.

    Dividing by ``sqrt(in)`` keeps ``M`` near the identity (spectral norm of the change ~ 2 * scale)
    whatever the layer width, as a trained rotation-like adapter would be.
    """

    name = "mix_input"
    Options = KnownOptions

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> nn.Module:
        g = torch.Generator().manual_seed(self.options.seed)
        module = nn.Module()
        noise = torch.randn(in_features, in_features, generator=g)
        mix = torch.eye(in_features) + noise * (self.options.scale / in_features**0.5)
        module.mix = nn.Parameter(mix)
        return module

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        return base_forward(x @ adapter.mix.to(x.dtype))

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight @ adapter.mix.float().T

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(adapter.mix.float(), weight.T).T
