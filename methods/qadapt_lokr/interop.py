"""qadapt's optional interop hooks for ``lokr``: the PEFT 0.21.2 ``LOKR`` adapter format.

Found by convention (``<method package>.interop``) by ``qadapt.persist.peft``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qadapt.errors import CheckpointError

#: ``peft_type`` in PEFT's ``adapter_config.json``.
PEFT_TYPE = "LOKR"
#: Per-layer PEFT state keys (adapter name removed), relative to the layer (``lokr_t2`` is for convolutions).
PEFT_LAYER_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
#: Config fields with the same name and meaning in PEFT and qadapt.
_SAME = (
    "r",
    "alpha",
    "rank_dropout",
    "module_dropout",
    "init_weights",
    "rank_pattern",
    "alpha_pattern",
    "decompose_both",
    "decompose_factor",
    "rank_dropout_scale",
)


def options_from_peft(config: Mapping[str, Any]) -> dict[str, Any]:
    """qadapt ``lokr`` options from a PEFT ``LoKrConfig`` dict (``use_effective_conv2d`` concerns
    convolutions only and is not read)."""
    return {name: config[name] for name in _SAME if name in config and config[name] is not None}


def options_to_peft(options: Mapping[str, Any], layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """PEFT ``LoKrConfig`` fields from qadapt options."""
    return {**{name: options[name] for name in _SAME if name in options}, "use_effective_conv2d": False}


def layer_from_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's PEFT tensors -> the adapter's ``state_dict`` entries (same keys)."""
    if "lokr_t2" in tensors:
        raise CheckpointError("lokr_t2 is a convolution's tensor (use_effective_conv2d); qadapt adapts linear layers")
    return dict(tensors)


def layer_to_peft(state: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's ``state_dict`` -> that layer's PEFT tensors."""
    return dict(state)
