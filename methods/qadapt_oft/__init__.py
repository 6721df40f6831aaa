"""``oft``: Orthogonal Finetuning (OFT / COFT) on any qadapt backend.

Each layer's input ``x [..., in]`` is split into ``n_blocks`` blocks of ``b`` features and block
``j`` is rotated, ``x_j ↦ x_j R_j``, before the (quantized) base layer. ``R_j [b, b]`` is the
Cayley transform of a skew-symmetric ``Q_j``, exact or by a truncated Neumann series; the
parametrization is PEFT 0.21.2's, so adapters move between the two unchanged.

Mapping to PEFT's state dict (layer prefix ``P``, adapter name ``A``)::

    qadapt  P.adapters.A.weight   [n_blocks or 1, b(b-1)/2]  OFTAdapter.weight
    PEFT    P.oft_R.A.weight      [r or 1,        b(b-1)/2]  OFTRotationModule.weight

The tensors are identical (same row-major strict-upper-triangle order, ``torch.triu_indices``).
PEFT's ``r`` is our ``n_blocks``, PEFT's ``oft_block_size`` our ``block_size``; PEFT's config
field names map to :class:`OFTOptions` as ``oft_block_size → block_size`` and otherwise keep
their names (``r``, ``block_share``, ``coft``, ``eps``, ``module_dropout``, ``use_cayley_neumann``,
``num_cayley_neumann_terms``, ``init_weights``). PEFT configs always carry both ``r`` and
``oft_block_size`` with one of them 0: pass only the non-zero one.

Differences from PEFT: the merge works per block (PEFT builds the dense ``in x in``
block-diagonal matrix); the inverse unmerge solves per block; ``module_dropout`` is applied
in training (PEFT 0.21.2's Linear creates its dropout layer but never calls it).
"""

from qadapt_oft.method import OFTAdapter, OFTMethod
from qadapt_oft.options import DEFAULT_BLOCK_SIZE, BlockLayout, OFTOptions, block_layout

__all__ = ["DEFAULT_BLOCK_SIZE", "BlockLayout", "OFTAdapter", "OFTMethod", "OFTOptions", "block_layout"]
