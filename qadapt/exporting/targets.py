"""Export targets: the float dtypes, and the quantized formats installed backends declare (``export_targets``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from qadapt import registry
from qadapt.errors import ConfigError, PluginError

#: Float targets: name -> dtype. Every backend can be exported to these (dequantize + merge).
FLOAT_TARGETS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Target:
    """An export target: a float dtype, or a backend with options over the base's format."""

    name: str
    dtype: torch.dtype | None = None
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def export_targets() -> dict[str, Target]:
    """Every target name the installed plugins offer (``--to``), float ones included."""
    found: dict[str, Target] = {name: Target(name, dtype=dtype) for name, dtype in FLOAT_TARGETS.items()}
    owners: dict[str, str] = {}
    for backend in registry.names("backends"):
        try:
            cls = registry.backend_class(backend)
        except PluginError:
            continue
        for name, options in getattr(cls, "export_targets", {}).items():
            if name in found:
                other = owners.get(name, "qadapt (float)")
                raise ConfigError(f"export target {name!r} is declared by backend {backend!r} and by {other}")
            found[name] = Target(name, backend=backend, options=dict(options))
            owners[name] = f"backend {backend!r}"
    return found


def resolve_target(to: str, backend_options: Mapping[str, Any] | None) -> Target:
    if to in FLOAT_TARGETS and not backend_options:
        return Target(to, dtype=FLOAT_TARGETS[to])  # no plugin is loaded for a float target
    targets = export_targets()
    if to not in targets:
        raise ConfigError(f"--to must be one of {', '.join(sorted(targets))}, got {to!r}")
    target = targets[to]
    if backend_options:
        if target.backend is None:
            raise ConfigError(f"backend options were given, but target {to!r} is a float dtype with no backend")
        target = Target(target.name, backend=target.backend, options={**target.options, **dict(backend_options)})
    return target
