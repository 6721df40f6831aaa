"""What to install when a plugin's import fails for a missing module.

A plugin's third-party library is an optional dependency of the distribution that provides the
plugin, declared the standard way: a ``Requires-Dist`` line with an ``extra == "..."`` marker
(``pyproject.toml``: ``[project.optional-dependencies] mylib = ["mylib>=1"]``). When importing the
plugin raises ``ModuleNotFoundError``, the missing top-level module is matched against those
requirements by normalized name, and the hint is the ``pip install`` command for the smallest
extra that provides it (``pip install 'dist[mylib]'``), or for the requirement itself.
Nothing here names a plugin or a library.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def normalize(name: str) -> str:
    """PEP 503 normalized name: lowercase, runs of ``-``, ``_``, ``.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class InstallHint:
    """The module that is missing and the command that installs it."""

    module: str
    command: str


def missing_module(exc: BaseException) -> str | None:
    """The top-level name of the module whose absence caused ``exc`` (searching its causes), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and current.name:
            return current.name.split(".")[0]
        current = current.__cause__ or current.__context__
    return None


def _requirements(distribution: str) -> list[tuple[str, str, str | None]]:
    """``(normalized name, requirement text, extra or None)`` for each ``Requires-Dist`` line."""
    try:
        requires = importlib.metadata.distribution(distribution).requires or []
    except importlib.metadata.PackageNotFoundError:
        return []
    found = []
    for line in requires:
        name = _NAME.match(line)
        if name is None:
            continue
        extra = _EXTRA.search(line)
        found.append((normalize(name.group(1)), line.split(";")[0].strip(), extra.group(1) if extra else None))
    return found


def install_hint(distribution: str, exc: BaseException) -> InstallHint | None:
    """The pip command that provides the module ``exc`` says is missing, or None if it is not a missing module.

    ``distribution`` is the one that provides the plugin whose import raised ``exc``.
    """
    module = missing_module(exc)
    if module is None:
        return None
    wanted = normalize(module)
    requirements = _requirements(distribution)
    extras: dict[str, int] = {}
    for _, _, extra in requirements:
        if extra is not None:
            extras[extra] = extras.get(extra, 0) + 1
    matches = [(text, extra) for name, text, extra in requirements if name == wanted]
    with_extra = sorted((extras[extra], extra) for _, extra in matches if extra is not None)
    if with_extra:
        command = f"pip install '{distribution}[{with_extra[0][1]}]'"
    elif matches:
        command = f"pip install '{matches[0][0]}'"
    else:
        command = f"pip install {module}  (the package that provides the module {module!r}; its name may differ)"
    return InstallHint(module, command)
