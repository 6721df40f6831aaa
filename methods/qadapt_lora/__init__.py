"""``lora`` and ``dora``: LoRA (QLoRA on a quantized base) and DoRA on any qadapt backend.

One package, two entry points. The math is PEFT 0.21.2's ``lora.Linear`` (and its DoRA
variant); DoRA's magnitude starts as the row norms of the *dequantized* base weight, as PEFT
computes it on a bitsandbytes layer.

Mapping to PEFT's state dict (layer prefix ``P``, adapter name ``A``)::

    qadapt  P.adapters.A.lora_A.weight   [r, in]    PEFT  P.lora_A.A.weight
    qadapt  P.adapters.A.lora_B.weight   [out, r]   PEFT  P.lora_B.A.weight
    qadapt  P.adapters.A.magnitude       [out]      PEFT  P.lora_magnitude_vector.A.weight  (dora)

Config names: ``lora_alpha → alpha``, ``lora_dropout → dropout``, ``init_lora_weights →
init_weights``; ``r`` and ``use_rslora`` keep theirs. A PEFT ``LoraConfig`` with
``use_dora=True`` loads as ``dora``, otherwise as ``lora``.

``rank_pattern`` / ``alpha_pattern`` choose ``r`` and ``alpha`` per layer (``Method.for_layer``, PEFT's
matching rule). Not supported: ``lora_bias``, and
initializations that change the base weight or need data (PiSSA, OLoRA, LoftQ, CorDA, EVA, ...).
"""

from qadapt_lora.method import DoraAdapter, DoraMethod, LoraAdapter, LoraMethod
from qadapt_lora.options import LoraOptions

__all__ = ["DoraAdapter", "DoraMethod", "LoraAdapter", "LoraMethod", "LoraOptions"]
