"""The forward, merge and per-layer choices the LyCORIS methods share."""

from __future__ import annotations

import copy
import re
from abc import abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.errors import ConfigError
from qadapt.protocols import BaseForward, Method, RowMerger
from qadapt_lycoris.options import LycorisOptions


def pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    """The value of the first pattern that matches the end of ``name`` at a dot boundary (PEFT 0.21.2's
    ``get_pattern_key``), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class LycorisAdapter(nn.Module):
    """Base of the LyCORIS adapters: ``delta_weight()`` gives ``ΔW [out, in]`` (scaled, differentiable)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r, self.scaling = in_features, out_features, r, scaling

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """``ΔW [out, in]`` in the adapter's dtype, inside autograd."""

    @abstractmethod
    def delta_rows(self, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of ``ΔW``, float32 ``[r, in]``, outside autograd (for :meth:`Method.row_merger`)."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling}"


class LycorisMethod(Method):
    """``y = base(x) + x ΔWᵀ``, with PEFT's module dropout and rank dropout in training; merged ``W + ΔW``.

    A subclass builds its adapter in :meth:`make_adapter` and says whether rank dropout rescales
    the kept rows (:attr:`rescale_rank_dropout`).
    """

    Options = LycorisOptions
    options: LycorisOptions
    adapter_class: type[LycorisAdapter] = LycorisAdapter

    def __init__(self, options: LycorisOptions | dict | None = None) -> None:
        super().__init__(options)
        #: This layer's rank and alpha (``rank_pattern`` / ``alpha_pattern`` resolved by :meth:`for_layer`).
        self.r: int = self.options.r
        self.alpha: float = self.options.alpha

    @property
    def scaling(self) -> float:
        """``alpha / r`` of this layer."""
        return self.alpha / self.r

    @property
    def rescale_rank_dropout(self) -> bool:
        """Whether rank dropout divides the kept rows by the share kept (LoHa always; LoKr with an option)."""
        return True

    def for_layer(self, name: str) -> LycorisMethod:
        r = int(pattern_value(self.options.rank_pattern, name, self.options.r))
        alpha = float(pattern_value(self.options.alpha_pattern, name, self.options.alpha))
        if (r, alpha) == (self.r, self.alpha):
            return self
        layer_method = copy.copy(self)
        layer_method.r, layer_method.alpha = r, alpha
        return layer_method

    @abstractmethod
    def make_adapter(self, in_features: int, out_features: int) -> LycorisAdapter:
        """A fresh adapter for one layer, initialised as PEFT initialises it (same draws in the same order)."""

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> LycorisAdapter:
        return self.make_adapter(in_features, out_features)

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        adapter = self._as_adapter(adapter)
        result = base_forward(x)
        if adapter.training and not bool(torch.rand(1) > self.options.module_dropout):
            return result  # module dropout: PEFT draws this number on every training forward
        delta = adapter.delta_weight()
        if adapter.training and self.options.rank_dropout:
            keep = (torch.rand(delta.shape[0]) > self.options.rank_dropout).to(delta.dtype)
            if self.rescale_rank_dropout:
                keep = keep / keep.mean()
            delta = delta * keep.to(delta.device)[:, None]
        return (result + F.linear(x.to(delta.dtype), delta)).to(x.dtype)

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + self._as_adapter(adapter).delta_weight().detach().float().to(weight.device)

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() - self._as_adapter(adapter).delta_weight().detach().float().to(weight.device)

    def row_merger(self, adapter: nn.Module) -> RowMerger:
        lycoris = self._as_adapter(adapter)
        return lambda weight_rows, rows: weight_rows + lycoris.delta_rows(rows).to(weight_rows.device)

    def _as_adapter(self, adapter: nn.Module) -> LycorisAdapter:
        if not isinstance(adapter, self.adapter_class):
            raise ConfigError(
                f"the {self.name or type(self).__name__} method needs a {self.adapter_class.__name__}, "
                f"got {type(adapter).__name__}"
            )
        return adapter
