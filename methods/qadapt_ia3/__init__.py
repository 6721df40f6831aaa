"""``ia3``: (IA)³ (learned rescaling vectors) on any qadapt backend.

An ordinary layer's output is scaled per out-feature, bias included: ``y = l ⊙ (W x + b)``,
merged ``W' = diag(l) W``, ``b' = l ⊙ b`` (the bias goes through :meth:`Method.merge_bias`). A
feed-forward layer (``feedforward_modules``, matched per layer by :meth:`Method.for_layer`) has its
input scaled: ``y = W (l ⊙ x) + b``, merged ``W' = W diag(l)``. PEFT 0.21.2's ``ia3.Linear``.

Mapping to PEFT's state dict (layer prefix ``P``, adapter name ``A``)::

    qadapt  P.adapters.A.ia3_l   [out, 1] or [1, in]   PEFT  P.ia3_l.A

Config names: ``init_ia3_weights → init_weights``; ``feedforward_modules`` keeps its name.
"""

from qadapt_ia3.method import IA3Adapter, IA3Method
from qadapt_ia3.options import IA3Options

__all__ = ["IA3Adapter", "IA3Method", "IA3Options"]
