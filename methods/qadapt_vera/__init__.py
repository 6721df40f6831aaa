"""``vera``: VeRA (vector-based random matrix adaptation) on any qadapt backend.

For a layer ``W [out, in]``::

    ΔW = diag(lambda_b) · B[:out] · diag(lambda_d) · A[:, :in]      A [r, L_in], B [L_out, r]

``A`` and ``B`` are frozen random projections drawn once per model (sized by the largest target,
``Method.create_shared``) from ``projection_prng_key``; each layer trains ``lambda_b [out]`` and
``lambda_d [r]``. The math and the draw are PEFT 0.21.2's.

Mapping to PEFT's state dict (layer prefix ``P``, adapter name ``A``)::

    qadapt  P.adapters.A.vera_lambda_b               PEFT  P.vera_lambda_b.A        [out]
    qadapt  P.adapters.A.vera_lambda_d               PEFT  P.vera_lambda_d.A        [r]
    qadapt  VeraProjections.projection_tensors()     PEFT  base_model.vera_A.A      [r, L_in]
            ["vera_A"] / ["vera_B"]                        base_model.vera_B.A      [L_out, r]

The projections are non-persistent buffers; checkpoints save them once with ``save_projection``
and otherwise draw them again. Config names: ``vera_dropout → dropout``, the others unchanged.
"""

from qadapt_vera.method import VeraAdapter, VeraMethod
from qadapt_vera.options import VeraOptions
from qadapt_vera.projections import VeraProjections, generate_projections

__all__ = ["VeraAdapter", "VeraMethod", "VeraOptions", "VeraProjections", "generate_projections"]
