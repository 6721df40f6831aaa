"""The ``loha`` method: :class:`LohaMethod` and its per-layer :class:`LohaAdapter`.

LoHa (LyCORIS): ``ΔW = (alpha / r) · (w1_a w1_b) ⊙ (w2_a w2_b)``, a Hadamard product of two rank-``r``
products, so its rank can reach ``r²``. PEFT 0.21.2's ``loha.Linear``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from qadapt_lycoris import LycorisMethod
from qadapt_lycoris.base import LycorisAdapter
from qadapt_lycoris.options import LycorisOptions


class LohaOptions(LycorisOptions):
    """Options of the ``loha`` method (Hadamard product of two low-rank products)."""

    init_weights: bool = Field(
        True,
        description=(
            "True: w1_a, w1_b, w2_a Kaiming-uniform and w2_b = 0 (the adapter starts as a no-op). False: all four "
            "Kaiming-uniform (non-zero at start)."
        ),
    )


class LohaAdapter(LycorisAdapter):
    """One layer's factors ``hada_w1_a, hada_w2_a [out, r]`` and ``hada_w1_b, hada_w2_b [r, in]`` (PEFT's names)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float) -> None:
        super().__init__(in_features, out_features, r, scaling)
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features))

    def delta_weight(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    @torch.no_grad()
    def delta_rows(self, rows: slice) -> torch.Tensor:
        first = self.hada_w1_a[rows].float() @ self.hada_w1_b.float()
        second = self.hada_w2_a[rows].float() @ self.hada_w2_b.float()
        return first * second * self.scaling


class LohaMethod(LycorisMethod):
    """LoHa: ``y = base(x) + x ΔWᵀ`` with ``ΔW = (alpha / r) · (w1_a w1_b) ⊙ (w2_a w2_b)``."""

    Options = LohaOptions
    options: LohaOptions
    adapter_class = LohaAdapter

    def make_adapter(self, in_features: int, out_features: int) -> LohaAdapter:
        adapter = LohaAdapter(in_features, out_features, self.r, self.scaling)
        with torch.no_grad():
            for param in (adapter.hada_w1_a, adapter.hada_w1_b, adapter.hada_w2_a):
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            if self.options.init_weights:
                nn.init.zeros_(adapter.hada_w2_b)  # the update starts at zero
            else:
                nn.init.kaiming_uniform_(adapter.hada_w2_b, a=math.sqrt(5))
        return adapter
