"""``qalora`` (QA-LoRA) against PEFT 0.21.2's QA-LoRA math, and its exact merge into hqq's zero points.

PEFT runs QA-LoRA only on GPTQ layers; the reference here is PEFT's own ``QALoraLinearVariant``
(``init`` and ``forward``) applied to PEFT's LoRA layer on a float linear holding the dequantized weight.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.variants import QALoraLinearVariant
from peft_reference import TARGET, float_twin, inputs, peft_layer, peft_model, relative
from safetensors.torch import save_file
from tiny_models import model_output, perturb_adapters, tiny_llama, token_ids
from torch import nn

import qadapt
from qadapt import QuantAdapterLinear
from qadapt.errors import ConfigError
from qadapt.model.wrap import adapter_layers
from qadapt_lora import QALoraMethod

BACKENDS = [("none", {}), ("bnb8", {}), ("bnb4", {"quant_type": "nf4"}), ("hqq", {"nbits": 4, "group_size": 16})]
BACKEND_IDS = ["none", "bnb8", "bnb4-nf4", "hqq-4bit-g16"]


def make_layer(options: dict, backend: tuple[str, dict], in_f: int = 64, out_f: int = 48) -> QuantAdapterLinear:
    torch.manual_seed(0)
    name, backend_options = backend
    layer = QuantAdapterLinear(nn.Linear(in_f, out_f), QALoraMethod(options), name, backend_options=backend_options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in layer.adapters.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return layer


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(
    "options",
    [{"r": 4, "alpha": 8, "group_size": 16}, {"r": 8, "alpha": 4, "group_size": 32, "use_rslora": True}],
    ids=["g16", "g32-rslora"],
)
def test_forward_gradients_and_merged_weight_equal_peft_s_qalora(options, backend):
    layer = make_layer(options, backend)
    config = peft.LoraConfig(
        target_modules=[TARGET],
        r=options["r"],
        lora_alpha=options["alpha"],
        use_rslora=options.get("use_rslora", False),
        use_qalora=True,
        qalora_group_size=options["group_size"],
    )
    model = peft_model(config, **{TARGET: float_twin(layer)})
    twin = peft_layer(model)
    QALoraLinearVariant.init(twin, "default", config)
    adapter = layer.adapters["default"]
    assert (
        adapter.lora_A.weight.shape
        == twin.lora_A["default"].weight.shape
        == (options["r"], 64 // options["group_size"])
    )
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(adapter.lora_A.weight)
        twin.lora_B["default"].weight.copy_(adapter.lora_B.weight)
    x = inputs(64)
    ours = layer(x)
    theirs = QALoraLinearVariant.forward(twin, "default", x, twin.base_layer(x))
    assert relative(ours, theirs) <= 1e-6
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for mine, reference in [
        (adapter.lora_A.weight, twin.lora_A["default"].weight),
        (adapter.lora_B.weight, twin.lora_B["default"].weight),
    ]:
        assert mine.grad.abs().sum() > 0 and relative(mine.grad, reference.grad) <= 1e-5
    # PEFT has no QA-LoRA merge; a plain linear on the merged weight must give its forward.
    with torch.no_grad():
        merged = layer.methods["default"].merge_weight(adapter, twin.base_layer.weight.clone())
        assert relative(nn.functional.linear(x, merged, twin.base_layer.bias), theirs) <= 1e-6


@pytest.mark.parametrize(
    ("hqq_group", "qalora_group", "compute_dtype", "bound"),
    [(16, 16, "float32", 1e-6), (16, 32, "float32", 1e-6), (64, 64, "float32", 1e-6), (16, 16, "bfloat16", 1e-2)],
    ids=["g16", "g32-over-g16", "g64", "bf16-zeros"],
)
def test_merge_into_hqq_zero_points_is_exact_and_keeps_codes_and_scales(hqq_group, qalora_group, compute_dtype, bound):
    backend = ("hqq", {"nbits": 4, "group_size": hqq_group, "compute_dtype": compute_dtype})
    layer = make_layer({"r": 4, "group_size": qalora_group}, backend).eval()
    x = inputs(64)
    before = layer.backend.get_storage(layer.base)
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        merged = layer(x)
    after = layer.backend.get_storage(layer.base)
    assert result.path == "storage" and not result.reverted
    assert torch.equal(after.tensors["W_q"], before.tensors["W_q"]) and torch.equal(
        after.tensors["scale"], before.tensors["scale"]
    )
    assert not torch.equal(after.tensors["zero"], before.tensors["zero"])
    assert relative(merged, unmerged) <= bound, relative(merged, unmerged)
    assert result.error <= bound
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before)


def test_merge_elsewhere_requantizes_and_says_why():
    with pytest.warns(UserWarning, match="backend 'bnb4' does not declare"):
        result = make_layer({"r": 4, "group_size": 16}, ("bnb4", {})).merge()
    assert result.path in ("keep", "fresh")
    with pytest.warns(
        UserWarning, match="group_size=8 is not a multiple of backend 'hqq'.s quantization group size 16"
    ):
        result = make_layer({"r": 4, "group_size": 8}, ("hqq", {"nbits": 4, "group_size": 16})).merge()
    assert result.path != "storage"
    with pytest.warns(UserWarning, match="axis=0 are runs down the columns"):
        make_layer({"r": 4, "group_size": 16}, ("hqq", {"nbits": 4, "group_size": 16, "axis": 0})).merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_layer({"r": 4}, ("none", {})).merge().path == "fresh"  # a float base merges exactly anyway


def test_peft_checkpoints_both_ways(tmp_path):
    targets = ["q_proj", "down_proj"]
    model = qadapt.wrap(tiny_llama(), method="qalora", backend="none", targets=targets, method_options={"r": 4})
    perturb_adapters(model, scale=0.1)
    ids = token_ids()
    with torch.no_grad():
        expected = model_output(model, ids)
    qadapt.save_peft_adapter(model, tmp_path / "ours")
    config = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert config.use_qalora and config.qalora_group_size == 16 and not config.use_dora
    back = qadapt.load_peft_adapter(tiny_llama(), tmp_path / "ours", backend="hqq", backend_options={"group_size": 16})
    assert {layer.methods["default"].name for _, layer in adapter_layers(back)} == {"qalora"}
    twin_of_back = qadapt.load_peft_adapter(tiny_llama(), tmp_path / "ours")
    with torch.no_grad():
        assert relative(model_output(twin_of_back, ids), expected) <= 1e-6
        quantized = model_output(back, ids)
        qadapt.merge(back)
        assert relative(model_output(back, ids), quantized) <= 1e-6  # exact into the zero points
    # A directory whose config PEFT itself wrote.
    directory = tmp_path / "peft"
    peft.LoraConfig(target_modules=targets, r=4, use_qalora=True, qalora_group_size=32).save_pretrained(directory)
    tensors = {}
    for name, layer in adapter_layers(model):
        if name.endswith("q_proj"):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, 2)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(layer.out_features, 4)
        else:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, 4)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(layer.out_features, 4)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    loaded = qadapt.load_peft_adapter(tiny_llama(), directory)
    groups = {name: layer.adapters["default"].group_size for name, layer in adapter_layers(loaded)}
    assert set(groups.values()) == {32}
    assert json.loads((directory / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_group_size_that_does_not_divide_is_a_config_error_with_the_closest_values():
    with pytest.raises(
        ConfigError, match=r"method\.options\.group_size=24 does not divide the layer's in_features=64.*16 or 32"
    ):
        qadapt.wrap(tiny_llama(), method="qalora", backend="none", targets="q_proj", method_options={"group_size": 24})
    with pytest.raises(ConfigError, match=r"method\.options\.group_size: Input should be greater than or equal to 1"):
        qadapt.wrap(tiny_llama(), method="qalora", backend="none", targets="q_proj", method_options={"group_size": 0})
