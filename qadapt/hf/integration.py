"""How a wrapped transformers model tells transformers that it carries adapters, and what it hands over.

Why this mechanism (see docs/architecture.md): transformers asks one question everywhere it
cares whether a model carries adapters: the instance flag ``_hf_peft_config_loaded`` (Trainer's
"purely quantized model" check, gradient checkpointing's input grads, ``save_pretrained``'s adapter
branch). qadapt sets that flag on the wrapped model, so every one of those checks sees what is
true, and replaces on the instance the few methods behind which transformers would call PEFT
(``save_pretrained``, ``get_adapter_state_dict``, ``active_adapters`` and the adapter verbs) with
qadapt's. Nothing is patched in transformers, the model keeps its class (``isinstance``, pickling,
``from_pretrained`` of its class all stay as they were), and :func:`detach` takes it all back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from qadapt.model.integrations import Unwrapped
from qadapt.model.layers import innermost

#: The transformers flag meaning "adapters are attached to this model".
ADAPTERS_FLAG = "_hf_peft_config_loaded"
#: Marker in the model's ``__dict__``: the names qadapt put there.
MARKER = "_qadapt_hf_hooks"
#: The instance methods qadapt provides on a wrapped transformers model (see :mod:`qadapt.hf.hooks`).
HOOKED = (
    "save_pretrained",
    "get_adapter_state_dict",
    "active_adapters",
    "active_adapter",
    "add_adapter",
    "set_adapter",
    "load_adapter",
    "delete_adapter",
    "enable_adapters",
    "disable_adapters",
)


def is_transformers_model(model: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


class BoundHook:
    """``model.<name>(...)`` routed to :mod:`qadapt.hf.hooks`; pickles and deep-copies with its model."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from qadapt.hf import hooks

        return getattr(hooks, self.name)(self.model, *args, **kwargs)

    def __reduce__(self) -> tuple[type, tuple[nn.Module, str]]:
        return BoundHook, (self.model, self.name)

    def __repr__(self) -> str:
        return f"<qadapt's {self.name} of {type(self.model).__name__}>"


def attach(model: nn.Module) -> Callable[[], None] | None:
    """Mark a wrapped transformers model as carrying adapters and give it qadapt's adapter methods.

    Returns the undo (None when ``model`` is no transformers model, or already attached).
    """
    target = innermost(model)
    if not is_transformers_model(target) or MARKER in target.__dict__:
        return None
    before = target.__dict__.get(ADAPTERS_FLAG, _MISSING)
    target.__dict__[ADAPTERS_FLAG] = True
    for name in HOOKED:
        target.__dict__[name] = BoundHook(target, name)
    target.__dict__[MARKER] = HOOKED

    def undo() -> None:
        _remove(target, before)

    return undo


_MISSING = object()


def _remove(target: nn.Module, flag_before: object = _MISSING) -> None:
    for name in target.__dict__.pop(MARKER, ()):
        target.__dict__.pop(name, None)
    if flag_before is _MISSING:
        target.__dict__.pop(ADAPTERS_FLAG, None)
    else:
        target.__dict__[ADAPTERS_FLAG] = flag_before


def detach(model: nn.Module, what: Unwrapped) -> None:
    """After ``unwrap``: the model carries no adapters any more; a float unwrap of a model transformers
    loaded quantized becomes a plain float model (see :func:`qadapt.hf.float_model.make_float`)."""
    target = innermost(model)
    if MARKER not in target.__dict__ and not is_transformers_model(target):
        return
    _remove(target)
    if what.merge == "float":
        from qadapt.hf.float_model import make_float

        make_float(target, what.dtype)
