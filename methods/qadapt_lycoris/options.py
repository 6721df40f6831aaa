"""Options the LyCORIS methods share (``loha``, ``lokr``)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from qadapt.protocols import PluginOptions

#: No layer is wider than this, so no rank can usefully exceed it.
MAX_RANK = 2**16
#: alpha / r multiplies the update; 1e6 is far past any useful scale.
MAX_ALPHA = 1e6


class LycorisOptions(PluginOptions):
    """Options of a LyCORIS method (a full-size update built from small factors, scaled by alpha / r)."""

    r: int = Field(8, ge=1, le=MAX_RANK, description=f"Rank of the factors, 1 to {MAX_RANK} (PEFT: 8).")
    alpha: float = Field(
        8.0,
        ge=-MAX_ALPHA,
        le=MAX_ALPHA,
        allow_inf_nan=False,
        description=f"Scaling numerator: the update is multiplied by alpha / r; finite, |alpha| <= {MAX_ALPHA:g}.",
    )
    rank_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Training only: each output row of the update is dropped with this probability, 0 <= p < 1.",
    )
    module_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Training only: the whole update is skipped on a forward with this probability, 0 <= p < 1.",
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

    @field_validator("rank_pattern")
    @classmethod
    def _ranks(cls, value: dict[str, int]) -> dict[str, int]:
        _check_patterns(value, "rank_pattern")
        bad = {key: r for key, r in value.items() if not 1 <= r <= MAX_RANK}
        if bad:
            raise ValueError(f"rank_pattern ranks must be 1 to {MAX_RANK}; got {bad}")
        return value

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas(cls, value: dict[str, float]) -> dict[str, float]:
        _check_patterns(value, "alpha_pattern")
        bad = {key: a for key, a in value.items() if not abs(a) <= MAX_ALPHA}  # NaN fails too
        if bad:
            raise ValueError(f"alpha_pattern alphas must be finite with |alpha| <= {MAX_ALPHA:g}; got {bad}")
        return value


def _check_patterns(value: dict[str, object], field: str) -> None:
    for key in value:
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{field} key {key!r} is not a valid regular expression: {exc}") from None
