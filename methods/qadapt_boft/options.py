"""Options of the ``boft`` method and how they fit one layer's ``in_features``."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, model_validator

from qadapt.errors import ConfigError
from qadapt.protocols import PluginOptions

#: Block size used when neither ``block_size`` nor ``block_num`` is given (PEFT's default ``boft_block_size``).
DEFAULT_BLOCK_SIZE = 4
#: A block of side b stores b² parameters and costs b³ per Cayley solve.
MAX_BLOCK_SIZE = 4096
#: No layer is wider than this many input features.
MAX_BLOCKS = 2**16
#: Each butterfly factor doubles the span of a rotation; 2^16 features is past any layer.
MAX_FACTORS = 16


class BOFTOptions(PluginOptions):
    """Options of the ``boft`` method (Butterfly Orthogonal Finetuning: products of permuted block rotations)."""

    block_size: int | None = Field(
        None,
        ge=1,
        le=MAX_BLOCK_SIZE,
        description=(
            f"Side b of each rotation block, 1 to {MAX_BLOCK_SIZE}; must divide each layer's in_features (PEFT: "
            f"boft_block_size). Not with block_num. Neither given: block_size={DEFAULT_BLOCK_SIZE}."
        ),
    )
    block_num: int | None = Field(
        None,
        ge=1,
        le=MAX_BLOCKS,
        description=(
            f"Number of rotation blocks per layer, 1 to {MAX_BLOCKS} (PEFT: boft_block_num). Not with block_size."
        ),
    )
    n_butterfly_factor: int = Field(
        1,
        ge=1,
        le=MAX_FACTORS,
        description=(
            f"Butterfly factors multiplied into each layer's rotation, 1 to {MAX_FACTORS}; 1 is block-diagonal OFT, "
            "each more doubles a rotation's span (PEFT: boft_n_butterfly_factor)."
        ),
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description=(
            "Training only: in one random butterfly factor, int(p * blocks) random blocks use the identity "
            "(PEFT's multiplicative dropout, boft_dropout), 0 <= p < 1."
        ),
    )
    init_weights: bool = Field(
        True,
        description="True: R = 0 and s = 1, the adapter starts as the identity. False: R ~ N(0, 0.1), s ~ N(1, 0.1).",
    )

    @model_validator(mode="after")
    def _size_or_num(self) -> BOFTOptions:
        if self.block_size is not None and self.block_num is not None:
            raise ValueError(
                f"give either block_size ({self.block_size}) or block_num ({self.block_num}), not both: "
                "block_size * block_num must equal each layer's in_features"
            )
        return self


@dataclass(frozen=True)
class ButterflyLayout:
    """One layer's rotation: ``factors`` butterfly factors of ``block_num`` blocks of ``block_size`` features."""

    block_size: int
    block_num: int
    factors: int


def butterfly_layout(options: BOFTOptions, in_features: int) -> ButterflyLayout:
    """Fit the options to a layer with ``in_features`` inputs (PEFT 0.21.2's rules).

    Raises:
        ConfigError: naming the option, its value and what would fit.
    """
    factors = options.n_butterfly_factor
    span = 2 ** (factors - 1)  # the last factor's rotations span this many blocks
    if options.block_num is not None:
        num = options.block_num
        if in_features % num:
            raise ConfigError(
                f"method.options.block_num={num} does not divide the layer's in_features={in_features}; "
                f"valid block_num: a divisor of {in_features}"
            )
        if factors > 1 and (factors - 1 > (num.bit_length() - 1) or num % span):
            raise ConfigError(
                f"method.options.n_butterfly_factor={factors} needs block_num to be a multiple of "
                f"2^(n_butterfly_factor - 1) = {span}, got block_num={num}"
            )
        size = in_features // num
    else:
        size = DEFAULT_BLOCK_SIZE if options.block_size is None else options.block_size
        field = "block_size" if options.block_size is not None else "block_size (default)"
        if in_features % size:
            raise ConfigError(
                f"method.options.{field}={size} does not divide the layer's in_features={in_features}; "
                f"valid block_size: a divisor of {in_features}"
            )
        if factors > 1 and in_features % (size * span):
            raise ConfigError(
                f"method.options.n_butterfly_factor={factors} with block_size={size} needs in_features to be a "
                f"multiple of block_size * 2^(n_butterfly_factor - 1) = {size * span}, got in_features={in_features}"
            )
        num = in_features // size
    if factors > 1 and (num % 2 or size % 2):
        raise ConfigError(
            f"method.options.n_butterfly_factor={factors} needs an even number of blocks of an even size; this layer "
            f"(in_features={in_features}) gets {num} blocks of {size}"
        )
    return ButterflyLayout(block_size=size, block_num=num, factors=factors)
