"""qadapt's optional interop hooks for ``randlora``: checkpoint state of the shared bases, and the
PEFT 0.21.2 adapter format.

Found by convention (``<method package>.interop``) by ``qadapt.persist.adapter`` and
``qadapt.persist.peft``; nothing here is imported by ``import qadapt_randlora``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qadapt_randlora.bases import RandLoraBases

#: ``peft_type`` in PEFT's ``adapter_config.json``.
PEFT_TYPE = "RANDLORA"
#: Per-layer PEFT state keys (adapter name removed), relative to the layer.
PEFT_LAYER_KEYS = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")

_RENAMED = {"randlora_alpha": "alpha", "randlora_dropout": "dropout"}
_SAME = ("r", "sparse", "very_sparse", "projection_prng_key", "save_projection", "init_weights")


# ------------------------------------------------------------------------------ qadapt checkpoints


def shared_checkpoint_tensors(shared: nn.Module) -> dict[str, torch.Tensor]:
    """The bases to store with a qadapt checkpoint: all of them with ``save_projection``, else none
    (they are drawn again from ``projection_prng_key`` when the adapter is loaded)."""
    if isinstance(shared, RandLoraBases) and shared.save_projection:
        return shared.projection_tensors()
    return {}


def load_shared_checkpoint_tensors(shared: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put saved bases back (nothing to do when none were saved)."""
    if tensors and isinstance(shared, RandLoraBases):
        shared.load_projection_tensors(dict(tensors))


# ------------------------------------------------------------------------------------------ PEFT


def options_from_peft(config: Mapping[str, Any]) -> dict[str, Any]:
    """qadapt ``randlora`` options from a PEFT ``RandLoraConfig`` dict."""
    options = {name: config[name] for name in _SAME if name in config}
    for peft_name, name in _RENAMED.items():
        if peft_name in config:
            options[name] = config[peft_name]
    if options.get("very_sparse"):
        options["sparse"] = False  # PEFT lets very_sparse win; qadapt wants one of them
    return options


def options_to_peft(options: Mapping[str, Any], layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """PEFT ``RandLoraConfig`` fields from qadapt options."""
    config = {name: options[name] for name in _SAME if name in options}
    config.update({peft: options[name] for peft, name in _RENAMED.items() if name in options})
    return config


def layer_from_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's PEFT tensors -> the adapter's ``state_dict`` entries (per-layer basis copies are dropped)."""
    return {"lambda_": tensors["randlora_lambda"], "gamma": tensors["randlora_gamma"]}


def layer_to_peft(state: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's ``state_dict`` -> that layer's PEFT tensors (PEFT repeats saved bases in every layer)."""
    out = {"randlora_lambda": state["lambda_"], "randlora_gamma": state["gamma"]}
    out.update(shared)
    return out


def shared_from_peft(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's model-level ``randlora_A`` / ``randlora_B`` -> the shared bases' checkpoint tensors."""
    return {key: tensors[key] for key in ("randlora_A", "randlora_B") if key in tensors}


def shared_to_peft(options: Mapping[str, Any], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared bases' checkpoint tensors -> PEFT's model-level keys (same names)."""
    return dict(shared)
