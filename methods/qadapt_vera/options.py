"""Options of the ``vera`` method."""

from __future__ import annotations

from pydantic import Field

from qadapt.protocols import PluginOptions

#: No layer is wider than this, so no projection rank can usefully exceed it.
MAX_RANK = 2**16
#: |d_initial| above this is far past any useful start (PEFT: 0.1).
MAX_D_INITIAL = 1e4


class VeraOptions(PluginOptions):
    """Options of the ``vera`` method (per-layer scaling vectors on shared frozen random projections)."""

    r: int = Field(
        256,
        ge=1,
        le=MAX_RANK,
        description=f"Rank of the shared random projections A [r, in] and B [out, r], 1 to {MAX_RANK} (PEFT: 256).",
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Dropout on the adapter branch's input (training only), 0 <= dropout < 1 (PEFT: vera_dropout).",
    )
    d_initial: float = Field(
        0.1,
        ge=-MAX_D_INITIAL,
        le=MAX_D_INITIAL,
        allow_inf_nan=False,
        description=f"Initial value of every entry of lambda_d (with init_weights), finite, |d| <= {MAX_D_INITIAL:g}.",
    )
    projection_prng_key: int = Field(
        0, ge=0, lt=2**64, description="Seed of the torch.Generator that draws the shared projections."
    )
    save_projection: bool = Field(
        True, description="Save the shared projections with the adapter (True) or regenerate them from the key."
    )
    init_weights: bool = Field(
        True,
        description=(
            "True: lambda_b = 0 (the adapter starts as a no-op), lambda_d = d_initial. False: lambda_b = 1, "
            "lambda_d ~ N(0, 1) (the adapter starts non-zero)."
        ),
    )
