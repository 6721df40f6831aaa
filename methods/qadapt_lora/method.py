"""The ``lora`` and ``dora`` methods and their per-layer adapters.

LoRA: ``y = base(x) + s · B(A(dropout(x)))``; merged ``W' = W + s · B A`` (``s`` = scaling).

DoRA: with ``V = W + s · B A`` and ``n = ||V||`` per output row (treated as a constant, so no
gradient flows through the norm), ``y = base(x) + (m / n - 1) ⊙ (W x) + (m / n) ⊙ s · B(A(x))``,
i.e. the layer ``(m / n) ⊙ V`` plus the bias; merged ``W' = (m / n) ⊙ V``. ``m [out]`` starts as
``n`` computed from the *dequantized* base weight, so a fresh adapter is a no-op on every backend.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.errors import AdapterStateError, ArgumentTypeError, ConfigError
from qadapt.protocols import BaseForward, BaseLayer, Method, RowMerger
from qadapt_lora.options import LoraOptions, pattern_value, scaling


class LoraAdapter(nn.Module):
    """One layer's LoRA factors: ``lora_A [r, in]`` and ``lora_B [out, r]`` (bias-free ``nn.Linear``).

    State dict keys ``lora_A.weight`` / ``lora_B.weight`` are PEFT's per-layer keys with the
    adapter name removed. ``scaling`` is ``alpha / r`` (or ``alpha / sqrt(r)``).
    """

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.r, self.scaling = r, scaling
        # Created in this order, as nn.Linear, so a seeded run draws the same numbers as PEFT.
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """``s · B A``, float32 ``[out, in]``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B(A(x))`` for ``x [..., in]`` already in the adapter's dtype (no dropout)."""
        return self.lora_B(self.lora_A(x)) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}"


class DoraAdapter(LoraAdapter):
    """LoRA factors plus ``magnitude [out]``: the learned norm of each output row (PEFT's
    ``lora_magnitude_vector``). Set from the dequantized base by :meth:`DoraMethod.init_adapter`."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__(in_features, out_features, r, scaling, dropout)
        self.magnitude = nn.Parameter(torch.ones(out_features))
        #: The row norms ``n [out]`` of the last merge, which its inverse needs (not saved).
        self.merged_norm: torch.Tensor | None = None


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``||W + ΔW||`` per output row: ``[out, in]``, ``[out, in]`` -> ``[out]``, outside autograd."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight + delta, dim=1)


class LoraMethod(Method):
    """LoRA: ``y = base(x) + s · B(A(dropout(x)))``; merged ``W' = W + s · B A``."""

    name = "lora"
    Options = LoraOptions
    options: LoraOptions
    adapter_class: type[LoraAdapter] = LoraAdapter

    def __init__(self, options: LoraOptions | dict | None = None) -> None:
        super().__init__(options)
        #: This layer's rank and alpha (``rank_pattern`` / ``alpha_pattern`` resolved by :meth:`for_layer`).
        self.r: int = self.options.r
        self.alpha: float = self.options.alpha

    def for_layer(self, name: str) -> LoraMethod:
        r = int(pattern_value(self.options.rank_pattern, name, self.options.r))
        alpha = float(pattern_value(self.options.alpha_pattern, name, self.options.alpha))
        if (r, alpha) == (self.r, self.alpha):
            return self
        layer_method = copy.copy(self)
        layer_method.r, layer_method.alpha = r, alpha
        return layer_method

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> LoraAdapter:
        opts = self.options
        layer_scaling = scaling(self.alpha, self.r, opts.use_rslora)
        adapter = self._new_adapter(in_features, out_features, layer_scaling)
        with torch.no_grad():
            if opts.init_weights == "gaussian":
                nn.init.normal_(adapter.lora_A.weight, std=1 / self.r)
            elif opts.init_weights:
                # nn.Linear's own init, drawn a second time as PEFT does (keeps seeded runs equal).
                nn.init.kaiming_uniform_(adapter.lora_A.weight, a=5**0.5)
            if opts.init_weights is not False:
                nn.init.zeros_(adapter.lora_B.weight)
        return adapter

    def _new_adapter(self, in_features: int, out_features: int, scaling: float) -> LoraAdapter:
        """The adapter module, before the initialisation (created in PEFT's order)."""
        return self.adapter_class(in_features, out_features, self.r, scaling, self.options.dropout)

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        adapter = _as(adapter, LoraAdapter, self)
        result = base_forward(x)
        x = x.to(adapter.lora_A.weight.dtype)
        return result + adapter.update(adapter.dropout(x))

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight + _as(adapter, LoraAdapter, self).delta_weight().to(weight.dtype)

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight - _as(adapter, LoraAdapter, self).delta_weight().to(weight.dtype)

    def row_merger(self, adapter: nn.Module) -> RowMerger | None:
        lora = _as(adapter, LoraAdapter, self)
        down, up = lora.lora_A.weight.detach().float(), lora.lora_B.weight.detach().float()
        return lambda weight_rows, rows: weight_rows + (up[rows] @ down) * lora.scaling


