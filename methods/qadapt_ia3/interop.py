"""qadapt's optional interop hooks for ``ia3``: the PEFT 0.21.2 ``IA3`` adapter format.

Found by convention (``<method package>.interop``) by ``qadapt.persist.peft``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qadapt.errors import CheckpointError
from qadapt_ia3.options import IA3Options

#: ``peft_type`` in PEFT's ``adapter_config.json``.
PEFT_TYPE = "IA3"
#: Per-layer PEFT state keys (adapter name removed), relative to the layer.
PEFT_LAYER_KEYS = ("ia3_l",)


def options_from_peft(config: Mapping[str, Any]) -> dict[str, Any]:
    """qadapt ``ia3`` options from a PEFT ``IA3Config`` dict."""
    options: dict[str, Any] = {}
    feedforward = config.get("feedforward_modules")
    if feedforward is not None:
        if not isinstance(feedforward, (str, list)):
            raise CheckpointError(f"feedforward_modules must be a string or a list, got {type(feedforward).__name__}")
        options["feedforward_modules"] = feedforward if isinstance(feedforward, str) else sorted(feedforward)
    if "init_ia3_weights" in config:
        options["init_weights"] = config["init_ia3_weights"]
    return options


def options_to_peft(options: Mapping[str, Any], layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """PEFT ``IA3Config`` fields from qadapt options.

    A list of name suffixes is written as the full names of the layers it matches: PEFT requires a
    list of feed-forward modules to be a subset of ``target_modules`` (which it writes as full
    names), and suffix matching gives every layer the same answer for either list. A regex is kept.
    """
    feedforward = options.get("feedforward_modules")
    if isinstance(feedforward, list):
        matcher = IA3Options(feedforward_modules=feedforward)
        feedforward = sorted(name for name in layers if matcher.is_feedforward(name))
    return {
        "feedforward_modules": [] if feedforward is None else feedforward,
        "init_ia3_weights": options.get("init_weights", True),
    }


def layer_from_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's PEFT tensors -> the adapter's ``state_dict`` entries (same key)."""
    return {"ia3_l": tensors["ia3_l"]}


def layer_to_peft(state: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's ``state_dict`` -> that layer's PEFT tensors."""
    return {"ia3_l": state["ia3_l"]}
