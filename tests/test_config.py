"""Config files (YAML, TOML, JSON) → QAdaptConfig, their error messages, and the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_llama

import qadapt
from qadapt import registry
from qadapt.config import ConfigValidationError, load_config, validate_config
from qadapt.errors import ConfigError

YAML = """\
method:
  name: oft
  options: {block_size: 16, coft: true}
backend:
  name: bnb4
  options: {quant_type: fp4}
targets: [q_proj, v_proj]
exclude: ["re:.*layers\\\\.1\\\\..*"]
adapter_name: first
"""
TOML = """\
adapter_name = "first"
targets = ["q_proj", "v_proj"]
exclude = ['re:.*layers\\.1\\..*']

[method]
name = "oft"
options = { block_size = 16, coft = true }

[backend]
name = "bnb4"
options = { quant_type = "fp4" }
"""
JSON = json.dumps(
    {
        "method": {"name": "oft", "options": {"block_size": 16, "coft": True}},
        "backend": {"name": "bnb4", "options": {"quant_type": "fp4"}},
        "targets": ["q_proj", "v_proj"],
        "exclude": ["re:.*layers\\.1\\..*"],
        "adapter_name": "first",
    }
)


@pytest.mark.parametrize(("suffix", "text"), [(".yaml", YAML), (".toml", TOML), (".json", JSON)])
def test_the_three_formats_give_the_same_config_and_wrap(tmp_path: Path, suffix: str, text: str):
    path = tmp_path / f"qadapt{suffix}"
    path.write_text(text)
    config = load_config(path)
    assert config.method.name == "oft" and config.method.options["block_size"] == 16
    assert config.method.options["coft"] is True
    # Options are completed with the plugin's defaults, so the config is reproducible as saved.
    assert config.method.options["num_cayley_neumann_terms"] == 5
    assert config.backend.options["quant_type"] == "fp4" and config.backend.options["blocksize"] == 64
    assert config.exclude == ["re:.*layers\\.1\\..*"]
    model = qadapt.wrap(tiny_llama(), config=path)
    layers = [n for n, m in model.named_modules() if isinstance(m, qadapt.QuantAdapterLinear)]
    assert layers == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert model.get_submodule(layers[0]).active_adapter == "first"
    assert model.get_submodule(layers[0]).backend.name == "bnb4"


def test_pyproject_tool_table(tmp_path: Path):
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\n\n[tool.qadapt]\nmethod = "oft"\ntargets = "q_proj"\n')
    config = load_config(path)
    assert config.method.name == "oft" and config.targets == ["q_proj"] and config.backend.name == "auto"


def test_every_error_at_once_with_locations_file_name_and_suggestions(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "method:\n  name: oft\n  options: {block_size: -4, coft: maybe, num_cayley_neuman_terms: 3}\n"
        "backend:\n  name: bnb4\n  options: {quant_typ: nf4}\n"
        "target: [q_proj]\n"
    )
    with pytest.raises(ConfigValidationError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("invalid qadapt config (5 errors):")
    locations = {issue.location for issue in info.value.issues}
    assert locations == {
        "target",
        "method.options.block_size",
        "method.options.coft",
        "method.options.num_cayley_neuman_terms",
        "backend.options.quant_typ",
    }
    assert "bad.yaml: method.options.block_size: Input should be greater than or equal to 1 (got -4)" in message
    assert "bad.yaml: method.options.num_cayley_neuman_terms: unknown key" in message
    assert "did you mean 'num_cayley_neumann_terms'?" in message
    assert "bad.yaml: backend.options.quant_typ: unknown key 'quant_typ'; did you mean 'quant_type'?" in message
    assert "bad.yaml: target: unknown key 'target'; did you mean 'targets'?" in message
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_unknown_plugin_names_list_what_is_installed():
    with pytest.raises(ConfigValidationError) as info:
        validate_config({"method": {"name": "ofts"}, "backend": "bnb5"})
    message = str(info.value)
    assert "method.name: unknown method plugin 'ofts'" in message and "Did you mean 'oft'?" in message
    assert "backend.name: unknown backend plugin 'bnb5'" in message
    for name in registry.names("backends"):
        assert name in message


def test_auto_backend_takes_no_options_and_missing_method_is_reported():
    with pytest.raises(ConfigValidationError) as info:
        validate_config({"backend": {"name": "auto", "options": {"x": 1}}, "adapter_name": "two words"})
    locations = [issue.location for issue in info.value.issues]
    assert sorted(locations) == ["adapter_name", "backend.options", "method"]
    assert "required key is missing" in str(info.value)


def test_a_method_level_option_rule_is_reported_at_the_options():
    with pytest.raises(ConfigValidationError, match=r"method.options: Value error, give either r \(2\)"):
        validate_config({"method": {"name": "oft", "options": {"r": 2, "block_size": 8}}})


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("broken.yaml", "method: [oft\n", "broken.yaml: not valid YAML"),
        ("broken.toml", "method = \n", "broken.toml: not valid TOML"),
        ("broken.json", "{method: 1}", "broken.json: not valid JSON"),
        ("list.yaml", "- oft\n", "list.yaml: the config must be a mapping"),
        ("config.ini", "[x]\n", "unknown config file type '.ini'"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, text: str, expected: str):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        load_config(path)


def test_wrap_refuses_config_together_with_arguments(tmp_path: Path):
    with pytest.raises(ConfigError, match="either config= or method="):
        qadapt.wrap(tiny_llama(), method="oft", config={"method": "oft"})


def test_config_schema_covers_installed_plugins():
    schema = qadapt.config_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    text = json.dumps(schema)
    for name in registry.names("methods") + registry.names("backends"):
        assert f'"const": "{name}"' in text
    # The union is tagged by name, so an editor completes per-plugin option keys.
    assert '"propertyName": "name"' in text
    assert "num_cayley_neumann_terms" in text and "projection_prng_key" in text and "quant_storage" in text
    assert schema["additionalProperties"] is False
