"""``boft``: BOFT (Butterfly Orthogonal Finetuning) on any qadapt backend.

The input is rotated by ``R = M_{N-1} ··· M_0``, each ``M_i`` a permuted block-diagonal matrix of
Cayley rotations, and the output rows (bias excluded) are scaled by ``s``; merged
``W' = diag(s) W Rᵀ``. ``n_butterfly_factor = 1`` is block-diagonal OFT with a learned scale.
PEFT 0.21.2's ``boft.Linear``.

Mapping to PEFT's state dict (layer prefix ``P``, adapter name ``A``)::

    qadapt  P.adapters.A.boft_R   [N, D, b, b]   PEFT  P.boft_R.A
    qadapt  P.adapters.A.boft_s   [out, 1]       PEFT  P.boft_s.A

Config names: ``boft_block_size → block_size`` (0: unset), ``boft_block_num → block_num``
(0: unset), ``boft_n_butterfly_factor → n_butterfly_factor``, ``boft_dropout → dropout``.
"""

from qadapt_boft.method import BOFTAdapter, BOFTMethod, butterfly_permutation, cayley
from qadapt_boft.options import BOFTOptions, ButterflyLayout, butterfly_layout

__all__ = [
    "BOFTAdapter",
    "BOFTMethod",
    "BOFTOptions",
    "ButterflyLayout",
    "butterfly_layout",
    "butterfly_permutation",
    "cayley",
]
