"""Options of the ``oft`` method and how they fit one layer's ``in_features``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from pydantic import Field, model_validator

from qadapt.errors import ConfigError
from qadapt.protocols import PluginOptions

#: Block size used when neither ``r`` nor ``block_size`` is given (PEFT's default ``oft_block_size``).
DEFAULT_BLOCK_SIZE = 32
#: No layer is wider than this many input features, so neither r nor block_size can exceed it.
MAX_BLOCKS = 2**16
#: A block of side b stores b(b-1)/2 parameters and costs b^3 per Cayley solve; 8192 is already 32M parameters.
MAX_BLOCK_SIZE = 8192
#: Each Neumann term is one b x b matmul per block, and the terms shrink like ||Q||^k; past 32 they add nothing.
MAX_NEUMANN_TERMS = 32


class OFTOptions(PluginOptions):
    """Options of the ``oft`` method (Orthogonal Finetuning, Cayley-parametrized block rotations)."""

    r: int | None = Field(
        None,
        ge=1,
        le=MAX_BLOCKS,
        description=(
            f"Number of rotation blocks per layer (in_features = r * block_size), 1 to {MAX_BLOCKS} (and it must "
            "divide each layer's in_features). Not with block_size."
        ),
    )
    block_size: int | None = Field(
        None,
        ge=1,
        le=MAX_BLOCK_SIZE,
        description=(
            f"Side b of each square rotation block, 1 to {MAX_BLOCK_SIZE} (b(b-1)/2 parameters per block). "
            "Not with r. Neither given: block_size=32."
        ),
    )
    adjust_block_size: bool = Field(
        False,
        description=(
            "When r or block_size does not divide in_features, pick the nearest value that does (ties go down, as "
            "PEFT does) and warn, instead of raising a ConfigError."
        ),
    )
    block_share: bool = Field(False, description="One rotation shared by all blocks of a layer.")
    coft: bool = Field(
        False, description="Constrained OFT: keep each block's skew matrix within a Frobenius ball of radius eps."
    )
    eps: float = Field(
        6e-5,
        gt=0,
        lt=1,
        allow_inf_nan=False,
        description=(
            "COFT radius, divided by sqrt(number of stored blocks); 0 < eps < 1, which keeps each block's "
            "||Q|| below 1, where the Cayley-Neumann series converges."
        ),
    )
    module_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Training only: share of blocks whose rotation is replaced by the identity on each forward.",
    )
    use_cayley_neumann: bool = Field(
        True, description="Truncated Neumann series for the Cayley transform (no matrix inverse); False: exact solve."
    )
    num_cayley_neumann_terms: int = Field(
        5,
        ge=1,
        le=MAX_NEUMANN_TERMS,
        description=f"Terms of the Cayley-Neumann series, 1 to {MAX_NEUMANN_TERMS} (one matmul per block each).",
    )
    init_weights: bool = Field(
        True, description="True: zero skew parameters, so the adapter starts as the identity. False: N(0, 0.1)."
    )

    @model_validator(mode="after")
    def _r_or_block_size(self) -> OFTOptions:
        if self.r is not None and self.block_size is not None:
            raise ValueError(
                f"give either r ({self.r}) or block_size ({self.block_size}), not both: "
                "r * block_size must equal each layer's in_features"
            )
        return self


@dataclass(frozen=True)
class BlockLayout:
    """How one layer's input is split: ``n_blocks`` blocks of ``block_size`` features."""

    block_size: int
    n_blocks: int

    @property
    def n_elements(self) -> int:
        """Free entries of one ``b x b`` skew-symmetric matrix: ``b (b - 1) / 2``."""
        return self.block_size * (self.block_size - 1) // 2


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def closest_divisors(n: int, value: int) -> tuple[int, int | None]:
    """The largest divisor of ``n`` not above ``value`` and the smallest not below it (None if none)."""
    divs = divisors(n)
    lower = max(d for d in divs if d <= value) if value >= 1 else 1
    higher = min((d for d in divs if d >= value), default=None)
    return lower, higher


def nearest_divisor(n: int, value: int) -> int:
    """The divisor of ``n`` nearest to ``value``; ties go to the smaller one (PEFT's adjustment)."""
    if value >= n:
        return n
    lower, higher = closest_divisors(n, value)
    assert higher is not None
    return lower if value - lower <= higher - value else higher


def block_layout(options: OFTOptions, in_features: int) -> BlockLayout:
    """Fit ``r`` / ``block_size`` to a layer with ``in_features`` inputs.

    Raises:
        ConfigError: the value does not divide ``in_features`` and ``adjust_block_size`` is off.
    """
    field, value = ("r", options.r) if options.r is not None else ("block_size", options.block_size)
    if value is None:
        value = DEFAULT_BLOCK_SIZE
    if in_features % value != 0:
        adjusted = nearest_divisor(in_features, value)
        if not options.adjust_block_size:
            lower, higher = closest_divisors(in_features, value)
            valid = f"{lower}" if higher is None or higher == lower else f"{lower} or {higher}"
            raise ConfigError(
                f"method.options.{field}={value} does not divide the layer's in_features={in_features} "
                f"(OFT splits the input into equal blocks); closest valid {field}: {valid}. "
                f"Set adjust_block_size=True to use {adjusted} automatically."
            )
        warnings.warn(
            f"OFT {field}={value} does not divide in_features={in_features}; adjusted {field} from {value} "
            f"to {adjusted}",
            UserWarning,
            stacklevel=3,
        )
        value = adjusted
    if field == "r":
        return BlockLayout(block_size=in_features // value, n_blocks=value)
    return BlockLayout(block_size=value, n_blocks=in_features // value)
