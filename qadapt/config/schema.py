"""The JSON Schema of a qadapt config file, over every installed plugin's options."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from qadapt import registry
from qadapt.config.model import AUTO_BACKEND, CONFIG_VERSION, PluginSpec, QAdaptConfig
from qadapt.errors import PluginError


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
