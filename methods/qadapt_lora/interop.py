"""qadapt's optional interop hooks for ``lora`` and ``dora``: the PEFT 0.21.2 ``LORA`` adapter format.

Found by convention (``<method package>.interop``) by ``qadapt.persist.peft``. Both methods share
PEFT's ``peft_type`` ``"LORA"``; :func:`accepts_peft` sends ``use_dora=True`` configs to ``dora``
and the others to ``lora``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qadapt.errors import CheckpointError
from qadapt_lora.method import DoraMethod
from qadapt_lora.qalora import QALoraMethod

#: ``peft_type`` in PEFT's ``adapter_config.json``.
PEFT_TYPE = "LORA"
#: Per-layer PEFT state keys (adapter name removed), relative to the layer.
PEFT_LAYER_KEYS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

_RENAMED = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init_weights"}
_SAME = ("r", "use_rslora", "rank_pattern", "alpha_pattern")
#: PEFT config fields whose non-empty values change the math in ways qadapt does not reproduce.
_UNSUPPORTED = (
    "lora_bias",
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
    "trainable_token_indices",
    "target_parameters",
    "use_bdlora",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)
_INITS = (True, False, "gaussian")


def accepts_peft(method: type, config: Mapping[str, Any]) -> bool:
    """``qalora`` reads ``use_qalora=True`` LoRA configs, ``dora`` ``use_dora=True`` ones, ``lora`` the others."""
    qalora = bool(config.get("use_qalora", False))
    if qalora != issubclass(method, QALoraMethod):
        return False
    return qalora or bool(config.get("use_dora", False)) == issubclass(method, DoraMethod)


def options_from_peft(config: Mapping[str, Any]) -> dict[str, Any]:
    """qadapt options from a PEFT ``LoraConfig`` dict."""
    problems = [f"{name}={config[name]!r}" for name in _UNSUPPORTED if config.get(name)]
    if config.get("init_lora_weights", True) not in _INITS:
        problems.append(
            f"init_lora_weights={config['init_lora_weights']!r} (only True, False or 'gaussian': the others "
            "change the base weight or need data)"
        )
    if config.get("use_qalora") and config.get("use_dora"):
        problems.append("use_qalora=True with use_dora=True (PEFT does not combine them either)")
    if problems:
        raise CheckpointError("unsupported PEFT LoRA settings: " + "; ".join(problems))
    options = {name: config[name] for name in _SAME if name in config and config[name] is not None}
    options.update({name: config[peft] for peft, name in _RENAMED.items() if peft in config})
    if config.get("use_qalora"):
        options["group_size"] = config.get("qalora_group_size", 16)
    return options


def options_to_peft(options: Mapping[str, Any], layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields from qadapt options (``use_dora`` when the layers hold magnitudes)."""
    config = {name: options[name] for name in _SAME if name in options}
    config.update({peft: options[name] for peft, name in _RENAMED.items() if name in options})
    config["use_dora"] = any("magnitude" in state for state in layers.values())
    config["use_qalora"] = "group_size" in options
    if "group_size" in options:
        config["qalora_group_size"] = options["group_size"]
    config.setdefault("rank_pattern", {})
    config.setdefault("alpha_pattern", {})
    config["lora_bias"] = False
    return config


def layer_from_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's PEFT tensors -> the adapter's ``state_dict`` entries."""
    state = {"lora_A.weight": tensors["lora_A.weight"], "lora_B.weight": tensors["lora_B.weight"]}
    if "lora_magnitude_vector" in tensors:
        state["magnitude"] = tensors["lora_magnitude_vector"]
    return state


def layer_to_peft(state: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's ``state_dict`` -> that layer's PEFT tensors."""
    tensors = {"lora_A.weight": state["lora_A.weight"], "lora_B.weight": state["lora_B.weight"]}
    if "magnitude" in state:
        tensors["lora_magnitude_vector"] = state["magnitude"]
    return tensors
