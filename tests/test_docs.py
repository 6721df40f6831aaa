"""The docs stay true: every page's python code blocks run, the options reference is current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


#: Seconds one page's blocks may take; each page runs in a few seconds to ~20 s on a busy 2-core machine.
PAGE_TIMEOUT = 240

#: What each page with python blocks prints, the last of it from the page's last block: the code ran
#: to its end and computed what the page says. A new page with a python block needs an entry here.
MARKERS: dict[str, tuple[str, ...]] = {
    "README.md": ("merged 2 layer(s)", "layers wrapped:   2 (bnb4 x2)"),
    "docs/quickstart.md": ("merged 2 layer(s)", "layers wrapped:   2 (bnb8 x2)"),
    "docs/usage.md": (
        "['model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight'] ...",
        "['default', 'second']",
        "loaded from PEFT files: 2",
    ),
    "docs/peft.md": ("trainable params:", "torch.bfloat16"),
    "docs/concepts.md": ("merged 14 layer(s), max relative error",),
    "docs/config.md": ("invalid qadapt config (4 errors)", "['adapter_name', 'backend', 'exclude', 'method'"),
    "docs/backends.md": ("{'torchao': 2}", "{'quanto': 2}"),
    "docs/training.md": (
        "merge-aware: merged logits identical to the trained model's",
        "saved adapter after 4 steps",
        "Trainer ran 4 steps; adapter saved",
    ),
    "docs/gguf.md": (
        "GgufLinear Q4_1",
        "14 layer(s) merged",
        "transformers reads the exported file as the merged model: True",
        "14 tensors rewritten (Q4_1), metadata kept: True",
    ),
    "docs/export.md": (
        "exported llama-merged-nf4 (nf4): 14 layer(s) merged",
        "compressed-tensors pack-quantized ['lm_head']",
        "w4a16 export equals the in-memory merge: True",
        "calibrated on 8 batch(es), block by block",
    ),
    "docs/plugins.md": ("int8sym and oft pass the contract suite",),
    "docs/first-plugin.md": (
        "contract: ok",
        "caught: check_merge_weight_matches_forward",
        "2 layers wrapped",
        "merged 2 layer(s)",
    ),
}


def python_blocks(path: Path) -> str:
    """Every ```python block of a page, in order, as one script."""
    return "\n".join(PYTHON_BLOCK.findall(path.read_text()))


def pages_with_python() -> list[str]:
    """README.md and every docs/*.md page that has a ```python block, as paths relative to the repository."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [page.relative_to(ROOT).as_posix() for page in pages if PYTHON_BLOCK.search(page.read_text())]


@pytest.mark.parametrize("page", pages_with_python())
def test_page_code_runs(page, tmp_path):
    """A page's python blocks run top to bottom as one script, in a fresh directory, and print the page's markers."""
    assert page in MARKERS, f"{page} has python blocks: add what its last block prints to MARKERS in {__file__}"
    code = python_blocks(ROOT / page)
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=PAGE_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    missing = [marker for marker in MARKERS[page] if marker not in result.stdout]
    assert not missing, f"{page} did not print {missing}; its output ends:\n{result.stdout[-2000:]}"


def test_every_marker_is_for_a_page_with_python_blocks():
    assert sorted(MARKERS) == sorted(pages_with_python())


def test_example_method_plugin_passes_the_contract():
    sys.path.insert(0, str(ROOT / "examples" / "qadapt_rank1"))
    try:
        from qadapt_rank1 import Rank1Method
    finally:
        sys.path.pop(0)
    from qadapt import testing

    testing.check_method(Rank1Method(), backend="none")
    testing.check_method(Rank1Method({"scale": 2.0}), backend="bnb4")


def test_options_reference_is_current():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_options
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs/options.md").read_text() == gen_options.render(), "run: python docs/gen_options.py"


def test_readme_gives_exactly_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^make (\w+)", readme, flags=re.MULTILINE)
    assert commands[:2] == ["demo", "test"]
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in ci
