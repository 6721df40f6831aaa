"""One rollback for every whole-model operation: what was changed is put back, newest first, on failure.

Every operation that changes more than one layer (wrap, add/load adapters, merge, unmerge,
unwrap) runs inside :func:`transaction`, so "on failure the model is as it was" holds by
construction rather than by a hand-written undo per operation::

    with transaction(model) as tx:
        tx.keep_layers(layer for _, layer in layers)   # storage, merge state, adapters, flags
        ...                                             # change them
        tx.replace(name, new_module)                    # module swaps are undone too

Nothing here copies a weight: backends swap storage rather than write into it, so holding the
storage objects a layer had is enough to give them back bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from qadapt.model.layer import QuantAdapterLinear
from qadapt.model.layers import shared_state


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


class Transaction:
    """Changes to ``model`` that can all be undone together.

    Made by :func:`transaction`, which records every parameter's ``requires_grad`` flag and the
    model's shared method state at the start; layers and module swaps are recorded as they come.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._undo: list[Callable[[], None]] = []
        grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        shared_before = dict(shared_state(model))

        def restore_flags_and_shared() -> None:
            for param, flag in grad_flags:
                param.requires_grad_(flag)
            shared = shared_state(model)
            shared.clear()
            shared.update(shared_before)

        self._undo.append(restore_flags_and_shared)

    def on_undo(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` (before everything recorded earlier) if the transaction fails."""
        self._undo.append(undo)

    def keep_layers(self, layers: Iterable[QuantAdapterLinear]) -> None:
        """Record each layer's storage, merge state, adapters, active adapter and flags as they are now."""
        for layer in layers:
            state = layer.capture_state()
            self._undo.append(lambda layer=layer, state=state: layer.restore_state(state))

    def replace(self, name: str, new: nn.Module) -> None:
        """Put ``new`` at module path ``name`` (undone by putting the old module back)."""
        parent, attr = _parent(self.model, name)
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self._undo.append(lambda: setattr(parent, attr, old))

    def undo(self) -> None:
        """Undo everything recorded, newest first; every step runs even if one raises (the first error is raised)."""
        steps, self._undo = self._undo, []
        failure: BaseException | None = None
        for step in reversed(steps):
            try:
                step()
            except BaseException as exc:  # keep undoing: a half-undone model is the worst outcome
                failure = failure or exc
        if failure is not None:
            raise failure


@contextmanager
def transaction(model: nn.Module, into: Transaction | None = None) -> Iterator[Transaction]:
    """A :class:`Transaction` on ``model``, undone if the block raises.

    With ``into`` (an enclosing transaction), changes are recorded there and the caller undoes.
    """
    if into is not None:
        yield into
        return
    tx = Transaction(model)
    try:
        yield tx
    except BaseException:
        tx.undo()
        raise
