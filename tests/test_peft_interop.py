"""PEFT 0.21.2 adapter directories both ways, for OFT and RandLora, against PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import model_checksum
from peft import (
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    RandLoraConfig,
    VeraConfig,
    get_peft_model,
)
from safetensors.torch import load_file, save_file
from tiny_models import model_output, perturb_adapters, tiny_llama, token_ids
from torch import nn

import qadapt
from qadapt.errors import CheckpointError
from qadapt.model.wrap import adapter_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]
METHODS = [
    ("oft", {"block_size": 16}),
    ("randlora", {"r": 8}),
    ("randlora", {"r": 8, "save_projection": False}),
    ("lora", {"r": 4, "alpha": 16}),
    ("dora", {"r": 4, "use_rslora": True}),
    ("ia3", {"feedforward_modules": ["down_proj"]}),
    ("vera", {"r": 8}),
    ("vera", {"r": 8, "save_projection": False, "projection_prng_key": 7}),
    ("loha", {"r": 4, "alpha": 6, "rank_pattern": {"down_proj": 2}}),
    ("lokr", {"r": 2, "decompose_both": True, "alpha_pattern": {"v_proj": 5.0}}),
    ("boft", {"block_size": 8}),
]
METHOD_IDS = [
    "oft",
    "randlora",
    "randlora-regenerated",
    "lora",
    "dora",
    "ia3",
    "vera",
    "vera-regenerated",
    "loha",
    "lokr",
    "boft",
]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def float_math_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The output with every backend on its float-math path.

    bitsandbytes' int8 layers on CPU quantize the activations too in eval mode; in training mode
    they multiply by the dequantized weight. The tiny models have no dropout, so training mode
    changes nothing else.
    """
    was_training = model.training
    model.train()
    try:
        return model_output(model, ids)
    finally:
        model.train(was_training)


def float_twin(model: nn.Module) -> nn.Module:
    """The float base model whose target weights are the qadapt model's dequantized ones."""
    twin = tiny_llama()
    for name, layer in adapter_layers(model):
        twin.get_submodule(name).weight.data = layer.backend.dequantize_module(layer.base)
    return twin


@pytest.mark.parametrize("backend", ["none", "bnb8", "bnb4"])
@pytest.mark.parametrize(("method", "options"), METHODS, ids=METHOD_IDS)
def test_qadapt_to_peft_and_back(tmp_path: Path, method: str, options: dict, backend: str):
    ids = token_ids()
    model = qadapt.wrap(tiny_llama(), method=method, backend=backend, targets=TARGETS, method_options=options)
    perturb_adapters(model)
    expected = float_math_output(model, ids)
    qadapt.save_peft_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(float_twin(model), tmp_path).eval()
    with torch.no_grad():
        assert relative_error(model_output(peft_model, ids), expected) < 1e-5

    back = qadapt.load_peft_adapter(tiny_llama(), tmp_path, backend=backend)
    assert relative_error(float_math_output(back, ids), expected) < 1e-5
    assert {layer.methods["default"].name for _, layer in adapter_layers(back)} == {method}


