"""The qadapt error hierarchy.

Every error is a :class:`QAdaptError` and also subclasses the built-in exception that fits, so
``except ValueError`` keeps working for callers that do not know qadapt.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class QAdaptError(Exception):
    """Base class of every error raised by qadapt."""


class PluginError(QAdaptError, ImportError):
    """A plugin could not be found, imported or checked against its protocol."""


class UnknownPluginError(PluginError, LookupError):
    """No installed plugin has the requested name."""

    def __init__(self, family: str, name: str, installed: Iterable[str]) -> None:
        self.family = family
        self.name = name
        self.installed = sorted(installed)
        message = f"unknown {family} plugin {name!r}; installed: {', '.join(self.installed) or '(none)'}"
        close = closest(name, self.installed)
        if close:
            message += f". Did you mean {close!r}?"
        super().__init__(message)


class PluginLoadError(PluginError):
    """A plugin exists but failed to import or does not satisfy its protocol."""


class MissingDependencyError(PluginLoadError, ModuleNotFoundError):
    """A plugin's import needs a module that is not installed; ``command`` installs it.

    ``module`` is the missing top-level module, ``command`` the ``pip install`` line (the plugin
    distribution's extra that provides it, when it declares one).
    """

    def __init__(self, message: str, *, module: str, command: str) -> None:
        super().__init__(message, name=module)
        self.module = module
        self.command = command


class DuplicatePluginError(PluginError):
    """Two distributions register the same plugin name in one family."""


class ConfigError(QAdaptError, ValueError):
    """Options or a config file failed validation."""


class TargetError(QAdaptError, ValueError):
    """Targeting found no module to wrap, or a module that cannot be wrapped."""


class AdapterStateError(QAdaptError, RuntimeError):
    """An operation does not fit the layer's state (merge twice, unmerge when not merged, ...)."""


class ArgumentTypeError(QAdaptError, TypeError):
    """An argument has the wrong type; the message names it, its type, and what is accepted."""


class InputError(QAdaptError, ValueError):
    """A tensor given to a layer does not fit it (feature size, dtype, device)."""


class UnsafeMergeError(QAdaptError, ValueError):
    """A safe merge found non-finite values; nothing was written."""


class CapabilityError(QAdaptError, NotImplementedError):
    """A backend was asked for something it declares it cannot do."""


class CheckpointError(QAdaptError, ValueError):
    """An adapter checkpoint is missing, corrupt, or does not fit the model."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` by spelling, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None
