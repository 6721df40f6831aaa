"""``randlora``: RandLora (full-rank updates from shared random bases) on any qadapt backend.

For a layer ``W [out, in]`` with ``d = min(in, out)``, ``D = max(in, out)``, ``N = ceil(d / r)``::

    ΔW = (alpha / r) · second @ first        first [r·N, in], second [out, r·N]

where one factor is the shared small basis scaled per layer, ``lambda [r, N] ⊙ A [r, 1, d] ⊙ gamma [N, d]``
flattened to ``[r·N, d]``, and the other the shared large basis ``B [D, N, r]`` flattened to ``[D, N·r]``;
the scaled factor always sits on the smaller side. The math is PEFT 0.21.2's float layer.

Mapping to PEFT's state dict (layer prefix ``P``, adapter name ``A``)::

    qadapt  P.adapters.A.lambda_                    PEFT  P.randlora_lambda.A       [r, N]
    qadapt  P.adapters.A.gamma                      PEFT  P.randlora_gamma.A        [N, d]
    qadapt  RandLoraBases.projection_tensors()      PEFT  base_model.randlora_A.A   [r, 1, d_model]
            ["randlora_A"] / ["randlora_B"]               base_model.randlora_B.A   [D_model, N_model, r]

The bases are non-persistent buffers (they would otherwise repeat in every layer's state dict).
Checkpoint code saves :meth:`RandLoraBases.projection_tensors` once when ``save_projection`` is
true, and otherwise rebuilds them with :func:`generate_bases` (options + every target's shape).
Config names: ``randlora_alpha → alpha``, ``randlora_dropout → dropout``, the others unchanged.

Not followed: PEFT's bitsandbytes RandLora classes (their merge multiplies the factors in the
other order and their 4-bit merge fails); here every backend shares the float layer's math.
"""

from qadapt_randlora.bases import RandLoraBases, generate_bases, largest_shape, num_bases
from qadapt_randlora.method import RandLoraAdapter, RandLoraMethod
from qadapt_randlora.options import RandLoraOptions
from qadapt_randlora.scaled_basis import ScaledBasis, scaled_basis

__all__ = [
    "RandLoraAdapter",
    "RandLoraBases",
    "RandLoraMethod",
    "RandLoraOptions",
    "ScaledBasis",
    "generate_bases",
    "largest_shape",
    "num_bases",
    "scaled_basis",
]
