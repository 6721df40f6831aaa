"""The ``vera`` method: :class:`VeraMethod` and its per-layer :class:`VeraAdapter`.

VeRA: ``ΔW = diag(lambda_b) · B · diag(lambda_d) · A`` with ``A [r, in]`` and ``B [out, r]``
frozen random projections shared by every layer of the model (sliced from the largest layer's),
and only ``lambda_b [out]`` and ``lambda_d [r]`` trained. The math is PEFT 0.21.2's ``vera.Linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.errors import ConfigError
from qadapt.protocols import BaseForward, Method, RowMerger
from qadapt_vera.options import VeraOptions
from qadapt_vera.projections import VeraProjections, generate_projections


class VeraAdapter(nn.Module):
    """One layer's VeRA vectors ``vera_lambda_b [out]`` and ``vera_lambda_d [r]`` (PEFT's names), and the
    model's shared :class:`VeraProjections` as ``projections``."""

    def __init__(self, in_features: int, out_features: int, projections: VeraProjections, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        r = projections.r
        # Created in PEFT's order (b without a draw, then d drawn), so a seeded run draws PEFT's numbers.
        self.vera_lambda_b = nn.Parameter(torch.ones(out_features))
        self.vera_lambda_d = nn.Parameter(torch.randn(r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projections = projections

    def sliced(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])``: this layer's slices of the shared projections, in ``dtype``."""
        a = self.projections.vera_A[:, : self.in_features].to(device=device, dtype=dtype)
        b = self.projections.vera_B[: self.out_features, :].to(device=device, dtype=dtype)
        return a, b

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = (lambda_b ⊙ B) @ (lambda_d ⊙ A)``, float32 ``[out, in]``."""
        lam_b, lam_d = self.vera_lambda_b.float(), self.vera_lambda_d.float()
        a, b = self.sliced(torch.float32, lam_b.device)
        return (lam_b[:, None] * b) @ (lam_d[:, None] * a)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.projections.r}"


class VeraMethod(Method):
    """VeRA: ``y = base(x) + lambda_b ⊙ B(lambda_d ⊙ A(dropout(x)))``; merged ``W' = W + ΔW``."""

    Options = VeraOptions
    options: VeraOptions

    def create_shared(self, shapes: Sequence[tuple[int, int]]) -> VeraProjections:
        return generate_projections(self.options, shapes)

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> VeraAdapter:
        projections = self.create_shared([(in_features, out_features)]) if shared is None else shared
        if not isinstance(projections, VeraProjections):
            raise ConfigError(f"vera's shared state must be VeraProjections, got {type(projections).__name__}")
        if not projections.fits(in_features, out_features, self.options.r):
            raise ConfigError(
                f"vera shared projections ({projections.extra_repr()}) cannot serve a layer with "
                f"in_features={in_features}, out_features={out_features}, r={self.options.r}: create_shared must be "
                "given every target's shape and the same r"
            )
        adapter = VeraAdapter(in_features, out_features, projections, self.options.dropout)
        if self.options.init_weights:
            with torch.no_grad():
                adapter.vera_lambda_d.fill_(self.options.d_initial)
                adapter.vera_lambda_b.zero_()
        return adapter

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        adapter = _as_vera(adapter)
        result = base_forward(x)
        lam_b, lam_d = adapter.vera_lambda_b, adapter.vera_lambda_d
        a, b = adapter.sliced(lam_d.dtype, lam_d.device)
        x = adapter.dropout(x.to(lam_d.dtype))
        return (result + lam_b * F.linear(lam_d * F.linear(x, a), b)).to(result.dtype)

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + _as_vera(adapter).delta_weight().detach().to(weight.device)

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() - _as_vera(adapter).delta_weight().detach().to(weight.device)

    def row_merger(self, adapter: nn.Module) -> RowMerger:
        vera = _as_vera(adapter)
        lam_b, lam_d = vera.vera_lambda_b.detach().float(), vera.vera_lambda_d.detach().float()
        a, b = vera.sliced(torch.float32, lam_b.device)
        right = lam_d[:, None] * a  # [r, in]
        up = lam_b[:, None] * b  # [out, r]
        return lambda weight_rows, rows: weight_rows + up[rows] @ right


def _as_vera(adapter: nn.Module) -> VeraAdapter:
    if not isinstance(adapter, VeraAdapter):
        raise ConfigError(f"the vera method needs a VeraAdapter, got {type(adapter).__name__}")
    return adapter
