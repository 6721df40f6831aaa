"""Options of the ``ia3`` method."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from qadapt.protocols import PluginOptions


class IA3Options(PluginOptions):
    """Options of the ``ia3`` method (a learned vector scales each layer's output, or a feed-forward layer's input)."""

    feedforward_modules: list[str] | str | None = Field(
        None,
        description=(
            "Layers treated as feed-forward (their input is scaled, per in-feature) instead of scaling the output "
            "(per out-feature, bias included), matched against each layer's canonical name as PEFT does: a string is "
            "a regex that must match the whole name; a list matches a name that ends with any entry. None: no layer."
        ),
    )
    init_weights: bool = Field(
        True, description="True: every scale is 1 (the adapter starts as the base layer). False: N(0, 1) draws."
    )

    @field_validator("feedforward_modules")
    @classmethod
    def _patterns(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"feedforward_modules={value!r} is not a valid regular expression: {exc}") from None
        elif value is not None and any(not entry for entry in value):
            raise ValueError("feedforward_modules entries must be non-empty name suffixes such as 'down_proj'")
        return value

    def is_feedforward(self, name: str) -> bool:
        """Whether layer ``name`` (canonical) is a feed-forward layer: PEFT 0.21.2's rule."""
        patterns = self.feedforward_modules
        if patterns is None:
            return False
        if isinstance(patterns, str):
            return re.fullmatch(patterns, name) is not None
        return any(name.endswith(entry) for entry in patterns)
