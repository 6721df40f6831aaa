"""``QAdaptConfig``: what to wrap, with which method and backend, as data.

A config comes from keyword arguments, a dict, or a YAML/TOML/JSON file. Validation runs in two
steps: the config's own structure, then each plugin's options against that plugin's options model
(the plugin is resolved by name first). Every problem is collected and reported at once, each with
its location (``method.options.block_size``) and the file it came from.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from qadapt import registry
from qadapt.config.sources import read_config_file
from qadapt.errors import ConfigError, ConfigIssue, ConfigValidationError, PluginError, closest, shorten
from qadapt.protocols import PluginOptions

#: The config format version this qadapt reads and writes.
CONFIG_VERSION = 1
#: Backend name that picks, per layer, the installed backend that owns the layer.
AUTO_BACKEND = "auto"
#: The default target: every linear layer but the output head.
ALL_LINEAR = "all-linear"
#: A target pattern starting with this is a regular expression over module names.
REGEX_PREFIX = "re:"


class PluginSpec(BaseModel):
    """A plugin by name with its options. In a file, a bare name stands for ``{name: ..., options: {}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Installed plugin name (see `qadapt plugins`).")
    options: dict[str, Any] = Field(default_factory=dict, description="The plugin's own options.")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class QAdaptConfig(BaseModel):
    """A complete wrap: method, backend, targets. Frozen; build a new one to change it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = Field(CONFIG_VERSION, description="Config format version.")
    method: PluginSpec = Field(description="The adapter method and its options.")
    backend: PluginSpec = Field(
        default_factory=lambda: PluginSpec(name=AUTO_BACKEND),
        description="The quantization backend and its options; 'auto' adopts each layer by the backend that owns it.",
    )
    targets: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Module names, name suffixes, 're:<regex>' patterns, or 'all-linear'.",
    )
    exclude: list[str] = Field(default_factory=list, description="Patterns of modules to leave out.")
    adapter_name: str = Field("default", description="Name of the adapter created on every target.")
    merge_aware: bool = Field(
        False,
        description=(
            "Train through the quantizer: each layer computes with the storage its merge will write "
            "(straight-through gradient), so the merged model computes what was trained. Needs backends "
            "that can requantize."
        ),
    )

    @field_validator("targets", "exclude", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("adapter_name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return check_adapter_name(value, ValueError)


#: An adapter name becomes a key of an ``nn.ModuleDict``; a module instance shows which names its
#: class *and* ``nn.Module.__init__`` (``training``, ``_parameters``, hooks, ...) already take.
_MODULE_DICT = nn.ModuleDict()


def check_adapter_name(name: Any, error: type[Exception] = ConfigError) -> str:
    """``name`` if it can name an adapter: a Python identifier that is no attribute of an ``nn.ModuleDict``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise error(f"adapter name must be a Python identifier (letters, digits, underscores), got {shorten(name)}")
    if hasattr(_MODULE_DICT, name):
        raise error(
            f"adapter name {name!r} is taken by a torch.nn.Module attribute (adapters are held in an "
            "nn.ModuleDict, whose attributes they cannot shadow); choose another name"
        )
    return name


# ------------------------------------------------------------------------------------ validation


def _fields_at(model: type[BaseModel] | None, path: tuple[Any, ...]) -> list[str] | None:
    """Field names of the (nested) model at ``path``, or None when the path leaves known models."""
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return None if model is None else list(model.model_fields)


def _issues_from(exc: ValidationError, prefix: tuple[Any, ...], root: type[BaseModel]) -> list[ConfigIssue]:
    issues = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        location = shorten(".".join(str(part) for part in prefix + loc), 160).strip("'")
        if error["type"] == "extra_forbidden":
            key = str(loc[-1])
            valid = _fields_at(root, loc[:-1]) or []
            message = f"unknown key {shorten(key)}"
            suggestion = closest(key, valid)
            if suggestion:
                message += f"; did you mean {suggestion!r}?"
            if valid:
                message += f" (valid keys: {', '.join(valid)})"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = f"{error['msg']} (got {shorten(error['input'])})"
        issues.append(ConfigIssue(location, message))
    return issues


def _check_plugin(family: str, spec: PluginSpec, prefix: str) -> tuple[list[ConfigIssue], dict[str, Any] | None]:
    """Step two for one plugin: resolve the name, then validate the options with the plugin's own model."""
    if family == "backends" and spec.name == AUTO_BACKEND:
        if spec.options:
            return [
                ConfigIssue(
                    f"{prefix}.options",
                    f"backend {AUTO_BACKEND!r} takes no options; name the backend to pass options to it",
                )
            ], None
        return [], {}
    try:
        cls = registry.load(family, spec.name)  # type: ignore[arg-type]
    except PluginError as exc:
        return [ConfigIssue(f"{prefix}.name", str(exc))], None
    options_model: type[PluginOptions] = cls.Options
    try:
        options = options_model.model_validate(spec.options)
    except ValidationError as exc:
        return _issues_from(exc, (prefix, "options"), options_model), None
    return [], options.model_dump(mode="json")


def validate_plugin_options(family: str, name: str, options: Mapping[str, Any] | None, location: str) -> dict[str, Any]:
    """One plugin's complete options after validation by its own model (``location`` prefixes errors).

    Raises:
        ConfigValidationError: unknown plugin, or options its model rejects.
    """
    issues, resolved = _check_plugin(family, PluginSpec(name=name, options=dict(options or {})), location)
    if issues or resolved is None:
        raise ConfigValidationError(issues)
    return resolved


def validate_config(
    data: Mapping[str, Any] | QAdaptConfig, source: str | None = None, prevalidated: Collection[str] = ()
) -> QAdaptConfig:
    """Validate a config in both steps and return it with each plugin's options filled in completely.

    ``prevalidated`` names sections (``"method"``, ``"backend"``) that describe plugin instances
    whose options are validated already: only their structure is checked.

    Raises:
        ConfigValidationError: with every problem found, each with its location.
    """
    raw: Any = data.model_dump() if isinstance(data, QAdaptConfig) else data
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a qadapt config must be a mapping, got {type(raw).__name__}")
    issues: list[ConfigIssue] = []
    config: QAdaptConfig | None = None
    try:
        config = QAdaptConfig.model_validate(dict(raw))
    except ValidationError as exc:
        issues += [
            issue
            for issue in _issues_from(exc, (), QAdaptConfig)
            # Plugin sections are re-checked below, one by one, so their errors are not lost.
            if issue.location.split(".")[0] not in ("method", "backend")
        ]
    resolved: dict[str, dict[str, Any] | None] = {}
    for field, family in (("method", "methods"), ("backend", "backends")):
        section = raw.get(field, None if field == "method" else AUTO_BACKEND)
        if section is None:
            issues.append(ConfigIssue(field, "required key is missing"))
            continue
        try:
            spec = PluginSpec.model_validate(section)
        except ValidationError as exc:
            issues += _issues_from(exc, (field,), PluginSpec)
            continue
        if field in prevalidated:
            resolved[field] = spec.options
            continue
        found, options = _check_plugin(family, spec, field)
        issues += found
        resolved[field] = options
    if issues or config is None:
        raise ConfigValidationError(issues, source)
    return config.model_copy(
        update={
            "method": PluginSpec(name=config.method.name, options=resolved["method"] or {}),
            "backend": PluginSpec(name=config.backend.name, options=resolved["backend"] or {}),
        }
    )


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | QAdaptConfig) -> QAdaptConfig:
    """A validated config from a file path (``.yaml``/``.yml``/``.toml``/``.json``), a dict, or a config."""
    if isinstance(source, (str, os.PathLike)):
        return validate_config(read_config_file(source), source=Path(source).name)
    return validate_config(source)
