"""``loha``: LoHa (LyCORIS low-rank Hadamard product) on any qadapt backend.

``ΔW [out, in] = (alpha / r) · (w1_a w1_b) ⊙ (w2_a w2_b)`` with ``w*_a [out, r]`` and ``w*_b [r, in]``;
``rank_pattern`` / ``alpha_pattern`` choose ``r`` and ``alpha`` per layer (``Method.for_layer``).
PEFT 0.21.2's ``loha.Linear``, module and rank dropout included.

Mapping to PEFT's state dict (layer prefix ``P``, adapter name ``A``)::

    qadapt  P.adapters.A.hada_w1_a   [out, r]   PEFT  P.hada_w1_a.A
    qadapt  P.adapters.A.hada_w1_b   [r, in]    PEFT  P.hada_w1_b.A
    qadapt  P.adapters.A.hada_w2_a   [out, r]   PEFT  P.hada_w2_a.A
    qadapt  P.adapters.A.hada_w2_b   [r, in]    PEFT  P.hada_w2_b.A

Config names are PEFT's.
"""

from qadapt_loha.method import LohaAdapter, LohaMethod, LohaOptions

__all__ = ["LohaAdapter", "LohaMethod", "LohaOptions"]
