"""Every numeric option of every built-in method and backend is bounded: a table over NaN, ±inf, 0,
negative and huge values, through the config validation every entry point uses (wrap, config files,
checkpoints, PEFT configs). The fields come from the Options models themselves, so a new option
is in the table the day it is added; the table lists only the hostile values an option accepts."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import pytest
from conftest import model_checksum
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

import qadapt
from qadapt import registry
from qadapt.config import ConfigValidationError, load_config
from qadapt.errors import CheckpointError

METHODS = ["lora", "dora", "oft", "randlora", "scales"]
BACKENDS = ["none", "bnb4", "bnb8", "hqq", "torchao"]
HOSTILE = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "zero": 0,
    "negative": -1,
    "huge": 2**62,
    "huge-float": 1e300,
}
#: (plugin, option) -> the hostile values it accepts, each with why that value is meaningful.
ACCEPTED: dict[tuple[str, str], set[str]] = {
    ("lora", "alpha"): {"zero", "negative"},  # a no-op adapter; a flipped update (PEFT allows both)
    ("dora", "alpha"): {"zero", "negative"},
    ("lora", "dropout"): {"zero"},
    ("dora", "dropout"): {"zero"},
    ("oft", "module_dropout"): {"zero"},
    ("randlora", "dropout"): {"zero"},
    ("randlora", "projection_prng_key"): {"zero", "huge"},  # any 64-bit seed
    ("bnb8", "threshold"): {"zero"},  # 0 disables outlier columns
    ("hqq", "axis"): {"zero"},  # group along columns
}


def _numeric(annotation: object) -> bool:
    """Whether an option's type holds numbers (int/float, through Optional, Annotated and Literal)."""
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    return any(_numeric(a) for a in args)


def numeric_options() -> list[tuple[str, str, str]]:
    rows = []
    for family, names in (("method", METHODS), ("backend", BACKENDS)):
        for name in names:
            cls = registry.method_class(name) if family == "method" else registry.backend_class(name)
            rows += [(family, name, f) for f, info in cls.Options.model_fields.items() if _numeric(info.annotation)]
    return rows


ROWS = numeric_options()


def config_with(family: str, name: str, option: str, value: object) -> dict:
    if family == "method":
        return {"method": {"name": name, "options": {option: value}}, "backend": "none"}
    return {"method": "lora", "backend": {"name": name, "options": {option: value}}}


@pytest.mark.parametrize("value", list(HOSTILE), ids=list(HOSTILE))
@pytest.mark.parametrize(("family", "name", "option"), ROWS, ids=[f"{n}.{o}" for _, n, o in ROWS])
def test_every_numeric_option_refuses_what_it_does_not_mean(family: str, name: str, option: str, value: str):
    config = config_with(family, name, option, HOSTILE[value])
    if value in ACCEPTED.get((name, option), set()):
        load_config(config)
        return
    with pytest.raises(ConfigValidationError) as info:
        load_config(config)
    assert f"{family}.options.{option}" in str(info.value)


def test_the_table_covers_the_options_that_matter():
    options = {(n, o) for _, n, o in ROWS}
    for key in ACCEPTED:
        assert key in options, f"{key} is in the table but not an option"
    for expected in [("lora", "r"), ("lora", "alpha"), ("oft", "eps"), ("randlora", "alpha"), ("hqq", "group_size"),
                     ("torchao", "nf4_block_size"), ("scales", "init"), ("bnb4", "blocksize")]:  # fmt: skip
        assert expected in options


def test_wrap_refuses_a_huge_rank_before_allocating_anything():
    model = tiny_llama()
    before = model_checksum(model)
    with pytest.raises(ConfigValidationError, match=r"method\.options\.r.*less than or equal to 65536"):
        qadapt.wrap(model, method="lora", method_options={"r": 2**40})
    with pytest.raises(ConfigValidationError, match=r"method\.options\.alpha.*finite number"):
        qadapt.wrap(model, method="dora", method_options={"alpha": math.inf})
    assert model_checksum(model) == before and not any(
        isinstance(m, qadapt.QuantAdapterLinear) for m in model.modules()
    )


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("lora_alpha", "NaN", r"alpha.*finite number"),
        ("lora_alpha", "Infinity", r"alpha.*finite number"),
        ("r", 10**12, r"options\.r.*less than or equal to 65536"),
        ("r", 8, r"lora_A\.weight has shape \(4, 64\) in the file; an adapter with .* holds \(8, 64\)"),
    ],
    ids=["alpha-nan", "alpha-inf", "r-huge", "r-disagrees-with-the-tensors"],
)
def test_a_peft_config_is_bounded_and_checked_against_its_tensors_before_allocating(
    tmp_path: Path, field: str, value: object, words: str
):
    source = qadapt.wrap(tiny_llama(), method="lora", targets=["q_proj"], method_options={"r": 4})
    qadapt.save_peft_adapter(source, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # as PEFT writes it: no settings digest
    path = tmp_path / "peft" / "adapter_config.json"
    text = path.read_text()
    config = json.loads(text)
    config[field] = "@@" if isinstance(value, str) else value
    path.write_text(json.dumps(config).replace('"@@"', str(value)))
    model = tiny_llama()
    before = model_checksum(model)
    with pytest.raises(CheckpointError, match=words):
        qadapt.load_peft_adapter(model, tmp_path / "peft")
    assert model_checksum(model) == before
