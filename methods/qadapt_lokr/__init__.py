"""``lokr``: LoKr (LyCORIS low-rank Kronecker product) on any qadapt backend.

``ΔW [out, in] = (alpha / r) · w1 ⊗ w2`` with ``w1 [a, c]``, ``w2 [b, d]``, ``out = a·b``, ``in = c·d``
(:func:`factorization`); either factor may be a rank-``r`` product. ``rank_pattern`` /
``alpha_pattern`` choose ``r`` and ``alpha`` per layer (``Method.for_layer``). PEFT 0.21.2's
``lokr.Linear``, module and rank dropout included.

Mapping to PEFT's state dict (layer prefix ``P``, adapter name ``A``): ``P.adapters.A.<key>`` is
``P.<key>.A`` for each of ``lokr_w1`` or ``lokr_w1_a`` / ``lokr_w1_b``, and ``lokr_w2`` or
``lokr_w2_a`` / ``lokr_w2_b``. Config names are PEFT's.
"""

from qadapt_lokr.method import LokrAdapter, LokrMethod, LokrOptions, factorization

__all__ = ["LokrAdapter", "LokrMethod", "LokrOptions", "factorization"]
