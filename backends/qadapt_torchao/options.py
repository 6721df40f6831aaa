"""Options of the ``torchao`` backend (used when it quantizes a float layer)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from qadapt.protocols import PluginOptions

#: Largest group or block size accepted (2^20 weights; check_layer also needs it to divide the layer).
MAX_GROUP = 2**20


class TorchaoOptions(PluginOptions):
    """Which torchao weight format a float ``nn.Linear`` is quantized to.

    Layers already quantized with ``torchao.quantization.quantize_`` (or holding an ``NF4Tensor``)
    are adopted as they are; these options do not apply to them.
    """

    config: Literal["int8", "int4", "nf4"] = Field(
        "int8",
        description=(
            "int8: Int8WeightOnlyConfig; int4: IntxWeightOnlyConfig(weight_dtype=torch.int4); "
            "nf4: torchao's NF4Tensor (to_nf4, the QLoRA format torchtune trains with)."
        ),
    )
    group_size: PositiveInt | None = Field(
        None,
        le=MAX_GROUP,
        description=(
            "int8 / int4: weights per scale along in_features (must divide it); None: one scale per output row. "
            f"Not used by nf4 (see nf4_block_size). At most {MAX_GROUP}."
        ),
    )
    mapping: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="int4 only: symmetric scales, or scales and zero points (asymmetric)."
    )
    nf4_block_size: PositiveInt = Field(
        64, le=MAX_GROUP, description="nf4: weights per absmax block (must divide out_features * in_features)."
    )
    nf4_scaler_block_size: PositiveInt = Field(
        256,
        le=MAX_GROUP,
        description=(
            "nf4: absmax values per block of the second (int8) quantization; must divide the number of "
            "blocks, out_features * in_features / nf4_block_size."
        ),
    )

    @model_validator(mode="after")
    def _fits_config(self) -> TorchaoOptions:
        if self.mapping != "symmetric" and self.config != "int4":
            raise ValueError(f"mapping={self.mapping!r} applies to config='int4' only (config is {self.config!r})")
        if self.group_size is not None and self.config == "nf4":
            raise ValueError("group_size does not apply to config='nf4'; set nf4_block_size instead")
        return self
