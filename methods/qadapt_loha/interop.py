"""qadapt's optional interop hooks for ``loha``: the PEFT 0.21.2 ``LOHA`` adapter format.

Found by convention (``<method package>.interop``) by ``qadapt.persist.peft``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

#: ``peft_type`` in PEFT's ``adapter_config.json``.
PEFT_TYPE = "LOHA"
#: Per-layer PEFT state keys (adapter name removed), relative to the layer.
PEFT_LAYER_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
#: Config fields with the same name and meaning in PEFT and qadapt.
_SAME = ("r", "alpha", "rank_dropout", "module_dropout", "init_weights", "rank_pattern", "alpha_pattern")


def options_from_peft(config: Mapping[str, Any]) -> dict[str, Any]:
    """qadapt ``loha`` options from a PEFT ``LoHaConfig`` dict (``use_effective_conv2d`` concerns
    convolutions only and is not read)."""
    return {name: config[name] for name in _SAME if name in config and config[name] is not None}


def options_to_peft(options: Mapping[str, Any], layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """PEFT ``LoHaConfig`` fields from qadapt options."""
    return {**{name: options[name] for name in _SAME if name in options}, "use_effective_conv2d": False}


def layer_from_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's PEFT tensors -> the adapter's ``state_dict`` entries (same keys)."""
    return {key: tensors[key] for key in PEFT_LAYER_KEYS}


def layer_to_peft(state: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's ``state_dict`` -> that layer's PEFT tensors."""
    return {key: state[key] for key in PEFT_LAYER_KEYS}
