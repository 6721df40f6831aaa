"""The qadapt command line and the demo, run as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qadapt
from qadapt import testing
from qadapt.cli.main import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qadapt.cli", *args], capture_output=True, text=True, timeout=300)


def test_plugins_table_lists_every_family_with_distribution(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["family", "name", "distribution", "version", "status"]
    for name in ("bnb4", "bnb8", "none", "oft", "randlora", "int8sym"):
        assert any(line.split()[1:2] == [name] and line.rstrip().endswith("ok") for line in out.splitlines()), name


def test_validate_exit_codes_and_located_errors(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(
        'targets = "all-linear"\n[method]\nname = "oft"\noptions = { block_size = 16 }\n[backend]\nname = "bnb4"\n'
    )
    assert main(["validate", str(good)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": {"name": "oft", "options": {"block_sise": 16}}, "backend": "bnb5"}))
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.json" in err and "method.options.block_sise" in err and "block_size" in err and "bnb4" in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("deep.json", b'{"method": "oft", "x": ' + b"[" * 50000 + b"]" * 50000 + b"}", "nested more than 32 levels"),
        ("deep.toml", b'method = "oft"\nx = ' + b"[" * 5000 + b"]" * 5000 + b"\n", "nested more than 32 levels"),
        ("latin.toml", 'method = "caf\xe9"\n'.encode("latin-1"), "not UTF-8 text at byte 13 (line 1, column 14)"),
        ("pyproject.toml", b"[tool]\nqadapt = 3\n", "must be a mapping"),
        ("odd.toml", b"method = 1979-05-27T07:32:00Z\n", "method"),
        (
            "bomb.yaml",
            b"a: &a [x, x]\n"
            + b"".join(b"%c: &%c [%s]\n" % (98 + i, 98 + i, b", ".join([b"*%c" % (97 + i)] * 2)) for i in range(20)),
            "aliases expand",
        ),
    ],
    ids=["deep-json", "deep-toml", "not-utf8", "pyproject-odd", "toml-datetime", "yaml-bomb"],
)
def test_validate_never_ends_in_a_traceback(tmp_path, capsys, name: str, content: bytes, message: str):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert name in err and message in err and "Traceback" not in err
    assert len(err) < 2000


def test_schema_is_json_schema_covering_plugins():
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    schema = json.loads(text)
    assert schema.get("type") == "object" or "properties" in schema or "$defs" in schema
    for word in ("block_size", "quant_type", "projection_prng_key"):
        assert word in text


def test_demo_runs_end_to_end_and_writes_outputs(tmp_path):
    out = tmp_path / "demo"
    result = run_cli(
        "demo", "--model", "tiny", "--backend", "bnb4", "--method", "oft", "--steps", "3", "--out", str(out),
        "--method-option", "r=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("Failed to load", "register_constant", "kernels-community"):  # third-party lines a CPU cannot act on
        assert noise not in result.stdout + result.stderr, noise
    for row in ("share of the quantization gap recovered", "exact unmerge bit-identical", "time per training step"):
        assert row in result.stdout
    assert re.search(r"exact unmerge bit-identical +yes", result.stdout)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "merges.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for merge in ("naive requantize", "default merge", "calibrated merge", "float target (bf16)", "scales method"):
        assert f"oft's gain kept: {merge}" in result.stdout
    assert (out / "adapter").is_dir() and any((out / "adapter").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers wrapped"] == "14"
    assert "{'r': 4}" in summary["method / backend"]


def test_demo_option_must_be_key_value(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--method-option", "block_size"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("check", testing.backend_checks(), ids=lambda c: c.__name__)
def test_example_plugin_passes_the_contract(check):
    check("int8sym")


def test_example_plugin_through_wrap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(4, 64)
    qadapt.wrap(model, method="oft", backend="int8sym", method_options={"block_size": 16})
    assert qadapt.summary(model).backends == {"int8sym": 2}
    with torch.no_grad():
        before = model(x)
        report = qadapt.merge(model)
        merged = model(x)
    assert float((merged - before).norm() / before.norm()) <= 3 * report.max_error + 1e-5


def test_entry_point_script_is_installed():
    script = Path(sys.executable).with_name("qadapt")
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout


def test_help_and_version_import_nothing_heavy():
    # Start-up is asserted as imports, not seconds: --help and --version load neither torch nor the plugins.
    code = (
        "import sys\n"
        "from qadapt.cli import main\n"
        "for argv in (['--version'], ['--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'stevedore', 'pydantic', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "qadapt 0.1.0" in result.stdout and "usage: qadapt" in result.stdout


def test_bad_input_is_exit_2_without_a_traceback_and_a_bug_is_exit_3_with_one(tmp_path, capsys, monkeypatch):
    args = ["export", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--no-progress"]
    assert main([*args, "--to", "bf16", "--max-memory", "1e400"]) == 2
    err = capsys.readouterr().err
    assert "qadapt: max_memory must be a positive size" in err and "Traceback" not in err
    assert main([*args, "--to", "bf16", "--requantize", "calibrated"]) == 2
    assert "applies to quantized targets" in capsys.readouterr().err
    assert main([*args, "--to", "bf16"]) == 2
    assert "qadapt: BASE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([*args, "--to", "nf4", "--backend-option", "blocksize=["])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "blocksize='[': the value is not YAML" in err and "Traceback" not in err

    def broken() -> list:
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(qadapt.registry, "plugins", broken)
    assert main(["plugins"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal bug" in err and "this is a bug in qadapt" in err

    def refused() -> list:
        raise PermissionError(13, "Permission denied", "/somewhere")

    monkeypatch.setattr(qadapt.registry, "plugins", refused)
    assert main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert "the system refused: Permission denied (/somewhere)" in err and "Traceback" not in err
