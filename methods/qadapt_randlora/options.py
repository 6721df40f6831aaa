"""Options of the ``randlora`` method."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qadapt.protocols import PluginOptions

#: No layer is wider than this, so no basis rank can exceed it.
MAX_RANK = 2**16
#: alpha / r multiplies the update; PEFT's default is 640, and 1e6 is far past any useful scale.
MAX_ALPHA = 1e6


class RandLoraOptions(PluginOptions):
    """Options of the ``randlora`` method (full-rank updates from shared random low-rank bases)."""

    r: int = Field(
        32,
        ge=1,
        le=MAX_RANK,
        description=f"Rank of each random basis, 1 to {MAX_RANK}; layers use ceil(min(in, out) / r) bases.",
    )
    alpha: float = Field(
        640.0,
        gt=0,
        le=MAX_ALPHA,
        allow_inf_nan=False,
        description=(
            f"Scaling numerator: the update is multiplied by alpha / r (PEFT: 640); finite, 0 < alpha <= {MAX_ALPHA:g}."
        ),
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Dropout on the adapter branch's input (training only), 0 <= dropout < 1.",
    )
    sparse: bool = Field(False, description="Ternary sparse bases (-1, 0, 1 with probabilities 1/6, 2/3, 1/6).")
    very_sparse: bool = Field(
        False, description="Ternary bases with nonzero probability 1/sqrt(min dim) each sign. Not with sparse."
    )
    projection_prng_key: int = Field(
        0, ge=0, lt=2**64, description="Seed of the torch.Generator that draws the shared bases."
    )
    save_projection: bool = Field(
        True, description="Save the shared bases with the adapter (True) or regenerate them from the key (False)."
    )
    init_weights: bool = Field(
        True,
        description="True: lambda = 0 (adapter starts as a no-op), gamma = 1/max(dims). False: lambda ~ N(0, 1).",
    )
    projection_dtype: Literal["bfloat16", "float16"] = Field(
        "bfloat16",
        description=(
            "dtype the dense bases are drawn in. PEFT uses bfloat16 wherever accelerate reports bf16 support "
            "(any CPU, Ampere+ GPUs) and float16 otherwise; match it to regenerate a PEFT adapter's bases."
        ),
    )

    @model_validator(mode="after")
    def _one_sparsity(self) -> RandLoraOptions:
        if self.sparse and self.very_sparse:
            raise ValueError("sparse and very_sparse are exclusive; set one of them (PEFT lets very_sparse win)")
        return self
