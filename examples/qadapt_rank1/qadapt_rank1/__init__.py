"""``rank1``: an example method plugin, ``y = base(x) + scale · (x · v) u`` (``ΔW = scale · u vᵀ``).

The smallest complete method: options with bounds, the four required members, and two optional
ones (``check_layer`` and ``row_merger``). docs/first-plugin.md walks through it.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from qadapt.errors import ConfigError
from qadapt.protocols import BaseForward, Method, PluginOptions, RowMerger


class Rank1Options(PluginOptions):
    """Options of the ``rank1`` method."""

    scale: float = Field(
        1.0, gt=0, le=1e3, allow_inf_nan=False, description="Multiplies the update, 0 < scale <= 1000."
    )
    min_features: int = Field(
        2, ge=1, description="Layers with fewer input features are refused (a demo of check_layer)."
    )


class Rank1Adapter(nn.Module):
    """``u [out]`` (starts at 0, so the adapter starts as the base layer) and ``v [in]``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(out_features))
        self.v = nn.Parameter(torch.randn(in_features) / in_features**0.5)


class Rank1Method(Method):
    """``y = base(x) + scale · (x · v) u``; merged ``W' = W + scale · u vᵀ``."""

    Options = Rank1Options
    options: Rank1Options

    def check_layer(self, in_features: int, out_features: int) -> None:
        if in_features < self.options.min_features:
            raise ConfigError(
                f"method.options.min_features={self.options.min_features} refuses a layer with "
                f"in_features={in_features}; lower min_features to adapt it"
            )

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> Rank1Adapter:
        return Rank1Adapter(in_features, out_features)

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        # x [..., in] -> [..., out], in the adapter's dtype, cast back by the layer.
        projected = x.to(adapter.v.dtype) @ adapter.v  # [...]
        return base_forward(x) + self.options.scale * projected[..., None] * adapter.u

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        # weight [out, in] float32 -> float32, never written in place.
        return weight + self.options.scale * torch.outer(adapter.u.detach(), adapter.v.detach()).float()

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.options.scale * torch.outer(adapter.u.detach(), adapter.v.detach()).float()

    def row_merger(self, adapter: nn.Module) -> RowMerger:
        u, v = adapter.u.detach().float(), adapter.v.detach().float()
        return lambda weight_rows, rows: weight_rows + self.options.scale * torch.outer(u[rows], v)