class DoraMethod(LoraMethod):
    """DoRA: LoRA's direction update with a learned magnitude per output row.

    Merged ``W' = (m / ||W + s·B A||) ⊙ (W + s·B A)`` (row-wise); the inverse needs the row norms,
    which the adapter keeps from its last :meth:`merge_weight`.
    """

    name = "dora"
    adapter_class = DoraAdapter

    def init_adapter(self, adapter: nn.Module, base: BaseLayer) -> None:
        adapter = _as(adapter, DoraAdapter, self)
        weight = base.weight()  # the adapter may still be on the CPU while the base is elsewhere
        norm = row_norm(weight, adapter.delta_weight().to(weight.device))
        with torch.no_grad():
            adapter.magnitude.copy_(norm)

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        adapter = _as(adapter, DoraAdapter, self)
        if not isinstance(base_forward, BaseLayer):
            raise ArgumentTypeError(
                f"dora needs the base layer's weight: base_forward must be a qadapt.protocols.BaseLayer, "
                f"got {type(base_forward).__name__}"
            )
        result = base_forward(x)
        dtype = adapter.lora_A.weight.dtype
        x = x.to(dtype)
        weight = base_forward.weight().to(dtype)
        scale = adapter.magnitude / row_norm(weight, adapter.delta_weight().to(dtype))  # [out]
        if isinstance(adapter.dropout, nn.Identity) or not adapter.training:
            bias = base_forward.bias
            plain = result if bias is None else result - bias
        else:
            # With dropout the base term must see the same dropped input as the update.
            x = adapter.dropout(x)
            plain = F.linear(x, weight)
        return result + (scale - 1) * plain + scale * adapter.update(x)

    def _factor(self, adapter: DoraAdapter, norm: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """``m / ||W + s·B A||`` as a column ``[r, 1]`` for ``norm [r]``, the row norms of ``rows``."""
        return (adapter.magnitude.detach().float()[rows] / norm)[:, None]

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        adapter = _as(adapter, DoraAdapter, self)
        combined = weight.float() + adapter.delta_weight().detach()
        norm = torch.linalg.vector_norm(combined, dim=1)
        adapter.merged_norm = norm
        return (self._factor(adapter, norm) * combined).to(weight.dtype)

    def row_merger(self, adapter: nn.Module) -> RowMerger:
        dora = _as(adapter, DoraAdapter, self)
        lora_rows = super().row_merger(dora)
        assert lora_rows is not None

        def merge_rows(weight_rows: torch.Tensor, rows: slice) -> torch.Tensor:
            combined = lora_rows(weight_rows, rows)  # each row's norm needs only that row
            return self._factor(dora, torch.linalg.vector_norm(combined, dim=1), rows) * combined

        return merge_rows

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        adapter = _as(adapter, DoraAdapter, self)
        if adapter.merged_norm is None:
            raise AdapterStateError(
                "dora's inverse unmerge needs the row norms of its merge, which this adapter does not hold "
                "(merged in another process?); unmerge with mode='exact'"
            )
        restored = weight.float() / self._factor(adapter, adapter.merged_norm) - adapter.delta_weight().detach()
        return restored.to(weight.dtype)


def _as(adapter: nn.Module, cls: type, method: Method) -> nn.Module:
    if not isinstance(adapter, cls):
        raise ConfigError(
            f"the {method.name or type(method).__name__} method needs a {cls.__name__}, got {type(adapter).__name__}"
        )
    return adapter
