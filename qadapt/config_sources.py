"""One small reader per config file format: YAML, TOML, JSON → a plain dict.

Each reader turns a syntax error into a :class:`qadapt.errors.ConfigError` naming the file (and the
line where the parser says). Optional parsers are imported only when their format is read, with
an install hint when missing. In ``pyproject.toml`` the config lives under ``[tool.qadapt]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qadapt.errors import ConfigError


def _read_yaml(text: str, source: str) -> Any:
    import yaml  # a declared dependency of qadapt

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc


def _read_toml(text: str, source: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"{source}: reading TOML on Python 3.10 needs the 'tomli' package: pip install tomli"
            ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    if source.endswith("pyproject.toml"):
        data = data.get("tool", {}).get("qadapt")
        if data is None:
            raise ConfigError(f"{source}: has no [tool.qadapt] table")
    return data


def _read_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from exc


READERS: dict[str, Callable[[str, str], Any]] = {
    ".yaml": _read_yaml,
    ".yml": _read_yaml,
    ".toml": _read_toml,
    ".json": _read_json,
}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping in a ``.yaml``/``.yml``, ``.toml`` or ``.json`` config file (not yet validated)."""
    path = Path(path)
    source = path.name
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"{source}: unknown config file type {path.suffix or '(no suffix)'!r}; use one of {', '.join(READERS)}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    data = reader(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys to values, got {type(data).__name__}")
    return data
