"""``QAdaptConfig``: what to wrap, with which method and backend, as data.

A config comes from keyword arguments, a dict, or a YAML/TOML/JSON file. Validation runs in two
steps: the config's own structure, then each plugin's options against that plugin's options model
(the plugin is resolved by name first). Every problem is collected and reported at once, each with
its location (``method.options.block_size``) and the file it came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from torch import nn

from qadapt import registry
from qadapt.config_sources import read_config_file
from qadapt.errors import ConfigError, PluginError, closest, shorten
from qadapt.protocols import PluginOptions

#: The config format version this qadapt reads and writes.
CONFIG_VERSION = 1
#: Backend name that picks, per layer, the installed backend that owns the layer.
AUTO_BACKEND = "auto"


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


# ---------------------------------------------------------------------------------- JSON Schema


def _spec_model(family: str, name: str, options: type[BaseModel] | None) -> type[BaseModel]:
    safe = re.sub(r"\W", "_", name)
    fields: dict[str, Any] = {"name": (Literal[name], ...)}  # type: ignore[valid-type]
    if options is not None:
        fields["options"] = (options, Field(default_factory=dict))
    else:
        fields["options"] = (dict[str, Any], Field(default_factory=dict, max_length=0))
    return create_model(f"{family}_{safe}", __config__=ConfigDict(extra="forbid", title=f"{family} {name!r}"), **fields)


def _family_field(family: str, specs: list[type[BaseModel]], names: list[str]) -> Any:
    if not specs:
        return PluginSpec
    tagged: Any = specs[0] if len(specs) == 1 else Annotated[Union[tuple(specs)], Field(discriminator="name")]  # noqa: UP007
    bare = Literal[tuple(names)]  # type: ignore[valid-type]
    return Union[bare, tagged]  # noqa: UP007


def config_schema() -> dict[str, Any]:
    """A JSON Schema of :class:`QAdaptConfig` covering every installed plugin's options.

    ``method`` and ``backend`` are unions over installed plugin names (tagged by ``name``), so an
    editor completes option keys per plugin. Plugins that fail to load are left out.
    """
    families: dict[str, Any] = {}
    for field, family in (("method", "methods"), ("backend", "backends")):
        specs, names = [], []
        for name in registry.names(family):  # type: ignore[arg-type]
            try:
                cls = registry.load(family, name)  # type: ignore[arg-type]
            except PluginError:
                continue
            specs.append(_spec_model(field, name, cls.Options))
            names.append(name)
        if field == "backend":
            specs.append(_spec_model(field, AUTO_BACKEND, None))
            names.append(AUTO_BACKEND)
        families[field] = _family_field(field, specs, names)
    schema_model = create_model(
        "QAdaptConfig",
        __config__=ConfigDict(extra="forbid"),
        __doc__=QAdaptConfig.__doc__,
        version=(Literal[1], CONFIG_VERSION),
        method=(families["method"], Field(description=QAdaptConfig.model_fields["method"].description)),
        backend=(
            families["backend"],
            Field(AUTO_BACKEND, description=QAdaptConfig.model_fields["backend"].description),
        ),
        targets=(
            str | list[str],
            Field(["all-linear"], description=QAdaptConfig.model_fields["targets"].description),
        ),
        exclude=(list[str], Field([], description=QAdaptConfig.model_fields["exclude"].description)),
        adapter_name=(str, Field("default", description=QAdaptConfig.model_fields["adapter_name"].description)),
    )
    schema = schema_model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
