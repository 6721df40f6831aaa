"""Plugins: the entry-point registry (stevedore, lazy, checked at load; ``loader``), install hints, the
method ``interop`` module lookup, and the float reference backend ``none`` (``reference``).
Imports errors and protocols only.

``qadapt.registry`` itself is the registry's face: ``registry.load("methods", "oft")``,
``registry.names("backends")``, ``registry.instance(...)``.
"""

from qadapt.registry.loader import (
    FAMILIES,
    GROUP_PREFIX,
    Family,
    PluginInfo,
    backend_class,
    instance,
    load,
    method_class,
    names,
    plugins,
    refresh,
    registered_name,
    registration_hint,
)

__all__ = [
    "FAMILIES",
    "GROUP_PREFIX",
    "Family",
    "PluginInfo",
    "backend_class",
    "instance",
    "load",
    "method_class",
    "names",
    "plugins",
    "refresh",
    "registered_name",
    "registration_hint",
]
