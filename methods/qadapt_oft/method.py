"""The ``oft`` method: :class:`OFTMethod` and its per-layer :class:`OFTAdapter`."""

from __future__ import annotations

import torch
from torch import nn

from qadapt.errors import ConfigError
from qadapt.protocols import BaseForward, Method, RowMerger
from qadapt_oft import rotation
from qadapt_oft.options import BlockLayout, OFTOptions, block_layout


class OFTAdapter(nn.Module):
    """One layer's OFT parameters.

    ``weight [n_stored, b (b - 1) / 2]``: the strict upper triangle of each block's skew-symmetric
    matrix, ``n_stored = n_blocks`` or 1 with ``block_share``. This is PEFT's
    ``oft_R.<adapter>.weight``, same shape, same layout.
    """

    def __init__(self, in_features: int, layout: BlockLayout, block_share: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.block_size = layout.block_size
        self.n_blocks = layout.n_blocks
        self.block_share = block_share
        n_stored = 1 if block_share else layout.n_blocks
        self.weight = nn.Parameter(torch.zeros(n_stored, layout.n_elements))
        rows, cols = torch.triu_indices(layout.block_size, layout.block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self, vec: torch.Tensor | None = None) -> torch.Tensor:
        """``Q [n_stored, b, b]`` from ``vec`` (default: :attr:`weight`)."""
        return rotation.skew_symmetric(self.weight if vec is None else vec, self.rows, self.cols, self.block_size)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, n_blocks={self.n_blocks}, block_share={self.block_share}"


class OFTMethod(Method):
    """Orthogonal finetuning: ``y = base(x · blockdiag(R))`` with each ``R_j`` a Cayley rotation.

    Merged weight ``W' = W · blockdiag(R)ᵀ``, computed per block.
    """

    Options = OFTOptions
    options: OFTOptions

    def layout(self, in_features: int) -> BlockLayout:
        """Block size and count for a layer (warns when ``adjust_block_size`` changes them)."""
        return block_layout(self.options, in_features)

    def check_layer(self, in_features: int, out_features: int) -> None:
        self.layout(in_features)

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> OFTAdapter:
        adapter = OFTAdapter(in_features, self.layout(in_features), self.options.block_share)
        if not self.options.init_weights:
            with torch.no_grad():
                adapter.weight.normal_(mean=0.0, std=0.1)
        return adapter

    # ------------------------------------------------------------------ rotations

    def rotations(self, adapter: nn.Module, vec: torch.Tensor | None = None) -> torch.Tensor:
        """``R [n_stored, b, b]`` from the adapter's parameters (or ``vec [n_stored, e]``)."""
        adapter = _as_oft(adapter)
        q = adapter.skew(vec)
        if self.options.use_cayley_neumann:
            return rotation.cayley_neumann(q, self.options.num_cayley_neumann_terms)
        return rotation.cayley_exact(q)

    def _merge_rotations(self, adapter: OFTAdapter) -> torch.Tensor:
        vec = adapter.weight.detach().float()
        if self.options.coft:
            vec = rotation.coft_project(vec, adapter.rows, adapter.cols, adapter.block_size, self.options.eps)
        return self.rotations(adapter, vec)

    # --------------------------------------------------------------------- protocol

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseForward) -> torch.Tensor:
        adapter = _as_oft(adapter)
        if self.options.coft:
            # Projected gradient descent, as in COFT: the parameter itself is kept on the ball.
            with torch.no_grad():
                adapter.weight.copy_(
                    rotation.coft_project(
                        adapter.weight, adapter.rows, adapter.cols, adapter.block_size, self.options.eps
                    )
                )
        rot = self.rotations(adapter)
        if adapter.training and self.options.module_dropout > 0:
            rot = rotation.drop_blocks(rot, adapter.n_blocks, self.options.module_dropout)
        rotated = rotation.rotate_input(x.to(rot.dtype), rot)
        return base_forward(rotated.to(x.dtype))

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        adapter = _as_oft(adapter)
        return rotation.rotate_weight(weight, self._merge_rotations(adapter).to(weight.dtype))

    def row_merger(self, adapter: nn.Module) -> RowMerger:
        rotations = self._merge_rotations(_as_oft(adapter)).float()  # the rotation acts on inputs: rows are independent
        return lambda weight_rows, rows: rotation.rotate_weight(weight_rows, rotations)

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        adapter = _as_oft(adapter)
        return rotation.unrotate_weight(weight, self._merge_rotations(adapter).to(weight.dtype))


def _as_oft(adapter: nn.Module) -> OFTAdapter:
    if not isinstance(adapter, OFTAdapter):
        raise ConfigError(f"the oft method needs an OFTAdapter, got {type(adapter).__name__}")
    return adapter
