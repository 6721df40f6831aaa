"""Plugin discovery through entry points: listing, lazy loading, protocol checks, broken plugins."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import qadapt
from qadapt import registry
from qadapt.errors import DuplicatePluginError, PluginLoadError, UnknownPluginError

GOOD_METHOD = """
from torch import nn
from qadapt.protocols import Method

class Good(Method):
    def create_adapter(self, in_features, out_features, shared):
        return nn.Module()
    def forward(self, adapter, x, base_forward):
        return base_forward(x)
    def merge_weight(self, adapter, weight):
        return weight.clone()
    def unmerge_weight(self, adapter, weight):
        return weight.clone()
"""

BROKEN_MODULES = {
    # raises on import
    "qa_broken_import": "raise RuntimeError('boom at import')\n",
    # a Method subclass that forgets merge_weight / unmerge_weight
    "qa_missing_member": """
from torch import nn
from qadapt.protocols import Method

class Partial(Method):
    def create_adapter(self, in_features, out_features, shared):
        return nn.Module()
    def forward(self, adapter, x, base_forward):
        return base_forward(x)
""",
    # written for another protocol version
    "qa_wrong_version": GOOD_METHOD.replace("class Good(Method):", "class Good(Method):\n    api_version = 99"),
    "qa_good": GOOD_METHOD,
}


@pytest.fixture
def broken_plugins(make_distribution):
    make_distribution(
        "qa-broken",
        "1.2.3",
        {
            "qadapt.methods": {
                "explodes": "qa_broken_import:Whatever",
                "partial": "qa_missing_member:Partial",
                "future": "qa_wrong_version:Good",
                "fine": "qa_good:Good",
            }
        },
        BROKEN_MODULES,
    )


def by_name(listing, family, name):
    return [p for p in listing if p.family == family and p.name == name]


def test_builtins_are_listed_with_distribution_and_ok_status():
    listing = qadapt.plugins()
    for family, name in [("backends", "none"), ("backends", "bnb8"), ("backends", "bnb4")]:
        (info,) = by_name(listing, family, name)
        assert info.distribution == "qadapt"
        assert info.version == qadapt.__version__
        assert info.ok, info.status


def test_third_party_distribution_is_found_through_entry_points():
    listing = qadapt.plugins()
    (method,) = by_name(listing, "methods", "rowscale")
    (backend,) = by_name(listing, "backends", "half")
    assert method.distribution == backend.distribution == "qadapt-tinyplugin"
    assert method.ok and backend.ok


def test_unknown_name_lists_installed_and_suggests_closest():
    with pytest.raises(UnknownPluginError) as info:
        registry.load("backends", "bnb5")
    message = str(info.value)
    assert "'bnb5'" in message and "bnb4" in message and "bnb8" in message and "none" in message
    assert "Did you mean 'bnb4'" in message or "Did you mean 'bnb8'" in message
    assert isinstance(info.value, LookupError)


def test_family_and_name_types_are_checked():
    with pytest.raises(ValueError, match="family must be one of"):
        registry.load("quantizers", "bnb4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="plugin name"):
        registry.load("backends", 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("explodes", ["boom at import", "RuntimeError"]),
        ("partial", ["merge_weight", "unmerge_weight", "Method protocol"]),
        ("future", ["protocol version 99", f"version {qadapt.API_VERSION}"]),
    ],
)
def test_broken_plugin_is_reported_with_name_and_distribution(broken_plugins, name, words):
    with pytest.raises(PluginLoadError) as info:
        registry.load("methods", name)
    message = str(info.value)
    assert repr(name) in message and "qa-broken 1.2.3" in message
    for word in words:
        assert word in message


def test_broken_plugins_do_not_break_listing_or_other_plugins(broken_plugins):
    listing = qadapt.plugins()
    statuses = {p.name: p.status for p in listing if p.distribution == "qa-broken"}
    assert statuses["fine"] == "ok"
    for name in ("explodes", "partial", "future"):
        assert statuses[name] != "ok" and "qa-broken" in statuses[name]
    assert all(p.ok for p in listing if p.distribution == "qadapt")
    assert registry.load("methods", "fine").__name__ == "Good"
    assert registry.load("backends", "none").__name__ == "FloatBackend"


def test_import_qadapt_survives_a_broken_plugin(broken_plugins, tmp_path):
    paths = [p for p in sys.path if "site-qa-broken" in p]
    code = (
        f"import sys; sys.path[:0] = {paths!r}\n"
        "import qadapt\n"
        "names = qadapt.registry.names('methods')\n"
        "assert 'explodes' in names, names\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_same_name_from_two_distributions_is_refused_naming_both(make_distribution):
    make_distribution("qa-first", "1.0", {"qadapt.methods": {"twin": "qa_twin_a:Good"}}, {"qa_twin_a": GOOD_METHOD})
    make_distribution("qa-second", "2.0", {"qadapt.methods": {"twin": "qa_twin_b:Good"}}, {"qa_twin_b": GOOD_METHOD})
    with pytest.raises(DuplicatePluginError) as info:
        registry.load("methods", "twin")
    assert "qa-first 1.0" in str(info.value) and "qa-second 2.0" in str(info.value)
    twins = [p for p in qadapt.plugins("methods") if p.name == "twin"]
    assert {p.distribution for p in twins} == {"qa-first", "qa-second"}
    assert not any(p.ok for p in twins)
    assert registry.load("backends", "bnb4").__name__ == "Bnb4Backend"


def test_a_third_party_cannot_clobber_a_builtin(make_distribution):
    make_distribution("qa-clobber", "0.1", {"qadapt.backends": {"none": "qa_clob:Good"}}, {"qa_clob": GOOD_METHOD})
    with pytest.raises(DuplicatePluginError, match="qa-clobber"):
        registry.load("backends", "none")


def _run_isolated(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_qadapt_imports_no_plugin_and_no_bitsandbytes():
    out = _run_isolated(
        "import sys, qadapt\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('bitsandbytes', 'qadapt_bnb', 'qadapt_oft', 'qadapt_randlora', 'qadapt_tinyplugin', 'peft', "
        "'torchao', 'qadapt_torchao', 'hqq', 'qadapt_hqq')))"
    )
    assert out == "[]"


def test_loading_one_plugin_imports_only_that_plugin():
    out = _run_isolated(
        "import sys, qadapt\n"
        "qadapt.registry.load('backends', 'none'); qadapt.registry.load('methods', 'rowscale')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('bitsandbytes', 'qadapt_bnb', 'qadapt_oft', 'qadapt_randlora', 'qadapt_scales')))"
    )
    assert out == "[]"


def test_core_source_never_names_a_plugin_package():
    core = Path(qadapt.__file__).parent
    for path in core.rglob("*.py"):
        text = path.read_text()
        for plugin_package in (
            "qadapt_bnb",
            "qadapt_oft",
            "qadapt_randlora",
            "qadapt_lora",
            "qadapt_scales",
            "qadapt_ia3",
            "qadapt_vera",
            "qadapt_loha",
            "qadapt_lokr",
            "qadapt_lycoris",
            "qadapt_boft",
            "qadapt_torchao",
            "qadapt_hqq",
            "bitsandbytes",
            "torchao",
            "hqq",
        ):
            assert f"import {plugin_package}" not in text and f"from {plugin_package}" not in text, path


def test_wheel_holds_only_the_qadapt_packages(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("qadapt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        registered = archive.read(entry_points).decode()
    assert {"qadapt", "qadapt_bnb"} <= top_level
    assert top_level <= {
        "qadapt",
        "qadapt_bnb",
        "qadapt_boft",
        "qadapt_compressed",
        "qadapt_quanto",
        "qadapt_gguf",
        "qadapt_hqq",
        "qadapt_ia3",
        "qadapt_loha",
        "qadapt_lokr",
        "qadapt_lora",
        "qadapt_lycoris",
        "qadapt_oft",
        "qadapt_randlora",
        "qadapt_scales",
        "qadapt_torchao",
        "qadapt_vera",
    }
    assert {"qadapt_torchao", "qadapt_hqq", "qadapt_gguf"} <= top_level
    assert "[qadapt.backends]" in registered and "bnb4 = qadapt_bnb.bnb4:Bnb4Backend" in registered
    assert "torchao = qadapt_torchao.backend:TorchaoBackend" in registered and "hqq = qadapt_hqq.backend" in registered
    assert "gguf = qadapt_gguf.backend:GgufBackend" in registered


def test_qadapt_ships_eleven_methods():
    builtin = {info.name for info in registry.plugins("methods") if info.distribution == "qadapt" and info.ok}
    assert builtin == {
        "oft", "randlora", "lora", "dora", "qalora", "scales", "ia3", "vera", "loha", "lokr", "boft"
    }  # fmt: skip
