"""The ``randlora`` method: :class:`RandLoraMethod` and its per-layer :class:`RandLoraAdapter`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.errors import ConfigError
from qadapt.protocols import BaseForward, Method, RowMerger
from qadapt_randlora.bases import RandLoraBases, generate_bases, num_bases
from qadapt_randlora.options import RandLoraOptions
from qadapt_randlora.scaled_basis import scaled_basis


class RandLoraAdapter(nn.Module):
    """One layer's RandLora parameters, with ``d = min(in, out)``, ``D = max(in, out)``, ``N = ceil(d / r)``.

    ``lambda_ [r, N]`` and ``gamma [N, d]`` are trainable (PEFT's ``randlora_lambda.<adapter>`` and
    ``randlora_gamma.<adapter>``); ``bases`` is the model's shared :class:`RandLoraBases`.
    """

    def __init__(
        self, in_features: int, out_features: int, bases: RandLoraBases, r: int, scaling: float, dropout: float
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.min_dim, self.max_dim = min(in_features, out_features), max(in_features, out_features)
        self.num_bases = num_bases(self.min_dim, r)
        self.r = r
        self.scaling = scaling
        self.lambda_ = nn.Parameter(torch.zeros(r, self.num_bases))
        self.gamma = nn.Parameter(torch.full((self.num_bases, self.min_dim), 1.0 / self.max_dim))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bases = bases

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first [K, in], second [out, K])`` with ``ΔW = scaling · second @ first``, ``K = r·N``.

        The scaled small basis sits on the layer's smaller side. The flattening orders (``(k, n)``
        for the scaled basis, ``(n, k)`` for the large one) are PEFT's and pair them as it does.
        """
        small = self.bases.basis_a[:, :, : self.min_dim].to(dtype)
        large = self.bases.basis_b[: self.max_dim, : self.num_bases, :].to(dtype)
        scaled = scaled_basis(small, self.lambda_.to(dtype), self.gamma.to(dtype)).flatten(0, 1)  # [r·N, d]
        large = large.flatten(1)  # [D, N·r]
        if self.min_dim == self.in_features:
            return scaled, large
        return large.T, scaled.T

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ΔW [out, in] = scaling · second @ first`` in ``dtype``."""
        first, second = self.factors(dtype)
        return (second @ first) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"num_bases={self.num_bases}, scaling={self.scaling}"
        )


class RandLoraMethod(Method):
    """RandLora: ``y = base(x) + scaling · (dropout(x) @ firstᵀ) @ secondᵀ``; merged ``W' = W + ΔW``."""

    Options = RandLoraOptions
    options: RandLoraOptions

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return self.options.alpha / self.options.r

    def create_shared(self, shapes: Sequence[tuple[int, int]]) -> RandLoraBases:
        return generate_bases(self.options, shapes)

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> RandLoraAdapter:
        bases = self.create_shared([(in_features, out_features)]) if shared is None else shared
        if not isinstance(bases, RandLoraBases):
            raise ConfigError(f"randlora's shared state must be RandLoraBases, got {type(bases).__name__}")
        if not bases.fits(in_features, out_features, self.options.r):
            raise ConfigError(
                f"randlora shared bases ({bases.extra_repr()}) cannot serve a layer with in_features={in_features}, "
                f"out_features={out_features}, r={self.options.r}: create_shared must be given every target's shape "
                "and the same r"
            )
        opts = self.options
        adapter = RandLoraAdapter(in_features, out_features, bases, opts.r, self.scaling, opts.dropout)
        with torch.no_grad():
            if opts.init_weights:
                adapter.gamma.fill_(1.0 / max(adapter.gamma.shape))
            else:
                adapter.lambda_.normal_()
        return adapter

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        adapter = _as_randlora(adapter)
        result = base_forward(x)
        first, second = adapter.factors(adapter.lambda_.dtype)
        hidden = F.linear(adapter.dropout(x.to(first.dtype)), first)
        # Added in the promoted dtype (float32 adapters on a bf16 base add in float32), as PEFT does.
        return result + F.linear(hidden, second) * adapter.scaling

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight + _as_randlora(adapter).delta_weight(torch.float32).to(weight.dtype)

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight - _as_randlora(adapter).delta_weight(torch.float32).to(weight.dtype)

    def row_merger(self, adapter: nn.Module) -> RowMerger:
        randlora = _as_randlora(adapter)
        first, second = (t.detach() for t in randlora.factors(torch.float32))
        return lambda weight_rows, rows: weight_rows + (second[rows] @ first) * randlora.scaling


def _as_randlora(adapter: nn.Module) -> RandLoraAdapter:
    if not isinstance(adapter, RandLoraAdapter):
        raise ConfigError(f"the randlora method needs a RandLoraAdapter, got {type(adapter).__name__}")
    return adapter
