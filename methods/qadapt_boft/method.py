"""The ``boft`` method: :class:`BOFTMethod` and its per-layer :class:`BOFTAdapter`.

BOFT rotates a layer's input by ``R [in, in]``, a product of ``N`` butterfly factors, and scales
its output rows (bias excluded) by ``s [out]``::

    Q_ij = cayley(R_ij)  (b x b, orthogonal)      B_i = blockdiag(Q_i1 ... Q_iD)      [in, in]
    M_i  = P_i B_i P_iᵀ                            R   = M_{N-1} ··· M_1 M_0
    y    = s ⊙ (base(x R) − b) + b                 W'  = diag(s) W Rᵀ

``P_i`` is the butterfly permutation of factor ``i``: inside each run of ``b · 2^i`` features, the
runs of ``b / 2`` are reordered evens first, then odds (the identity for ``i = 0``). PEFT 0.21.2's
``boft.Linear`` computes the same (its CUDA block-diagonal kernel and its CPU fallback agree).
"""

from __future__ import annotations

import torch
from torch import nn

from qadapt.errors import ArgumentTypeError, ConfigError
from qadapt.protocols import BaseForward, BaseLayer, Method, RowMerger
from qadapt_boft.options import BOFTOptions, ButterflyLayout, butterfly_layout


def butterfly_permutation(in_features: int, run: int, half: int) -> torch.Tensor:
    """The permutation ``[in]`` of one butterfly factor: inside each run of ``run`` features, the pieces of
    ``half`` features in the order 0, 2, 4, ..., 1, 3, 5, ... (``run = 2 · half`` gives the identity)."""
    pieces = run // half
    order = [*range(0, pieces, 2), *range(1, pieces, 2)]
    within = torch.cat([torch.arange(p * half, (p + 1) * half) for p in order])
    return torch.cat([start + within for start in range(0, in_features, run)])


def cayley(blocks: torch.Tensor) -> torch.Tensor:
    """``(I − S)(I + S)⁻¹`` for ``S = (A − Aᵀ) / 2`` of each ``A`` in ``blocks [..., b, b]`` (orthogonal)."""
    skew = 0.5 * (blocks - blocks.transpose(-1, -2))
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


class BOFTAdapter(nn.Module):
    """One layer's ``boft_R [N, D, b, b]`` and ``boft_s [out, 1]`` (PEFT's names and shapes), and the
    butterfly permutations ``perms [N, in]`` (an integer buffer, not saved: they follow from the shape)."""

    def __init__(self, in_features: int, out_features: int, layout: ButterflyLayout, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.layout, self.dropout = in_features, out_features, layout, dropout
        size, num, factors = layout.block_size, layout.block_num, layout.factors
        self.boft_R = nn.Parameter(torch.zeros(factors, num, size, size))
        self.boft_s = nn.Parameter(torch.ones(out_features, 1))
        perms = [butterfly_permutation(in_features, size * 2**i, max(size // 2, 1)) for i in range(factors)]
        if factors == 1:
            perms = [torch.arange(in_features)]
        self.register_buffer("perms", torch.stack(perms), persistent=False)

    def blocks(self, dropout: bool = False) -> torch.Tensor:
        """The orthogonal blocks ``[N, D, b, b]``; with ``dropout`` (training forwards), PEFT's multiplicative
        dropout with PEFT's draws."""
        blocks = cayley(self.boft_R)
        if not (dropout and self.dropout > 0):
            return blocks
        factors, num, size, _ = blocks.shape
        chosen = int(torch.randint(0, factors, (1,)).item())
        dropped = int(self.dropout * num)
        mask = torch.cat([torch.ones(dropped), torch.zeros(num - dropped)])[torch.randperm(num)].to(blocks)
        full = torch.zeros(factors, num, 1, 1, dtype=blocks.dtype, device=blocks.device)
        full[chosen] = mask.view(num, 1, 1)
        eye = torch.eye(size, dtype=blocks.dtype, device=blocks.device)
        return (1 - full) * blocks + full * eye

    def rotation(self, dropout: bool = False) -> torch.Tensor:
        """``R [in, in] = M_{N-1} ··· M_0`` with ``M_i = P_i blockdiag(Q_i) P_iᵀ``, in the adapter's dtype
        (``dropout``: see :meth:`blocks`; merges never drop)."""
        rotation = None
        for i, factor_blocks in enumerate(self.blocks(dropout)):
            perm = self.perms[i]
            block_diagonal = torch.block_diag(*factor_blocks.unbind(0))
            factor = block_diagonal[perm][:, perm]  # P B Pᵀ, with P[a, perm[a]] = 1
            rotation = factor if rotation is None else factor @ rotation
        assert rotation is not None
        return rotation

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={lay.block_size}, "
            f"block_num={lay.block_num}, n_butterfly_factor={lay.factors}"
        )


class BOFTMethod(Method):
    """BOFT: ``y = s ⊙ (base(x R) − b) + b``; merged ``W' = diag(s) W Rᵀ`` (the bias is not scaled)."""

    Options = BOFTOptions
    options: BOFTOptions

    def check_layer(self, in_features: int, out_features: int) -> None:
        butterfly_layout(self.options, in_features)

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> BOFTAdapter:
        layout = butterfly_layout(self.options, in_features)
        adapter = BOFTAdapter(in_features, out_features, layout, self.options.dropout)
        if not self.options.init_weights:
            with torch.no_grad():
                nn.init.normal_(adapter.boft_R, mean=0.0, std=0.1)
                nn.init.normal_(adapter.boft_s, mean=1.0, std=0.1)
        return adapter

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        adapter = _as_boft(adapter)
        if not isinstance(base_forward, BaseLayer):
            raise ArgumentTypeError(
                "boft scales the output without its bias, so it needs the base layer's bias: base_forward must be a "
                f"qadapt.protocols.BaseLayer, got {type(base_forward).__name__}"
            )
        result = base_forward(x @ adapter.rotation(dropout=adapter.training).to(x.dtype))
        scale = adapter.boft_s.squeeze(-1)
        bias = base_forward.bias
        if bias is None:
            return result * scale
        return (result - bias) * scale + bias

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        adapter = _as_boft(adapter)
        rotation = adapter.rotation().detach().float().to(weight.device)
        return (weight.float() @ rotation.T) * adapter.boft_s.detach().float().to(weight.device)

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        adapter = _as_boft(adapter)
        rotation = adapter.rotation().detach().float().to(weight.device)
        unscaled = weight.float() / adapter.boft_s.detach().float().to(weight.device)
        # W Rᵀ = unscaled, solved rather than multiplied by R (orthogonal only to rounding).
        return torch.linalg.solve(rotation.T, unscaled, left=False)

    def row_merger(self, adapter: nn.Module) -> RowMerger:
        boft = _as_boft(adapter)
        rotation_t = boft.rotation().detach().float().T
        scale = boft.boft_s.detach().float()
        return lambda weight_rows, rows: (weight_rows @ rotation_t.to(weight_rows.device)) * scale[rows].to(
            weight_rows.device
        )


def _as_boft(adapter: nn.Module) -> BOFTAdapter:
    if not isinstance(adapter, BOFTAdapter):
        raise ConfigError(f"the boft method needs a BOFTAdapter, got {type(adapter).__name__}")
    return adapter
