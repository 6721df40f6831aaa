"""Whole-model files (a GGUF file): which installed backend opens and writes a file, by its suffix.

A backend declares the suffixes it handles in ``model_file_suffixes`` (with ``capabilities.model_files``);
the core names no format. Used by :func:`qadapt.load_model_file` and by an export whose BASE is a file.
"""

from __future__ import annotations

import os
from pathlib import Path

from qadapt.errors import ConfigError, PluginError
from qadapt.protocols import Backend
from qadapt.registry.loader import backend_class, names


def model_file_suffixes() -> dict[str, str]:
    """``{suffix: backend name}`` for every installed backend that opens model files (broken plugins skipped)."""
    found: dict[str, str] = {}
    for name in names("backends"):
        try:
            cls = backend_class(name)
        except PluginError:
            continue
        if not cls.capabilities.model_files:
            continue
        for suffix in cls.model_file_suffixes:
            if suffix in found:
                raise ConfigError(
                    f"model file suffix {suffix!r} is declared by backends {found[suffix]!r} and {name!r}"
                )
            found[suffix] = name
    return found


def model_file_backend(path: str | os.PathLike[str], label: str = "model file") -> Backend:
    """A default instance of the backend that opens ``path`` (by its suffix), or a ConfigError listing the suffixes."""
    suffix = Path(path).suffix.lower()
    known = model_file_suffixes()
    if suffix not in known:
        offered = ", ".join(f"{s} ({b})" for s, b in sorted(known.items())) or "none installed"
        raise ConfigError(
            f"{label} {str(path)!r}: no installed backend opens {suffix or 'suffix-less'} files ({offered})"
        )
    return backend_class(known[suffix])()


def is_model_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` names a file (not a directory) whose suffix an installed backend declares."""
    p = Path(path)
    return not p.is_dir() and p.suffix.lower() in model_file_suffixes()
