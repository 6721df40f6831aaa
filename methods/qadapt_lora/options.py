"""Options of the ``lora`` and ``dora`` methods (one model: DoRA adds no option of its own)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from qadapt.protocols import PluginOptions

#: Largest rank accepted (as oft and randlora): A and B of a 4096 x 4096 layer are then 2 GiB.
MAX_RANK = 65536
#: Largest |alpha| accepted; larger scales overflow float16 outputs at once.
MAX_ALPHA = 1e6


class LoraOptions(PluginOptions):
    """Options of the ``lora`` / ``dora`` methods (low-rank update ``B A``; DoRA adds a learned row magnitude)."""

    r: int = Field(
        8,
        ge=1,
        le=MAX_RANK,
        description=f"Rank of the update: A is [r, in_features], B is [out_features, r] (at most {MAX_RANK}).",
    )
    alpha: float = Field(
        8.0,
        ge=-MAX_ALPHA,
        le=MAX_ALPHA,
        description=(
            "Scaling numerator: the update is multiplied by alpha / r (PEFT: lora_alpha); finite, "
            f"|alpha| <= {MAX_ALPHA:g} (0 makes the adapter a no-op, a negative value flips the update)."
        ),
    )
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha / sqrt(r) instead of alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter branch's input (training only).")
    init_weights: bool | Literal["gaussian"] = Field(
        True,
        description=(
            "True: A Kaiming-uniform (as nn.Linear), B = 0, so the adapter starts as a no-op. 'gaussian': "
            "A ~ N(0, 1/r^2), B = 0. False: both as nn.Linear initializes them (the adapter starts non-zero)."
        ),
    )

    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "Per-layer ranks: {pattern: r}; a pattern is a regex matched against the end of a layer's name at a dot "
            "boundary (PEFT's rule); the first matching pattern wins."
        ),
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-layer alphas: {pattern: alpha}, matched as rank_pattern."
    )

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        for key, number in value.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"{info.field_name} key {key!r} is not a valid regular expression: {exc}") from None
            if info.field_name == "rank_pattern" and number < 1:
                raise ValueError(f"rank_pattern ranks must be at least 1; got {key!r}: {number}")
        return value

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora`` (the defaults, before any pattern)."""
        return scaling(self.alpha, self.r, self.use_rslora)


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
    return alpha / (r**0.5 if use_rslora else r)


def pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    """The value of the first pattern matching the end of ``name`` at a dot boundary (PEFT 0.21.2's
    ``get_pattern_key``), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