@pytest.mark.parametrize(
    "peft_config",
    [
        OFTConfig(target_modules=TARGETS, oft_block_size=16, r=0, init_weights=False),
        OFTConfig(target_modules=TARGETS, r=4, oft_block_size=0, init_weights=False, use_cayley_neumann=False),
        RandLoraConfig(target_modules=TARGETS, r=8, init_weights=False),
        RandLoraConfig(target_modules=TARGETS, r=8, init_weights=False, save_projection=False),
        LoraConfig(target_modules=TARGETS, r=4, lora_alpha=16, init_lora_weights=False),
        LoraConfig(target_modules=TARGETS, r=8, use_rslora=True, init_lora_weights="gaussian", lora_dropout=0.1),
        LoraConfig(target_modules=TARGETS, r=4, use_dora=True, init_lora_weights=False),
        IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], init_ia3_weights=False),
        IA3Config(target_modules=TARGETS, feedforward_modules=r".*\.mlp\..*", init_ia3_weights=False),
        VeraConfig(target_modules=TARGETS, r=8, init_weights=False, vera_dropout=0.1),
        VeraConfig(target_modules=TARGETS, r=8, init_weights=False, save_projection=False, projection_prng_key=3),
        LoHaConfig(target_modules=TARGETS, r=4, alpha=8, init_weights=False, rank_pattern={"q_proj": 2}),
        LoKrConfig(target_modules=TARGETS, r=2, decompose_both=True, init_weights=False, decompose_factor=4),
        BOFTConfig(target_modules=TARGETS, boft_block_size=0, boft_block_num=8, init_weights=False),
    ],
    ids=[
        "oft-block-size",
        "oft-r-exact-cayley",
        "randlora",
        "randlora-regenerated",
        "lora",
        "lora-rslora",
        "dora",
        "ia3",
        "ia3-regex",
        "vera",
        "vera-regenerated",
        "loha",
        "lokr",
        "boft",
    ],
)
def test_peft_to_qadapt(tmp_path: Path, peft_config):
    ids = token_ids()
    torch.manual_seed(5)
    peft_model = get_peft_model(tiny_llama(), peft_config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad and any(
                key in name for key in ("randlora_gamma", "lora_B", "magnitude", "vera_lambda_b")
            ):
                param.mul_(1 + 0.1 * torch.randn_like(param)).add_(0.01 * torch.randn_like(param))
    peft_model.eval()
    with torch.no_grad():
        expected = model_output(peft_model, ids)
    peft_model.save_pretrained(tmp_path)

    model = qadapt.load_peft_adapter(tiny_llama(), tmp_path, backend="none")
    assert relative_error(model_output(model, ids), expected) < 1e-5
    assert qadapt.summary(model).layers == 6

    quantized = qadapt.load_peft_adapter(tiny_llama(), tmp_path, backend="bnb4")
    twin = float_twin(quantized)
    reference = PeftModel.from_pretrained(twin, tmp_path).eval()
    with torch.no_grad():
        assert relative_error(model_output(quantized, ids), model_output(reference, ids)) < 1e-5


def write_peft_oft(directory: Path, **config_changes) -> None:
    model = qadapt.wrap(tiny_llama(), method="oft", backend="none", targets=TARGETS, method_options={"block_size": 16})
    qadapt.save_peft_adapter(model, directory)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(config_changes)
    path.write_text(json.dumps(config))
    as_written_by_peft(directory)


def as_written_by_peft(directory: Path) -> None:
    """Drop qadapt's settings digest from the weights header, as in a directory PEFT wrote."""
    weights = directory / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"peft_type": "ADALORA"},
            r"no installed qadapt method reads PEFT adapters of type 'ADALORA' with this config; supported types: "
            r"BOFT, IA3, LOHA, LOKR, LORA, OFT, RANDLORA, VERA",
        ),
        ({"bias": "all"}, r"unsupported PEFT settings: bias='all'"),
        (
            {"oft_block_size": 8},
            r"(?s)nothing was allocated.*q_proj\.weight has shape \(4, 120\) in the file; an adapter with the config's "
            r"options on this 64 -> 64 layer holds \(8, 28\)",
        ),
        ({"eps": -1.0}, r"(?s)adapter_config.json: method.options.eps: Input should be greater than 0"),
    ],
    ids=["unknown-type", "bias", "shape", "bad-option"],
)
def test_unfit_peft_adapters_leave_the_model_unchanged(tmp_path: Path, changes: dict, message: str):
    write_peft_oft(tmp_path, **changes)
    model = tiny_llama()
    before = model_checksum(model)
    with pytest.raises(CheckpointError, match=message):
        qadapt.load_peft_adapter(model, tmp_path, backend="bnb4")
    assert model_checksum(model) == before
    assert not list(adapter_layers(model))


def test_methods_without_a_peft_mapping_are_refused(tmp_path: Path):
    model = qadapt.wrap(tiny_llama(), method="rowscale", backend="none", targets="q_proj")
    with pytest.raises(CheckpointError, match="method 'rowscale' has no PEFT mapping"):
        qadapt.save_peft_adapter(model, tmp_path)
