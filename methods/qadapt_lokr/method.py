"""The ``lokr`` method: :class:`LokrMethod` and its per-layer :class:`LokrAdapter`.

LoKr (LyCORIS): ``ΔW = (alpha / r) · w1 ⊗ w2`` (Kronecker product) with ``w1 [a, c]`` and
``w2 [b, d]``, where ``out = a·b`` and ``in = c·d`` come from :func:`factorization`. A factor is
kept whole or as a rank-``r`` product (``w1_a w1_b``, ``w2_a w2_b``) by PEFT 0.21.2's rule:
``w2`` is a product when ``r < max(b, d) / 2``, ``w1`` only with ``decompose_both`` when
``r < max(a, c) / 2``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from qadapt_lycoris import LycorisMethod
from qadapt_lycoris.base import LycorisAdapter
from qadapt_lycoris.options import LycorisOptions


class LokrOptions(LycorisOptions):
    """Options of the ``lokr`` method (Kronecker product of two small factors)."""

    decompose_both: bool = Field(
        False, description="Also write the left factor w1 as a rank-r product when r < max(its sides) / 2."
    )
    decompose_factor: int = Field(
        -1,
        ge=-1,
        le=2**16,
        description=(
            "Factorization divider: -1 splits each dimension into two factors near its square root; a positive value "
            "that divides a dimension is used as one of its factors (PEFT's rule). Not 0."
        ),
    )
    rank_dropout_scale: bool = Field(
        False, description="With rank_dropout, divide the kept rows by the share kept (LoHa always does)."
    )
    init_weights: bool | Literal["lycoris"] = Field(
        True,
        description=(
            "True: w1 = 0 (or w1_a = 0), the rest Kaiming-uniform: a no-op at start. 'lycoris': w2 = 0 (or w2_b = 0), "
            "the rest Kaiming-uniform. False: all Kaiming-uniform (non-zero at start)."
        ),
    )

    @model_validator(mode="after")
    def _no_zero_factor(self) -> LokrOptions:
        if self.decompose_factor == 0:
            raise ValueError("decompose_factor=0 is not a factor; use -1 (near the square root) or a positive divisor")
        return self


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = dimension`` and ``m <= n``: ``(factor, dimension / factor)`` when a
    positive ``factor`` divides ``dimension``; otherwise the divisor pair nearest the square root whose
    smaller side is at most ``factor`` (any, for -1). PEFT 0.21.2's ``lokr.layer.factorization``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    # Walk the divisors upwards while the pair's sum shrinks and the small side stays within the limit.
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (n, m) if m > n else (m, n)


class LokrAdapter(LycorisAdapter):
    """One layer's Kronecker factors (PEFT's names): ``lokr_w1 [a, c]`` or ``lokr_w1_a [a, r]``, ``lokr_w1_b [r, c]``;
    ``lokr_w2 [b, d]`` or ``lokr_w2_a [b, r]``, ``lokr_w2_b [r, d]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        shape: tuple[tuple[int, int], tuple[int, int]],
        whole_w1: bool,
        whole_w2: bool,
    ) -> None:
        super().__init__(in_features, out_features, r, scaling)
        (a, b), (c, d) = shape
        self.shape = shape
        # Created (empty) in PEFT's order; the method initialises them in PEFT's order.
        if whole_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        if whole_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1 [a, c], w2 [b, d])``, in the adapter's dtype, inside autograd."""
        params = self._parameters
        w1 = params["lokr_w1"] if "lokr_w1" in params else self.lokr_w1_a @ self.lokr_w1_b
        w2 = params["lokr_w2"] if "lokr_w2" in params else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scaling

    @torch.no_grad()
    def delta_rows(self, rows: slice) -> torch.Tensor:
        w1, w2 = (w.float() for w in self.factors())
        index = torch.arange(self.out_features, device=w1.device)[rows]
        b = w2.shape[0]
        # Row i of w1 ⊗ w2 is w1[i // b] ⊗ w2[i % b]: [r, c] x [r, d] -> [r, c·d].
        return (w1[index // b][:, :, None] * w2[index % b][:, None, :]).flatten(1) * self.scaling

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shape={self.shape}, factors={sorted(self._parameters)}"


class LokrMethod(LycorisMethod):
    """LoKr: ``y = base(x) + x ΔWᵀ`` with ``ΔW = (alpha / r) · w1 ⊗ w2``."""

    Options = LokrOptions
    options: LokrOptions
    adapter_class = LokrAdapter

    @property
    def rescale_rank_dropout(self) -> bool:
        return self.options.rank_dropout_scale

    def layout(self, in_features: int, out_features: int) -> tuple[tuple[tuple[int, int], tuple[int, int]], bool, bool]:
        """``(((a, b), (c, d)), whole_w1, whole_w2)`` for a layer: ``out = a·b``, ``in = c·d``."""
        factor = self.options.decompose_factor
        (a, b), (c, d) = factorization(out_features, factor), factorization(in_features, factor)
        whole_w1 = not (self.options.decompose_both and self.r < max(a, c) / 2)
        whole_w2 = not (self.r < max(b, d) / 2)
        return ((a, b), (c, d)), whole_w1, whole_w2

    def make_adapter(self, in_features: int, out_features: int) -> LokrAdapter:
        shape, whole_w1, whole_w2 = self.layout(in_features, out_features)
        adapter = LokrAdapter(in_features, out_features, self.r, self.scaling, shape, whole_w1, whole_w2)
        init = self.options.init_weights
        p = adapter._parameters
        first = [p["lokr_w1"]] if whole_w1 else [p["lokr_w1_a"], p["lokr_w1_b"]]
        second = [p["lokr_w2"]] if whole_w2 else [p["lokr_w2_a"], p["lokr_w2_b"]]
        with torch.no_grad():
            if init == "lycoris":  # w1 drawn, w2 (or w2_b) zero; PEFT zeroes w2_b before drawing w2_a
                _kaiming(*first)
                nn.init.zeros_(second[-1])
                _kaiming(*second[:-1])
            elif init:  # w1 (or w1_a) zero, the rest drawn
                nn.init.zeros_(first[0])
                _kaiming(*first[1:], *second)
            else:
                _kaiming(*first, *second)
        return adapter


def _kaiming(*params: torch.Tensor) -> None:
    """Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear``) on each, in order."""
    for param in params:
        nn.init.kaiming_uniform_(param, a=math.sqrt(5))
