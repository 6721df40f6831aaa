"""Generate docs/options.md from the installed plugins' options models.

Run by the mkdocs hook (docs/hooks.py) on every build, and checked to be current by
tests/test_docs.py. By hand: ``python docs/gen_options.py``.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic_core import PydanticUndefined

from qadapt import registry

OUTPUT = Path(__file__).with_name("options.md")
BUILTIN_DISTRIBUTION = "qadapt"


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("|", "\\|")


def _number(value: float) -> str:
    if isinstance(value, int) and value > 4096 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    return f"{value:g}"


def _bounds(field: typing.Any) -> str:
    """The numeric bounds of a field (``1 ≤ x ≤ 32``), or ``-`` when it has none."""
    found = {}
    for item in field.metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                found[name] = getattr(item, name)
    if not found:
        return "-"
    low = f"{_number(found['ge'])} ≤ " if "ge" in found else (f"{_number(found['gt'])} < " if "gt" in found else "")
    high = f" ≤ {_number(found['le'])}" if "le" in found else (f" < {_number(found['lt'])}" if "lt" in found else "")
    return f"{low}x{high}"


def _default(field: typing.Any) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "(computed)"
    return f"`{field.default!r}`"


def render() -> str:
    """The Markdown page: one table per built-in plugin."""
    lines = [
        "# Plugin options reference",
        "",
        "Generated from the options models of qadapt's built-in plugins (`docs/gen_options.py`).",
        "In a config file they go under `method.options` / `backend.options`; in Python, as",
        "`method_options=` / `backend_options=`. Unknown keys are rejected, and so is a number outside",
        "its bounds (NaN and infinities included). `qadapt schema` prints the",
        "same information as JSON Schema for every installed plugin, third-party ones included.",
        "",
    ]
    for family in registry.FAMILIES:
        lines += [f"## {family.capitalize()}", ""]
        for info in registry.plugins(family):
            if info.distribution != BUILTIN_DISTRIBUTION:
                continue
            lines += [f"### `{info.name}`", "", f"From distribution `{info.distribution}` {info.version}.", ""]
            if not info.ok:
                lines += [f"Not loadable here: {info.status}", ""]
                continue
            options = registry.load(family, info.name).Options
            doc = (options.__doc__ or "").strip().splitlines()
            if doc and not doc[0].startswith("Base of every plugin"):
                lines += [doc[0], ""]
            fields = options.model_fields
            if not fields:
                lines += ["No options.", ""]
                continue
            lines += ["| option | type | bounds | default | meaning |", "|---|---|---|---|---|"]
            for name, field in fields.items():
                meaning = (field.description or "").replace("|", "\\|")
                kind, bounds = _type_name(field.annotation), _bounds(field)
                lines.append(f"| `{name}` | {kind} | {bounds} | {_default(field)} | {meaning} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
