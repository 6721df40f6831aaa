"""qadapt's versions of the adapter methods transformers gives every ``PreTrainedModel``.

Installed on a wrapped model by :func:`qadapt.hf.integration.attach`; each takes the model first.
Where a transformers method maps onto a qadapt operation it runs it; where it would need PEFT
(a ``PeftConfig``, the Hub) it refuses and names the qadapt function to use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qadapt.errors import CheckpointError, ConfigError
from qadapt.model import adapters as model_adapters
from qadapt.model.layers import adapter_layers
from qadapt.persist import adapter as persist_adapter
from qadapt.persist.adapter import adapter_tensors, save_adapter
from qadapt.persist.peft import save_peft_adapter
from qadapt.registry.interop import interop_hooks

#: What ``save_pretrained`` writes for ``Trainer(resume_from_checkpoint=...)``: the adapters' tensors under
#: the model's own state-dict names (Trainer loads this file with ``load_state_dict(strict=False)``).
RESUME_FILE = "model.safetensors"
RESUME_NOTE = "qadapt: adapter tensors only, under the model's own names (for Trainer resume); not a whole model"


def resume_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of every wrapped layer, keyed as in ``model.state_dict()``: ``{name: [..]}``."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        for key, tensor in layer.adapters.state_dict().items():
            state[f"{name}.adapters.{key}" if name else f"adapters.{key}"] = tensor.detach().cpu().contiguous().clone()
    return state


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Write the adapter, not the base, as PEFT's ``save_pretrained`` does.

    ``save_directory`` gets the qadapt checkpoint (``qadapt_adapter.safetensors`` +
    ``qadapt_config.json``: :func:`qadapt.load_adapter`, ``qadapt export``), the PEFT files where the
    method maps to PEFT (``adapter_config.json`` + ``adapter_model.safetensors``), and
    :data:`RESUME_FILE` for ``Trainer(resume_from_checkpoint=...)``; the model's generation config
    when it has one. ``state_dict`` and the other keyword arguments of transformers' method are
    accepted and unused (the adapter's tensors are read from the model).
    """
    if not is_main_process:
        return
    directory = Path(save_directory)
    if directory.is_file():
        raise ConfigError(f"save_directory={str(directory)!r} is a file; give a directory")
    directory.mkdir(parents=True, exist_ok=True)
    save_adapter(model, directory)
    names = {layer.active_adapter for _, layer in adapter_layers(model)} - {None}
    method = next((layer.methods[n] for _, layer in adapter_layers(model) for n in names if n in layer.methods), None)
    if method is not None and hasattr(interop_hooks(method), "PEFT_TYPE"):
        save_peft_adapter(model, directory)
    save_file(resume_state(model), str(directory / RESUME_FILE), metadata={"format": "pt", "qadapt": RESUME_NOTE})
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(directory)


def get_adapter_state_dict(model: nn.Module, adapter_name: str | None = None, state_dict: Any = None) -> dict:
    """The adapter's tensors as qadapt saves them (``<layer>.<key>``; the active adapter by default)."""
    if adapter_name is None:
        adapter_name = active_adapters(model)[0]
    return adapter_tensors(model, adapter_name)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters active on the wrapped layers (one, unless layers were set apart)."""
    names = list(dict.fromkeys(layer.active_adapter for _, layer in adapter_layers(model)))
    return [n for n in names if n is not None]


def active_adapter(model: nn.Module) -> str:
    """The first active adapter (transformers' deprecated single-name form)."""
    names = active_adapters(model)
    if not names:
        raise CheckpointError("no adapter is active on this model")
    return names[0]


def add_adapter(model: nn.Module, adapter_config: Any = None, adapter_name: str | None = None, **kwargs: Any) -> None:
    raise ConfigError(
        "this model's adapters are qadapt's: transformers' add_adapter takes a PEFT config; use "
        "qadapt.add_adapter(model, name, method, method_options=...) (see docs/peft.md)"
    )


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """``qadapt.set_adapter`` (one name; qadapt runs one adapter per layer)."""
    if isinstance(adapter_name, (list, tuple)):
        if len(adapter_name) != 1:
            raise ConfigError(f"qadapt runs one adapter at a time per layer; got {list(adapter_name)}")
        adapter_name = adapter_name[0]
    model_adapters.set_adapter(model, adapter_name)


def load_adapter(
    model: nn.Module,
    peft_model_id: str | os.PathLike[str] | None = None,
    adapter_name: str | None = None,
    is_trainable: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """``qadapt.load_adapter`` from a local directory (qadapt or PEFT); Hub ids are refused."""
    if peft_model_id is None or not Path(peft_model_id).is_dir():
        raise CheckpointError(
            f"peft_model_id={peft_model_id!r} is not a local directory; qadapt loads adapters from a directory "
            "(qadapt.load_adapter(model, directory)); nothing is downloaded"
        )
    return persist_adapter.load_adapter(model, peft_model_id, adapter_name=adapter_name, is_trainable=is_trainable)


def delete_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
        model_adapters.delete_adapter(model, name)


def enable_adapters(model: nn.Module) -> None:
    model_adapters.enable_adapters(model)


def disable_adapters(model: nn.Module) -> model_adapters.AdaptersDisabled:
    return model_adapters.disable_adapters(model)
