"""Optional interop hooks of a method plugin, found by convention, never by name.

A method plugin may ship a module ``interop`` next to its class, in the same top-level package
(``my_method_pkg.interop``). qadapt imports it only when a feature needs it, and uses whichever of
these it defines:

Checkpoints of shared state (:meth:`Method.create_shared`), used by :mod:`qadapt.persist.adapter`:

* ``shared_checkpoint_tensors(shared) -> dict[str, Tensor]``: what to save (empty: nothing, the
  method regenerates it from its options). Without the hook, ``shared.state_dict()`` is saved.
* ``load_shared_checkpoint_tensors(shared, tensors) -> None``: put saved tensors back. Without the
  hook, ``shared.load_state_dict(tensors)``.

The PEFT adapter format, used by :mod:`qadapt.persist.peft` (all required for PEFT support):

* ``PEFT_TYPE: str``: PEFT's ``peft_type`` (``"OFT"``).
* ``PEFT_LAYER_KEYS: tuple[str, ...]``: per-layer PEFT state keys, adapter name removed.
* ``options_from_peft(config) -> dict`` / ``options_to_peft(options, layers) -> dict``: config fields.
* ``layer_from_peft(tensors) -> dict`` / ``layer_to_peft(state, shared) -> dict``: one layer's
  tensors (PEFT keys relative to the layer <-> the adapter's ``state_dict`` keys).
* ``shared_from_peft(config, tensors) -> dict`` / ``shared_to_peft(options, shared) -> dict``:
  model-level tensors (PEFT keys under ``base_model.``) <-> shared checkpoint tensors.
* optional ``accepts_peft(method_class, config) -> bool``: for a ``PEFT_TYPE`` that several
  methods of one package share (``LORA`` with and without ``use_dora``), whether
  ``method_class`` reads this config. Without it, every config of the type is accepted.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qadapt.errors import PluginLoadError
from qadapt.protocols import Method

HOOK_MODULE = "interop"


def interop_hooks(method: Method | type[Method]) -> ModuleType | None:
    """The method plugin's ``interop`` module, or None when it has none."""
    cls = method if isinstance(method, type) else type(method)
    package = cls.__module__.split(".")[0]
    module_name = f"{package}.{HOOK_MODULE}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in (module_name, package):
            return None
        raise PluginLoadError(f"{module_name} (interop hooks of method {cls.name!r}) failed to import: {exc}") from exc
