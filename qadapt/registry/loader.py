"""Plugin discovery and loading.

Entry points are read (without importing anything) from the installed distributions; a plugin is
imported only when it is asked for by name, through stevedore, and checked against its protocol
right after import. Every failure is wrapped in a :class:`qadapt.errors.PluginError` that names the
plugin and the distribution that provides it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Literal

from stevedore import DriverManager, ExtensionManager
from stevedore.extension import Extension

from qadapt.errors import (
    ArgumentTypeError,
    ConfigError,
    DuplicatePluginError,
    MissingDependencyError,
    PluginError,
    PluginLoadError,
    UnknownPluginError,
    shorten,
)
from qadapt.protocols import API_VERSION, BASE_CLASSES, REQUIRED_MEMBERS, Backend, Method
from qadapt.registry.install_hints import install_hint

Family = Literal["backends", "methods"]
FAMILIES: tuple[Family, ...] = ("backends", "methods")
GROUP_PREFIX = "qadapt."


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin as listed by :func:`qadapt.plugins`."""

    family: Family
    name: str
    distribution: str
    version: str
    target: str
    #: ``"ok"`` or the load error's message.
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class _EntryPoint:
    name: str
    value: str
    distribution: str
    version: str


_loaded: dict[tuple[Family, str], type] = {}
#: Registered name (or None) per plugin class, found by :func:`registered_name`.
_names: dict[type, str | None] = {}


def refresh() -> None:
    """Forget loaded plugins and cached entry points (after installing a plugin, or changing ``sys.path``)."""
    _loaded.clear()
    _names.clear()
    for family in FAMILIES:
        ExtensionManager.ENTRY_POINT_CACHE.pop(GROUP_PREFIX + family, None)


def _check_family(family: str) -> Family:
    if family not in FAMILIES:
        raise ConfigError(f"family must be one of {', '.join(FAMILIES)}, got {shorten(family)}")
    return family  # type: ignore[return-value]


def _entry_points(family: Family) -> dict[str, list[_EntryPoint]]:
    """Every entry point of the family by name, with its distribution; nothing is imported."""
    found: dict[str, list[_EntryPoint]] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != GROUP_PREFIX + family:
                continue
            entry = _EntryPoint(ep.name, ep.value, dist.metadata["Name"] or "?", dist.version or "?")
            same = found.setdefault(ep.name, [])
            # The same distribution seen twice on sys.path (an editable install plus '.') is one plugin.
            if not any(e.value == entry.value and e.distribution == entry.distribution for e in same):
                same.append(entry)
    return found


def names(family: Family) -> list[str]:
    """Installed plugin names of one family, sorted; nothing is imported."""
    return sorted(_entry_points(_check_family(family)))


def _check_protocol(family: Family, plugin: object, entry: _EntryPoint) -> None:
    where = f"{family[:-1]} plugin {entry.name!r} (distribution {entry.distribution} {entry.version})"
    base = BASE_CLASSES[family]
    if not (inspect.isclass(plugin) and issubclass(plugin, base)):
        missing = [m for m in REQUIRED_MEMBERS[family] if not callable(getattr(plugin, m, None))]
        detail = f"missing {', '.join(missing)}" if missing else f"it is not a subclass of qadapt.{base.__name__}"
        raise PluginLoadError(f"{where} does not implement the {base.__name__} protocol: {detail}")
    declared = getattr(plugin, "api_version", None)
    if declared != API_VERSION:
        raise PluginLoadError(
            f"{where} declares protocol version {declared!r}, but this qadapt implements version {API_VERSION}"
        )
    abstract = sorted(getattr(plugin, "__abstractmethods__", ()))
    if abstract:
        raise PluginLoadError(f"{where} does not implement the {base.__name__} protocol: missing {', '.join(abstract)}")


def _raise_duplicate(family: Family, name: str, entries: list[_EntryPoint]) -> None:
    provided = "; ".join(f"{e.distribution} {e.version} ({e.value})" for e in entries)
    raise DuplicatePluginError(
        f"{family[:-1]} plugin name {name!r} is registered by more than one distribution: {provided}. "
        "Uninstall one of them."
    )


def _refuse_conflict(namespace: str, name: str, extensions: list[Extension]) -> Extension:
    # Duplicates are caught from the distribution metadata before stevedore loads anything; this
    # only fires if sys.path changed in between.
    raise DuplicatePluginError(f"plugin name {name!r} is registered more than once in {namespace}")


