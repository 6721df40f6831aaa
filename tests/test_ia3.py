"""The ``ia3`` method against PEFT 0.21.2's (IA)³ on float and quantized backends (real bitsandbytes, CPU)."""

from __future__ import annotations

import peft
import pytest
import torch
from peft_reference import TARGET, float_twin, inputs, peft_layer, peft_model, relative, trainable_count
from tiny_models import model_output, perturb_adapters, tiny_bert, token_ids
from torch import nn

import qadapt
from qadapt import QuantAdapterLinear, testing
from qadapt.errors import ConfigError
from qadapt.model.wrap import adapter_layers
from qadapt_ia3 import IA3Method

BACKENDS = [("none", {}), ("bnb8", {}), ("bnb4", {"quant_type": "nf4"}), ("hqq", {"nbits": 4, "group_size": 64})]
BACKEND_IDS = ["none", "bnb8", "bnb4-nf4", "hqq-4bit"]
SHAPES = [(64, 48), (48, 96)]


def make_layer(in_f: int, out_f: int, feedforward: bool, backend: tuple[str, dict], **options) -> QuantAdapterLinear:
    torch.manual_seed(0)
    method = IA3Method({"feedforward_modules": [TARGET] if feedforward else None, **options}).for_layer(TARGET)
    name, backend_options = backend
    layer = QuantAdapterLinear(nn.Linear(in_f, out_f), method, name, backend_options=backend_options)
    with torch.no_grad():
        scales = layer.adapters["default"].ia3_l
        scales.add_(torch.randn(scales.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    return layer


def peft_twin(layer: QuantAdapterLinear, feedforward: bool) -> tuple[nn.Module, nn.Module]:
    """PEFT's IA³ on a float linear holding ``layer``'s dequantized weight and bias, with our scales."""
    config = peft.IA3Config(target_modules=[TARGET], feedforward_modules=[TARGET] if feedforward else [])
    model = peft_model(config, **{TARGET: float_twin(layer)})
    twin = peft_layer(model)
    with torch.no_grad():
        twin.ia3_l["default"].copy_(layer.adapters["default"].ia3_l)
    return model, twin


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(("in_f", "out_f"), SHAPES, ids=["64x48", "48x96"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_forward_gradients_merged_weight_and_bias_equal_peft(feedforward, in_f, out_f, backend):
    layer = make_layer(in_f, out_f, feedforward, backend)
    model, twin = peft_twin(layer, feedforward)
    x = inputs(in_f)
    ours, theirs = layer(x), model(x)
    assert relative(ours, theirs) <= 1e-6
    ours.square().mean().backward()
    theirs.square().mean().backward()
    mine, reference = layer.adapters["default"].ia3_l, twin.ia3_l["default"]
    assert mine.shape == reference.shape == ((1, in_f) if feedforward else (out_f, 1))
    assert mine.grad.abs().sum() > 0 and relative(mine.grad, reference.grad) <= 1e-5
    assert trainable_count(layer) == trainable_count(model)
    method, adapter = layer.methods["default"], layer.adapters["default"]
    with torch.no_grad():
        weight, bias = twin.base_layer.weight.clone(), twin.base_layer.bias.clone()
        merged = method.merge_weight(adapter, weight)
        merged_bias = method.merge_bias(adapter, bias)
        twin.merge()
    assert relative(merged, twin.base_layer.weight) <= 1e-7
    if feedforward:
        assert merged_bias is None and torch.equal(twin.base_layer.bias, bias)
    else:  # PEFT scales the bias too: a merge that left it would be off by l ⊙ b
        assert relative(merged_bias, twin.base_layer.bias) <= 1e-7
        assert relative(merged_bias, bias) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_merge_keeps_the_output_and_exact_unmerge_gives_weight_and_bias_back(feedforward, backend):
    layer = make_layer(64, 48, feedforward, backend).eval()
    x = inputs(64)
    before, bias_before = layer.backend.snapshot(layer.base), layer.bias_tensor
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        merged = layer(x)
    assert layer.bias_tensor is not bias_before if not feedforward else layer.bias_tensor is bias_before
    assert relative(merged, unmerged) <= 3 * result.error + 1e-6
    if backend[0] == "bnb8" and not feedforward:
        # A row scale folds into bnb8's row scales: no code moves, the merge is exact to float rounding.
        assert result.path == "storage" and relative(merged, unmerged) <= 1e-6
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before)
    assert layer.bias_tensor is bias_before


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_inverse_unmerge_divides_weight_and_bias(feedforward):
    layer = make_layer(64, 48, feedforward, ("none", {}))
    weight, bias = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    layer.merge(keep_snapshot=False)
    layer.unmerge("inverse")
    assert relative(layer.base.weight, weight) <= 1e-6 and relative(layer.base.bias, bias) <= 1e-6


@pytest.mark.parametrize("init", [True, False], ids=["ones", "random"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_seeded_initialisation_is_peft_bit_for_bit(feedforward, init):
    linear = nn.Linear(64, 48)
    method = IA3Method({"feedforward_modules": [TARGET] if feedforward else None, "init_weights": init})
    torch.manual_seed(5)
    ours = QuantAdapterLinear(linear, method.for_layer(TARGET), "none").adapters["default"].ia3_l
    config = peft.IA3Config(
        target_modules=[TARGET], feedforward_modules=[TARGET] if feedforward else [], init_ia3_weights=init
    )
    other = nn.Linear(64, 48)
    torch.manual_seed(5)
    theirs = peft_layer(peft_model(config, **{TARGET: other})).ia3_l["default"]
    assert torch.equal(ours, theirs)
    assert bool((ours == 1).all()) == init


def bert_with_ia3(feedforward_modules):
    return qadapt.wrap(
        tiny_bert(),
        method="ia3",
        backend="none",
        targets=["query", "value", "output.dense"],
        method_options={"feedforward_modules": feedforward_modules},
    )


@pytest.mark.parametrize(
    "feedforward_modules", [["output.dense"], r".*layer\.\d\.output\.dense"], ids=["suffixes", "regex"]
)
def test_feedforward_modules_choose_layers_by_name_as_peft(feedforward_modules):
    model = bert_with_ia3(feedforward_modules)
    shapes = {name: tuple(layer.adapters["default"].ia3_l.shape) for name, layer in adapter_layers(model)}
    # "attention.output.dense" ends with "output.dense" too: PEFT's suffix rule, kept.
    for name, shape in shapes.items():
        if isinstance(feedforward_modules, list):
            feedforward = name.endswith("output.dense")
        else:
            feedforward = "attention" not in name and name.endswith("output.dense")
        assert shape == ((1, 64 if "attention" in name else 128) if feedforward else (64, 1)), name
    perturb_adapters(model, scale=0.2)
    twin = peft.get_peft_model(
        tiny_bert(),
        peft.IA3Config(target_modules=["query", "value", "output.dense"], feedforward_modules=feedforward_modules),
    )
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            twin.base_model.model.get_submodule(name).ia3_l["default"].copy_(layer.adapters["default"].ia3_l)
        ids = token_ids()
        assert relative(model_output(model, ids), model_output(twin, ids)) <= 1e-6
        # Merged (bias included) and unwrapped to float: still PEFT's adapted output.
        twin.merge_adapter()
        qadapt.merge(model)
        assert relative(model_output(model, ids), model_output(twin, ids)) <= 1e-6
        qadapt.unmerge(model)
        qadapt.unwrap(model, merge="float")
        assert relative(model_output(model, ids), model_output(twin, ids)) <= 1e-6


def test_a_bad_feedforward_regex_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"method\.options\.feedforward_modules.*not a valid regular expression"):
        bert_with_ia3("(unclosed")
    with pytest.raises(ConfigError, match=r"method\.options\.feedforward_modules.*non-empty"):
        bert_with_ia3([""])


@pytest.mark.parametrize("backend", ["none", "bnb4", "hqq"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_contract(feedforward, backend):
    method = IA3Method({"feedforward_modules": ["proj"] if feedforward else None}).for_layer("proj")
    assert method.feedforward is feedforward
    testing.check_method(method, backend=backend)


def test_add_adapter_and_qadapt_checkpoints_keep_the_feedforward_layers(tmp_path):
    model = bert_with_ia3(None)
    qadapt.add_adapter(model, "second", "ia3", method_options={"feedforward_modules": ["intermediate.dense"]})
    assert not any(layer.adapters["second"].feedforward for _, layer in adapter_layers(model))  # not a target
    qadapt.delete_adapter(model, "second")
    qadapt.add_adapter(model, "ff", "ia3", method_options={"feedforward_modules": ["output.dense"]})
    kinds = {name: layer.adapters["ff"].feedforward for name, layer in adapter_layers(model)}
    assert kinds == {name: name.endswith("output.dense") for name in kinds} and any(kinds.values())
    perturb_adapters(model, scale=0.2)
    qadapt.save_adapter(model, tmp_path / "ff", adapter_name="ff")
    loaded = qadapt.load_adapter(tiny_bert(), tmp_path / "ff")
    ids = token_ids()
    qadapt.set_adapter(model, "ff")
    with torch.no_grad():
        assert torch.equal(model_output(loaded, ids), model_output(model, ids))


def test_a_failed_whole_model_merge_gives_every_bias_back():
    model = bert_with_ia3(["output.dense"])
    perturb_adapters(model, scale=0.2)
    layers = list(adapter_layers(model))
    biases = {name: layer.bias_tensor for name, layer in layers}
    with torch.no_grad():
        layers[-1][1].adapters["default"].ia3_l.fill_(float("inf"))
    with pytest.raises(qadapt.errors.UnsafeMergeError):
        qadapt.merge(model)
    assert all(layer.bias_tensor is biases[name] and not layer.merged for name, layer in layers)
