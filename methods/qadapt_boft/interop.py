"""qadapt's optional interop hooks for ``boft``: the PEFT 0.21.2 ``BOFT`` adapter format.

Found by convention (``<method package>.interop``) by ``qadapt.persist.peft``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

#: ``peft_type`` in PEFT's ``adapter_config.json``.
PEFT_TYPE = "BOFT"
#: Per-layer PEFT state keys (adapter name removed), relative to the layer.
PEFT_LAYER_KEYS = ("boft_R", "boft_s")


def options_from_peft(config: Mapping[str, Any]) -> dict[str, Any]:
    """qadapt ``boft`` options from a PEFT ``BOFTConfig`` dict (PEFT writes 0 for the unset one of
    ``boft_block_size`` / ``boft_block_num``)."""
    options: dict[str, Any] = {}
    for peft_name, name in (("boft_block_size", "block_size"), ("boft_block_num", "block_num")):
        if config.get(peft_name):
            options[name] = config[peft_name]
    for peft_name, name in (("boft_n_butterfly_factor", "n_butterfly_factor"), ("boft_dropout", "dropout")):
        if peft_name in config:
            options[name] = config[peft_name]
    if "init_weights" in config:
        options["init_weights"] = config["init_weights"]
    return options


def options_to_peft(options: Mapping[str, Any], layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """PEFT ``BOFTConfig`` fields from qadapt options (the block size PEFT defaults to when neither is given)."""
    size, num = options.get("block_size"), options.get("block_num")
    if size is None and num is None:
        size = 4
    return {
        "boft_block_size": size or 0,
        "boft_block_num": num or 0,
        "boft_n_butterfly_factor": options.get("n_butterfly_factor", 1),
        "boft_dropout": options.get("dropout", 0.0),
        "init_weights": options.get("init_weights", True),
    }


def layer_from_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's PEFT tensors -> the adapter's ``state_dict`` entries (same keys)."""
    return {key: tensors[key] for key in PEFT_LAYER_KEYS}


def layer_to_peft(state: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's ``state_dict`` -> that layer's PEFT tensors."""
    return {key: state[key] for key in PEFT_LAYER_KEYS}
