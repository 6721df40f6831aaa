"""The qadapt error hierarchy.

Every error is a :class:`QAdaptError` and also subclasses the built-in exception that fits, so
``except ValueError`` keeps working for callers that do not know qadapt.
"""

from __future__ import annotations

import difflib
import reprlib
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Longest text of a user-supplied value put into an error message.
MAX_VALUE_CHARS = 80


def _bounded_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel = 3
    short.maxstring = short.maxother = short.maxlong = MAX_VALUE_CHARS
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = short.maxfrozenset = short.maxdeque = 6
    return short


_REPR = _bounded_repr()


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shorten(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)`` for an error message, bounded: a large or deeply nested value (a YAML alias
    bomb) is never walked whole, and the text is cut to ``limit`` characters with an ellipsis.
    An exception reads ``Type: message``."""
    if isinstance(value, BaseException):
        return clip(f"{type(value).__name__}: {str(value)[: limit + 1]}", limit)
    return clip(_REPR.repr(value), limit)


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
        message = f"unknown {family} plugin {shorten(name)}; installed: {', '.join(self.installed) or '(none)'}"
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


@dataclass(frozen=True)
class ConfigIssue:
    """One validation problem: where (``method.options.block_size``) and what."""

    location: str
    message: str


#: Issues a ConfigValidationError message shows (all are in ``.issues``).
MAX_SHOWN = 20


class ConfigValidationError(ConfigError):
    """A config failed validation; ``issues`` lists every problem, ``source`` the file (or None)."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        where = f"{source}: " if source else ""
        count = f"{len(issues)} error" + ("s" if len(issues) != 1 else "")
        lines = [f"invalid qadapt config ({count}):"]
        lines += [f"  {where}{issue.location or '(top level)'}: {issue.message}" for issue in issues[:MAX_SHOWN]]
        if len(issues) > MAX_SHOWN:
            lines.append(f"  ... and {len(issues) - MAX_SHOWN} more (see .issues)")
        super().__init__("\n".join(lines))


class TargetError(QAdaptError, ValueError):
    """Targeting found no module to wrap, or a module that cannot be wrapped."""


class LayerFitError(TargetError, ConfigError):
    """A method's or backend's options do not fit some target layers (their ``check_layer`` refused them).

    Both a :class:`TargetError` (which layers) and a :class:`ConfigError` (which option), so either
    ``except`` catches it; the message lists every layer with its name and shape.
    """


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


class PairMismatchError(CheckpointError):
    """A checkpoint's config file and tensors file come from two saves (or were edited apart).

    Loads read such a pair once more before raising it (a save running at that moment has usually
    finished by then), so it reaching the caller means two reads disagreed.
    """


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` by spelling, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _internal(module: str) -> bool:
    """Frames of qadapt, its plugin packages and torch's wrappers (``no_grad``), which a warning skips."""
    return module.startswith(("qadapt", "torch.")) or module in ("torch", "contextlib")


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside qadapt: the user's own call, however it was reached
    (``merge`` directly or through ``unwrap``), instead of a hard-coded stack level."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and _internal(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
