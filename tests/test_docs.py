"""The docs stay true: README and quickstart code blocks run, the options reference is current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks(path: Path) -> str:
    return "\n".join(PYTHON_BLOCK.findall(path.read_text()))


@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md"])
def test_page_code_runs(page, tmp_path):
    code = python_blocks(ROOT / page)
    assert code.strip(), f"{page} has no python block"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged" in result.stdout and "layers wrapped" in result.stdout


def test_first_plugin_page_code_runs(tmp_path):
    code = python_blocks(ROOT / "docs/first-plugin.md")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "contract: ok" in result.stdout and "caught: check_merge_weight_matches_forward" in result.stdout
    assert "2 layers wrapped" in result.stdout and "merged 2 layer(s)" in result.stdout


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
