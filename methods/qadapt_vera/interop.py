"""qadapt's optional interop hooks for ``vera``: checkpoint state of the shared projections, and the
PEFT 0.21.2 ``VERA`` adapter format.

Found by convention (``<method package>.interop``) by ``qadapt.persist.adapter`` and
``qadapt.persist.peft``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qadapt_vera.projections import VeraProjections

#: ``peft_type`` in PEFT's ``adapter_config.json``.
PEFT_TYPE = "VERA"
#: Per-layer PEFT state keys (adapter name removed), relative to the layer.
PEFT_LAYER_KEYS = ("vera_lambda_b", "vera_lambda_d")

_RENAMED = {"vera_dropout": "dropout"}
_SAME = ("r", "d_initial", "projection_prng_key", "save_projection", "init_weights")
_PROJECTIONS = ("vera_A", "vera_B")


# ------------------------------------------------------------------------------ qadapt checkpoints


def shared_checkpoint_tensors(shared: nn.Module) -> dict[str, torch.Tensor]:
    """The projections to store with a qadapt checkpoint: both with ``save_projection``, else none
    (they are drawn again from ``projection_prng_key`` when the adapter is loaded)."""
    if isinstance(shared, VeraProjections) and shared.save_projection:
        return shared.projection_tensors()
    return {}


def load_shared_checkpoint_tensors(shared: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put saved projections back (nothing to do when none were saved)."""
    if tensors and isinstance(shared, VeraProjections):
        shared.load_projection_tensors(tensors)


# ------------------------------------------------------------------------------------------ PEFT


def options_from_peft(config: Mapping[str, Any]) -> dict[str, Any]:
    """qadapt ``vera`` options from a PEFT ``VeraConfig`` dict."""
    options = {name: config[name] for name in _SAME if name in config}
    options.update({name: config[peft] for peft, name in _RENAMED.items() if peft in config})
    return options


def options_to_peft(options: Mapping[str, Any], layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """PEFT ``VeraConfig`` fields from qadapt options."""
    config = {name: options[name] for name in _SAME if name in options}
    config.update({peft: options[name] for peft, name in _RENAMED.items() if name in options})
    return config


def layer_from_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's PEFT tensors -> the adapter's ``state_dict`` entries (same keys)."""
    return {key: tensors[key] for key in PEFT_LAYER_KEYS}


def layer_to_peft(state: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's ``state_dict`` -> that layer's PEFT tensors (the projections are model-level in PEFT)."""
    return {key: state[key] for key in PEFT_LAYER_KEYS}


def shared_from_peft(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's model-level ``vera_A`` / ``vera_B`` -> the shared projections' checkpoint tensors."""
    return {key: tensors[key] for key in _PROJECTIONS if key in tensors}


def shared_to_peft(options: Mapping[str, Any], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared projections' checkpoint tensors -> PEFT's model-level keys (same names)."""
    return dict(shared)
