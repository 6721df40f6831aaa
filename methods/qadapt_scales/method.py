"""The ``scales`` method: :class:`ScalesMethod` and its per-layer :class:`ScalesAdapter`."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from qadapt.errors import ConfigError
from qadapt.protocols import Backend, BaseForward, BaseLayer, GroupLayout, Method, PluginOptions, QuantizedWeight


class ScalesOptions(PluginOptions):
    """Options of the ``scales`` method (one trainable multiplier per quantization group)."""

    init: float = Field(
        1.0,
        gt=0.0,
        le=1e6,
        description="Initial value of every multiplier (0 < init <= 1e6); 1.0 starts as the unchanged base layer.",
    )


class ScalesAdapter(nn.Module):
    """One layer's multipliers: ``scale [num_groups]``, sized by the backend's group layout.

    ``group_size``: elements per group of the row-major flattened weight ``[out, in]``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = 0
        self.scale = nn.Parameter(torch.empty(0))

    @property
    def layout(self) -> GroupLayout:
        if self.group_size <= 0:
            raise ConfigError("this scales adapter has no group layout yet: it is sized by init_adapter()")
        return GroupLayout(group_size=self.group_size, num_groups=self.scale.numel())

    def factors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``expand(scale) [out, in]``: each weight's multiplier (differentiable)."""
        scale = self.scale if dtype is None else self.scale.to(dtype)
        return self.layout.expand(scale, (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return f"groups={self.scale.numel()}, group_size={self.group_size}"


class ScalesMethod(Method):
    """``y = base(x) + x (W * expand(s - 1))^T`` with ``W`` the dequantized base weight.

    At ``s = 1`` this is the base layer exactly. Merged weight ``W * expand(s)``; in storage, the
    backend's group scales times ``s`` (no requantization of codes).
    """

    Options = ScalesOptions
    options: ScalesOptions
    requires = frozenset({"group_scales"})

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> ScalesAdapter:
        return ScalesAdapter(in_features, out_features)

    def init_adapter(self, adapter: nn.Module, base: BaseLayer) -> None:
        adapter = _as_scales(adapter)
        layout = base.group_layout()
        adapter.group_size = layout.group_size
        adapter.scale = nn.Parameter(torch.full((layout.num_groups,), float(self.options.init)))

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        adapter = _as_scales(adapter)
        if not isinstance(base_forward, BaseLayer):
            raise ConfigError("the scales method needs the base layer's weight: call it through QuantAdapterLinear")
        weight = base_forward.weight().to(x.dtype)
        delta = weight * (adapter.factors(x.dtype) - 1)
        return base_forward(x) + x @ delta.T

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight * _as_scales(adapter).factors(weight.dtype).detach()

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight / _as_scales(adapter).factors(weight.dtype).detach()

    def merge_storage(self, adapter: nn.Module, backend: Backend, storage: QuantizedWeight) -> QuantizedWeight:
        adapter = _as_scales(adapter)
        layout = backend.group_layout(storage)
        if layout != adapter.layout:
            raise ConfigError(f"the scales adapter was sized for {adapter.layout} but the layer's storage has {layout}")
        scales = backend.get_group_scales(storage)
        return backend.with_group_scales(storage, scales * adapter.scale.detach().to(scales))


def _as_scales(adapter: nn.Module) -> ScalesAdapter:
    if not isinstance(adapter, ScalesAdapter):
        raise ConfigError(f"the scales method needs a ScalesAdapter, got {type(adapter).__name__}")
    return adapter
