"""bitsandbytes layers in the transformers checkpoint layout, and the ``quantization_config`` it writes.

transformers (5.x) saves a ``Linear4bit`` as ``weight`` (packed codes) plus the entries of
bitsandbytes' ``QuantState.as_dict(packed=True)`` under ``weight.`` (``absmax``, ``quant_map``,
``nested_absmax``, ``nested_quant_map`` and ``quant_state.bitsandbytes__nf4|fp4``, a JSON blob of
the plain fields), and a ``Linear8bitLt`` as ``weight`` (int8 codes), ``SCB`` (row scales) and
``weight_format`` (0: row-major). Its ``config.json`` holds ``BitsAndBytesConfig.to_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

#: ``BitsAndBytesConfig().to_dict()`` of transformers 5.x, field for field (its defaults).
_DEFAULTS: dict[str, Any] = {
    "_load_in_4bit": False,
    "_load_in_8bit": False,
    "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "fp4",
    "bnb_4bit_use_double_quant": False,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": False,
    "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}
#: Settings a layer's storage does not decide: kept from the base checkpoint's config.
_KEPT = ("bnb_4bit_compute_dtype", "llm_int8_enable_fp32_cpu_offload", "llm_int8_skip_modules", "llm_int8_threshold")
STATE_KEY_PREFIX = "weight.quant_state.bitsandbytes__"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def bnb_config(bits: int, base_config: Mapping[str, Any] | None, **fields: Any) -> dict[str, Any]:
    """A ``quantization_config`` for ``bits`` (4 or 8): transformers' defaults, the base checkpoint's
    kept settings when it was a bitsandbytes one, then ``fields``."""
    config = dict(_DEFAULTS)
    if base_config is not None and base_config.get("quant_method") == "bitsandbytes":
        config.update({key: base_config[key] for key in _KEPT if key in base_config})
    four = bits == 4
    config.update(_load_in_4bit=four, load_in_4bit=four, _load_in_8bit=not four, load_in_8bit=not four)
    config.update(fields)
    return config
