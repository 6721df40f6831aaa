"""Extension points for host frameworks: functions run after a model is wrapped or unwrapped.

The core knows no framework; an integration (``qadapt.hf`` for transformers) registers here and
recognises its own models. Hooks run after the operation succeeded, with the model as the user
passed it (a ``torch.compile`` or DDP wrapper included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Unwrapped:
    """What :func:`~qadapt.model.model_merge.unwrap` did: ``merge`` (True, False or ``"float"``), the float
    ``dtype`` of a float unwrap, and ``to`` (the target backend's name, or None)."""

    merge: bool | str
    dtype: Any
    to: str | None


#: ``hook(model) -> undo or None``: the undo runs if the operation the wrap is part of fails later.
AfterWrap = Callable[[nn.Module], Callable[[], None] | None]
AfterUnwrap = Callable[[nn.Module, Unwrapped], None]

_AFTER_WRAP: list[AfterWrap] = []
_AFTER_UNWRAP: list[AfterUnwrap] = []


def register(*, after_wrap: AfterWrap | None = None, after_unwrap: AfterUnwrap | None = None) -> None:
    """Add hooks (each function once, however often it is registered)."""
    if after_wrap is not None and after_wrap not in _AFTER_WRAP:
        _AFTER_WRAP.append(after_wrap)
    if after_unwrap is not None and after_unwrap not in _AFTER_UNWRAP:
        _AFTER_UNWRAP.append(after_unwrap)


def after_wrap(model: nn.Module) -> list[Callable[[], None]]:
    """Run the after-wrap hooks; returns their undos (newest last)."""
    return [undo for hook in _AFTER_WRAP if (undo := hook(model)) is not None]


def after_unwrap(model: nn.Module, what: Unwrapped) -> None:
    for hook in _AFTER_UNWRAP:
        hook(model, what)
