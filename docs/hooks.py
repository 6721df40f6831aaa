"""mkdocs hooks: regenerate the plugin options reference before each build."""

from __future__ import annotations

import sys
from pathlib import Path


def on_pre_build(config: object, **kwargs: object) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import gen_options

    text = gen_options.render()
    if not gen_options.OUTPUT.exists() or gen_options.OUTPUT.read_text() != text:
        gen_options.OUTPUT.write_text(text)
