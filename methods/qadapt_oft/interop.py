"""qadapt's optional interop hooks for ``oft``: the PEFT 0.21.2 adapter format.

Found by convention (``<method package>.interop``) by ``qadapt.persist.peft``; nothing here is
imported by ``import qadapt_oft``. Tensors are the same in both formats (see the package
docstring): qadapt's ``weight [n_blocks or 1, b(b-1)/2]`` is PEFT's ``oft_R.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qadapt.errors import CheckpointError

#: ``peft_type`` in PEFT's ``adapter_config.json``.
PEFT_TYPE = "OFT"
#: Per-layer PEFT state keys (adapter name removed), relative to the layer.
PEFT_LAYER_KEYS = ("oft_R.weight",)

#: PEFT config field -> qadapt option, for the fields whose names differ.
_RENAMED = {"oft_block_size": "block_size"}
_SAME = (
    "r",
    "block_share",
    "coft",
    "eps",
    "module_dropout",
    "use_cayley_neumann",
    "num_cayley_neumann_terms",
    "init_weights",
)


def options_from_peft(config: Mapping[str, Any]) -> dict[str, Any]:
    """qadapt ``oft`` options from a PEFT ``OFTConfig`` dict (exactly one of r / oft_block_size non-zero)."""
    options = {name: config[name] for name in _SAME if name in config}
    for peft_name, name in _RENAMED.items():
        if peft_name in config:
            options[name] = config[peft_name]
    for name in ("r", "block_size"):
        if not options.get(name):
            options.pop(name, None)
    # PEFT moves a block size that does not divide a layer to the nearest one that does.
    options["adjust_block_size"] = True
    return options


def options_to_peft(options: Mapping[str, Any], layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """PEFT ``OFTConfig`` fields from qadapt options (PEFT wants one of ``r`` / ``oft_block_size``, the other 0).

    ``layers``: every layer's qadapt tensors; the block size actually used is read from them, so
    an option adjusted per layer (``adjust_block_size``) is written as PEFT will rebuild it.
    """
    config = {name: options[name] for name in _SAME if name in options}
    if options.get("r") is not None:
        config.update(r=options["r"], oft_block_size=0)
    else:
        sizes = {_block_size(state["weight"].shape[1]) for state in layers.values()}
        if len(sizes) != 1:
            raise CheckpointError(f"PEFT's OFT needs one block size for every layer; these layers use {sorted(sizes)}")
        config.update(r=0, oft_block_size=sizes.pop())
    return config


def _block_size(n_elements: int) -> int:
    # n_elements = b (b - 1) / 2
    return round((1 + (1 + 8 * n_elements) ** 0.5) / 2)


def layer_from_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's PEFT tensors -> the adapter's ``state_dict`` entries."""
    return {"weight": tensors["oft_R.weight"]}


def layer_to_peft(state: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's ``state_dict`` -> that layer's PEFT tensors."""
    return {"oft_R.weight": state["weight"]}


def shared_from_peft(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OFT has no model-level state."""
    return {}


def shared_to_peft(options: Mapping[str, Any], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OFT has no model-level state."""
    return {}
