"""The ``ia3`` method: :class:`IA3Method` and its per-layer :class:`IA3Adapter`.

(IA)³ learns one vector ``l`` per layer. On an ordinary layer it scales the output,
``y = l ⊙ (W x + b)``, so the merged layer is ``W' = diag(l) W`` and ``b' = l ⊙ b``; on a
feed-forward layer it scales the input, ``y = W (l ⊙ x) + b``, merged ``W' = W diag(l)`` with the
bias unchanged. The math and dtype handling are PEFT 0.21.2's ``ia3.Linear``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qadapt.errors import ConfigError
from qadapt.protocols import Backend, BaseForward, Method, QuantizedWeight, RowMerger
from qadapt_ia3.options import IA3Options


class IA3Adapter(nn.Module):
    """One layer's scales ``ia3_l``: ``[out, 1]`` (output scaling) or ``[1, in]`` (feed-forward, input scaling).

    The parameter's name and shape are PEFT's (``<layer>.ia3_l.<adapter>``).
    """

    def __init__(self, in_features: int, out_features: int, feedforward: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.feedforward = in_features, out_features, feedforward
        shape = (1, in_features) if feedforward else (out_features, 1)
        # Drawn as PEFT draws it (then set to 1 by the default init), so seeded runs stay equal.
        self.ia3_l = nn.Parameter(torch.randn(shape))

    def scales(self) -> torch.Tensor:
        """``l`` flattened: ``[in]`` (feed-forward) or ``[out]``."""
        return self.ia3_l.flatten()

    def extra_repr(self) -> str:
        kind = "feedforward (input)" if self.feedforward else "output"
        return f"in_features={self.in_features}, out_features={self.out_features}, scales={kind}"


class IA3Method(Method):
    """(IA)³: ``y = l ⊙ base(x)`` (bias included), or ``y = base(l ⊙ x)`` on feed-forward layers.

    Which layers are feed-forward comes from ``feedforward_modules`` and the layer's name
    (:meth:`for_layer`); an instance used without a name (a single ``QuantAdapterLinear``) scales
    outputs.
    """

    Options = IA3Options
    options: IA3Options

    def __init__(self, options: IA3Options | dict | None = None) -> None:
        super().__init__(options)
        #: True for the instance :meth:`for_layer` made for a feed-forward layer.
        self.feedforward = False

    def for_layer(self, name: str) -> IA3Method:
        if not self.options.is_feedforward(name):
            return self
        layer_method = copy.copy(self)
        layer_method.feedforward = True
        return layer_method

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> IA3Adapter:
        adapter = IA3Adapter(in_features, out_features, self.feedforward)
        if self.options.init_weights:
            with torch.no_grad():
                adapter.ia3_l.fill_(1.0)
        return adapter

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        adapter = _as_ia3(adapter)
        scales = adapter.scales()
        if adapter.feedforward:
            # PEFT scales the input in the adapter's dtype and hands the base the input's dtype.
            return base_forward((x.to(scales.dtype) * scales).to(x.dtype))
        result = base_forward(x)
        return (result * scales).to(result.dtype)

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() * _as_ia3(adapter).ia3_l.detach().float()

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() / _as_ia3(adapter).ia3_l.detach().float()

    def merge_bias(self, adapter: nn.Module, bias: torch.Tensor) -> torch.Tensor | None:
        adapter = _as_ia3(adapter)
        return None if adapter.feedforward else bias.float() * adapter.scales().detach().float()

    def unmerge_bias(self, adapter: nn.Module, bias: torch.Tensor) -> torch.Tensor | None:
        adapter = _as_ia3(adapter)
        return None if adapter.feedforward else bias.float() / adapter.scales().detach().float()

    def row_merger(self, adapter: nn.Module) -> RowMerger:
        scales = _as_ia3(adapter).ia3_l.detach().float()
        if _as_ia3(adapter).feedforward:
            return lambda weight_rows, rows: weight_rows * scales
        return lambda weight_rows, rows: weight_rows * scales[rows]

    def merge_storage(self, adapter: nn.Module, backend: Backend, storage: QuantizedWeight) -> QuantizedWeight | None:
        """Output scaling folds into per-group scales when every group lies inside one row (bnb8's rows,
        bnb4's blocks when the block size divides ``in_features``): the codes stay as they are. Only for
        positive scales; otherwise (and for feed-forward layers) the float path."""
        adapter = _as_ia3(adapter)
        if adapter.feedforward or not backend.capabilities.group_scales:
            return None
        scales = adapter.scales().detach().float()
        layout = backend.group_layout(storage)
        in_f, out_f = adapter.in_features, adapter.out_features
        row_aligned = in_f % layout.group_size == 0 and layout.num_groups * layout.group_size == in_f * out_f
        if not row_aligned or not bool((scales > 0).all()):
            return None
        per_group = scales.repeat_interleave(in_f // layout.group_size)  # [out * groups per row] = [num_groups]
        current = backend.get_group_scales(storage)
        return backend.with_group_scales(storage, current * per_group.to(current))


def _as_ia3(adapter: nn.Module) -> IA3Adapter:
    if not isinstance(adapter, IA3Adapter):
        raise ConfigError(f"the ia3 method needs an IA3Adapter, got {type(adapter).__name__}")
    return adapter
