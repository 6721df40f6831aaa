"""Names of torch dtypes as they appear in options and config files."""

from __future__ import annotations

from typing import Literal

import torch

FloatName = Literal["float32", "bfloat16", "float16"]

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def float_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype for an option value (None stays None)."""
    return None if name is None else FLOAT_DTYPES[name]
