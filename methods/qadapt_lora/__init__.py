"""``lora``, ``dora`` and ``qalora``: LoRA (QLoRA on a quantized base), DoRA and QA-LoRA on any backend.

One package, three entry points (PEFT writes all three as ``peft_type`` ``"LORA"``). The math is
PEFT 0.21.2's ``lora.Linear`` and its DoRA and QA-LoRA variants (see :mod:`qadapt_lora.qalora`);
DoRA's magnitude starts as the row norms of the *dequantized* base weight, as PEFT computes it on
a bitsandbytes layer.

Mapping to PEFT's state dict (layer prefix ``P``, adapter name ``A``)::

    qadapt  P.adapters.A.lora_A.weight   [r, in]    PEFT  P.lora_A.A.weight   (qalora: [r, in / group_size])
    qadapt  P.adapters.A.lora_B.weight   [out, r]   PEFT  P.lora_B.A.weight
    qadapt  P.adapters.A.magnitude       [out]      PEFT  P.lora_magnitude_vector.A.weight  (dora)

Config names: ``lora_alpha → alpha``, ``lora_dropout → dropout``, ``init_lora_weights →
init_weights``, ``qalora_group_size → group_size``; ``r``, ``use_rslora``, ``rank_pattern`` and
``alpha_pattern`` keep theirs. A PEFT ``LoraConfig`` with ``use_qalora=True`` loads as ``qalora``,
with ``use_dora=True`` as ``dora``, otherwise as ``lora``. ``rank_pattern`` / ``alpha_pattern``
choose ``r`` and ``alpha`` per layer (``Method.for_layer``, PEFT's matching rule).

Not supported: ``lora_bias``, and initializations that change the base weight or need data
(PiSSA, OLoRA, LoftQ, CorDA, EVA, ...).
"""

from qadapt_lora.method import DoraAdapter, DoraMethod, LoraAdapter, LoraMethod
from qadapt_lora.options import LoraOptions
from qadapt_lora.qalora import QALoraAdapter, QALoraMethod, QALoraOptions

__all__ = [
    "DoraAdapter",
    "DoraMethod",
    "LoraAdapter",
    "LoraMethod",
    "LoraOptions",
    "QALoraAdapter",
    "QALoraMethod",
    "QALoraOptions",
]