def load(family: Family, name: str) -> type:
    """The plugin class registered as ``name``, imported on first use and checked against its protocol.

    Raises:
        UnknownPluginError: nothing installed has that name (the message lists what is installed).
        DuplicatePluginError: two distributions register that name.
        PluginLoadError: the plugin failed to import, or does not satisfy the protocol.
        MissingDependencyError: (a PluginLoadError) its import needs a module that is not
            installed; the message gives the ``pip install`` command.
    """
    family = _check_family(family)
    if not isinstance(name, str):
        raise ArgumentTypeError(f"{family[:-1]} must be a plugin name (str), got {type(name).__name__}")
    key = (family, name)
    if key in _loaded:
        return _loaded[key]
    entries = _entry_points(family)
    if name not in entries:
        raise UnknownPluginError(family[:-1], name, entries)
    if len(entries[name]) > 1:
        _raise_duplicate(family, name, entries[name])
    entry = entries[name][0]
    try:
        manager = DriverManager(
            GROUP_PREFIX + family,
            name,
            on_missing_entrypoints_callback=None,
            conflict_resolver=_refuse_conflict,
        )
        plugin = manager.driver
    except PluginError:
        raise
    except Exception as exc:  # a plugin's import may raise anything; report it, with its origin
        where = f"{family[:-1]} plugin {name!r} (distribution {entry.distribution} {entry.version}, {entry.value})"
        hint = install_hint(entry.distribution, exc)
        if hint is not None:
            raise MissingDependencyError(
                f"{where} failed to load: it needs the module {hint.module!r}, which is not installed. "
                f"Install it with: {hint.command}",
                module=hint.module,
                command=hint.command,
            ) from exc
        raise PluginLoadError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
    _check_protocol(family, plugin, entry)
    plugin.name = name
    _loaded[key] = plugin
    return plugin


def registered_name(plugin: Method | Backend) -> str | None:
    """The entry-point name ``plugin``'s own class is registered under, or None when it is not.

    A subclass of a registered plugin is not registered by inheritance: it computes something
    else, so it has to be registered under a name of its own. Only entry points of the package
    that defines the class are imported to find out.
    """
    family: Family = "methods" if isinstance(plugin, Method) else "backends"
    cls = type(plugin)
    if cls not in _names:
        _names[cls] = _find_name(family, cls)
    return _names[cls]


def _find_name(family: Family, cls: type) -> str | None:
    own = cls.__dict__.get("name")  # set by load(), on the class itself (a subclass does not have it)
    if isinstance(own, str) and own and _is_registered_as(family, own, cls):
        return own
    package = cls.__module__.split(".")[0]
    for name, entries in sorted(_entry_points(family).items()):
        if len(entries) == 1 and entries[0].value.split(":")[0].split(".")[0] == package:
            if _is_registered_as(family, name, cls):
                return name
    return None


def _is_registered_as(family: Family, name: str, cls: type) -> bool:
    try:
        return load(family, name) is cls
    except PluginError:
        return False


def registration_hint(plugin: Method | Backend) -> str:
    """How to register ``plugin``'s class, for error messages."""
    family = "methods" if isinstance(plugin, Method) else "backends"
    cls = type(plugin)
    return (
        f"register {cls.__module__}:{cls.__qualname__} as an entry point of your distribution "
        f'(pyproject.toml: [project.entry-points."{GROUP_PREFIX}{family}"] my_name = "{cls.__module__}:'
        f'{cls.__qualname__}") and reinstall it (pip install -e .)'
    )


def instance(family: Family, plugin: object, options: object = None, *, label: str | None = None) -> Method | Backend:
    """The one way a plugin argument becomes an instance: a registered name is loaded and built with
    ``options``; an instance is taken as it is (``options`` must then be empty).

    ``label`` names the argument in errors (default: ``method`` / ``backend``).

    Raises:
        ArgumentTypeError: ``plugin`` is neither a name nor an instance of the family's base class.
        ConfigError: options given together with an instance.
    """
    family = _check_family(family)
    kind = BASE_CLASSES[family]
    label = label or family[:-1]
    if isinstance(plugin, kind):
        if options:
            raise ConfigError(
                f"{label} options given with a {kind.__name__} instance; put the options in the instance"
            )
        return plugin  # type: ignore[return-value]
    if isinstance(plugin, str):
        return load(family, plugin)(options)
    raise ArgumentTypeError(
        f"{label} must be a plugin name (str) or a {kind.__name__} instance, got {type(plugin).__name__}"
    )


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name``."""
    return load("backends", name)


def method_class(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    return load("methods", name)


def plugins(family: Family | None = None) -> list[PluginInfo]:
    """Every installed plugin with its distribution and load status; a broken one is listed, not raised.

    This imports every plugin (to report its status); use :func:`names` for a listing that imports nothing.
    """
    families = FAMILIES if family is None else (_check_family(family),)
    listing = []
    for fam in families:
        for name, entries in sorted(_entry_points(fam).items()):
            for entry in entries:
                status = "ok"
                try:
                    if len(entries) > 1:
                        _raise_duplicate(fam, name, entries)
                    load(fam, name)
                except PluginError as exc:
                    status = str(exc)
                listing.append(PluginInfo(fam, name, entry.distribution, entry.version, entry.value, status))
    return listing
