"""One small reader per config file format: YAML, TOML, JSON → a plain dict.

Every way a file can be unreadable ends in a :class:`qadapt.errors.ConfigError` naming the file and
a location (line and column, or the key path): syntax errors, text that is not UTF-8, and inputs
built to exhaust the reader. A config is small, so a reader accepts at most
:data:`MAX_CONFIG_FILE_BYTES` bytes, :data:`MAX_DEPTH` levels of nesting, and (YAML) :data:`MAX_ALIASES`
aliases expanding to at most :data:`MAX_NODES` values, which stops alias bombs before they expand.
Optional parsers are imported only when their format is read, with an install hint when missing.
In ``pyproject.toml`` the config lives under ``[tool.qadapt]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qadapt.errors import ConfigError, clip

#: Largest config file read (bytes).
MAX_CONFIG_FILE_BYTES = 1 << 20
#: Deepest nesting of mappings and lists.
MAX_DEPTH = 32
#: Most YAML aliases (``*name``) in one file.
MAX_ALIASES = 64
#: Most values a YAML document may hold once its aliases are expanded.
MAX_NODES = 100_000


def _line_col(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    return f"line {line}, column {offset - (text.rfind(chr(10), 0, offset) + 1) + 1}"


def _deepest_bracket(text: str) -> str:
    """Where bracket nesting first passes :data:`MAX_DEPTH` (strings skipped), for an error message."""
    depth, quote, i = 0, "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return _line_col(text, i)
        elif ch in "]}":
            depth -= 1
        i += 1
    return "somewhere"


def _too_deep(source: str, where: str) -> ConfigError:
    return ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep at {where}; a qadapt config is flat")


def _yaml_loader(source: str) -> type:
    import yaml  # a declared dependency of qadapt

    class BoundedLoader(yaml.SafeLoader):
        """PyYAML's safe loader with caps on nesting, aliases and expanded size."""

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.depth = 0
            self.aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    raise ConfigError(
                        f"{source}: more than {MAX_ALIASES} YAML aliases (line {event.start_mark.line + 1}); "
                        "a qadapt config needs few, if any"
                    )
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    mark = event.start_mark
                    raise _too_deep(source, f"line {mark.line + 1}, column {mark.column + 1}")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return BoundedLoader


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """How many values a composed YAML node stands for once aliases are expanded (shared nodes counted
    once per use, computed once each)."""
    import yaml

    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_NODES + 1  # a cycle (a recursive alias) expands without end
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_NODES + 1)
    return memo[id(node)]


def _read_yaml(text: str, source: str) -> Any:
    import yaml

    loader = _yaml_loader(source)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_NODES:
            raise ConfigError(
                f"{source}: its aliases expand to more than {MAX_NODES} values, or refer to themselves "
                f"(line {node.start_mark.line + 1}); this is not a qadapt config"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {clip(str(exc), 400)}") from exc
    except RecursionError as exc:
        raise _too_deep(source, _deepest_bracket(text)) from exc
    finally:
        loader.dispose()


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
        raise ConfigError(f"{source}: not valid TOML: {clip(str(exc), 400)}") from exc
    except RecursionError as exc:
        raise _too_deep(source, _deepest_bracket(text)) from exc
    if source.endswith("pyproject.toml"):
        tool = data.get("tool")
        data = tool.get("qadapt") if isinstance(tool, dict) else None
        if data is None:
            raise ConfigError(f"{source}: has no [tool.qadapt] table")
    return data


def _read_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise _too_deep(source, _deepest_bracket(text)) from exc


READERS: dict[str, Callable[[str, str], Any]] = {
    ".yaml": _read_yaml,
    ".yml": _read_yaml,
    ".toml": _read_toml,
    ".json": _read_json,
}


def _check_depth(data: Any, source: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` (TOML dotted keys nest without brackets)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep(source, f"key {clip(path, 120) or '(top level)'}")
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data[: exc.start].decode("utf-8")
        raise ConfigError(
            f"{source}: not UTF-8 text at byte {exc.start} ({_line_col(text, len(text))}): {exc.reason}; "
            "save the file as UTF-8"
        ) from exc


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping in a ``.yaml``/``.yml``, ``.toml`` or ``.json`` config file (not yet validated)."""
    path = Path(path)
    source = path.name
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"{source}: unknown config file type {clip(path.suffix) or '(no suffix)'!r}; "
            f"use one of {', '.join(READERS)}"
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read: {exc}") from exc
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_FILE_BYTES} bytes; a qadapt config is a few lines")
    data = reader(_decode(data, source), source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys to values, got {type(data).__name__}")
    _check_depth(data, source)
    return data
