"""The ``loha`` and ``lokr`` methods against PEFT 0.21.2's LoHa / LoKr on float and quantized backends."""

from __future__ import annotations

import peft
import pytest
import torch
from peft_reference import TARGET, float_twin, inputs, peft_layer, peft_model, relative, trainable_count
from tiny_models import model_output, perturb_adapters, tiny_llama, token_ids
from torch import nn

import qadapt
from qadapt import QuantAdapterLinear
from qadapt.errors import ConfigError
from qadapt.model.wrap import adapter_layers
from qadapt_loha import LohaMethod
from qadapt_lokr import LokrMethod

BACKENDS = [("none", {}), ("bnb8", {}), ("bnb4", {"quant_type": "nf4"}), ("hqq", {"nbits": 4, "group_size": 16})]
BACKEND_IDS = ["none", "bnb8", "bnb4-nf4", "hqq-4bit"]
METHODS = {"loha": (LohaMethod, peft.LoHaConfig), "lokr": (LokrMethod, peft.LoKrConfig)}

# (method, in, out, options): non-square both ways; LoKr's factors whole, decomposed, both decomposed.
CASES = [
    ("loha", 64, 48, {"r": 4, "alpha": 16}),
    ("loha", 48, 96, {"r": 8, "alpha": 2}),
    ("lokr", 64, 48, {"r": 8, "alpha": 4}),
    ("lokr", 64, 48, {"r": 2, "decompose_both": True}),
    ("lokr", 96, 48, {"r": 1, "decompose_factor": 4, "alpha": 3}),
]
CASE_IDS = ["loha-64x48", "loha-48x96", "lokr-whole", "lokr-decompose-both", "lokr-factor-4"]


def make_layer(method: str, in_f: int, out_f: int, options: dict, backend: tuple[str, dict]) -> QuantAdapterLinear:
    torch.manual_seed(0)
    name, backend_options = backend
    cls = METHODS[method][0]
    layer = QuantAdapterLinear(nn.Linear(in_f, out_f), cls(options), name, backend_options=backend_options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in layer.adapters.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return layer


def peft_twin(layer: QuantAdapterLinear, method: str, options: dict) -> tuple[nn.Module, nn.Module]:
    model = peft_model(METHODS[method][1](target_modules=[TARGET], **options), **{TARGET: float_twin(layer)})
    twin = peft_layer(model)
    with torch.no_grad():
        for key, param in layer.adapters["default"].named_parameters():
            getattr(twin, key)["default"].copy_(param)
    return model, twin


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(("method", "in_f", "out_f", "options"), CASES, ids=CASE_IDS)
def test_forward_gradients_and_merged_weight_equal_peft(method, in_f, out_f, options, backend):
    layer = make_layer(method, in_f, out_f, options, backend)
    model, twin = peft_twin(layer, method, options)
    ours_keys = sorted(k for k, _ in layer.adapters["default"].named_parameters())
    assert ours_keys == sorted(k for k in twin.adapter_layer_names if "default" in getattr(twin, k))
    x = inputs(in_f)
    ours, theirs = layer(x), model(x)
    assert relative(ours, theirs) <= 1e-6
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for key, param in layer.adapters["default"].named_parameters():
        assert param.grad.abs().sum() > 0 and relative(param.grad, getattr(twin, key)["default"].grad) <= 1e-5, key
    assert trainable_count(layer) == trainable_count(model)
    with torch.no_grad():
        merged = layer.methods["default"].merge_weight(layer.adapters["default"], twin.base_layer.weight.clone())
        twin.merge()
    assert relative(merged, twin.base_layer.weight) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_fresh_adapter_is_a_no_op_and_merge_round_trips(method, backend):
    torch.manual_seed(0)
    fresh = QuantAdapterLinear(nn.Linear(64, 48), method, backend[0], backend_options=backend[1])
    x = inputs(64)
    with torch.no_grad():
        assert torch.equal(fresh(x), fresh.base_forward(x))
    layer = make_layer(method, 64, 48, {"r": 4}, backend).eval()
    before = layer.backend.snapshot(layer.base)
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        assert relative(layer(x), unmerged) <= 3 * result.error + 1e-6
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("loha", {"r": 4}),
        ("loha", {"r": 4, "init_weights": False}),
        ("lokr", {"r": 8}),
        ("lokr", {"r": 2, "decompose_both": True}),
        ("lokr", {"r": 2, "decompose_both": True, "init_weights": "lycoris"}),
        ("lokr", {"r": 8, "init_weights": "lycoris"}),
        ("lokr", {"r": 2, "init_weights": False}),
    ],
    ids=["loha", "loha-random", "lokr", "lokr-both", "lokr-both-lycoris", "lokr-lycoris", "lokr-random"],
)
def test_seeded_initialisation_is_peft_bit_for_bit(method, options):
    linear, other = nn.Linear(64, 48), nn.Linear(64, 48)
    torch.manual_seed(5)
    ours = QuantAdapterLinear(linear, METHODS[method][0](options), "none").adapters["default"]
    torch.manual_seed(5)
    twin = peft_layer(peft_model(METHODS[method][1](target_modules=[TARGET], **options), **{TARGET: other}))
    for key, param in ours.named_parameters():
        assert torch.equal(param, getattr(twin, key)["default"]), key


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("loha", {"r": 4, "rank_dropout": 0.4, "module_dropout": 0.3}),
        ("lokr", {"r": 2, "rank_dropout": 0.4, "module_dropout": 0.3, "rank_dropout_scale": True}),
        ("lokr", {"r": 2, "rank_dropout": 0.4}),
    ],
    ids=["loha", "lokr-scaled", "lokr"],
)
def test_rank_and_module_dropout_draw_peft_s_masks(method, options):
    layer = make_layer(method, 64, 48, options, ("none", {}))
    model, _ = peft_twin(layer, method, options)
    layer.train(), model.train()
    x = inputs(64)
    outputs = []
    for seed in range(6):  # some forwards drop the whole module, the others a different set of rows
        torch.manual_seed(seed)
        ours = layer(x)
        torch.manual_seed(seed)
        assert relative(ours, model(x)) <= 1e-6, seed
        outputs.append(ours)
    with torch.no_grad():
        assert not torch.equal(outputs[0], layer.eval()(x))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_rank_and_alpha_patterns_choose_per_layer_as_peft(method):
    options = {"r": 4, "alpha": 8, "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 8}}
    options["alpha_pattern"] = {"q_proj": 3.0}
    targets = ["q_proj", "v_proj", "down_proj"]
    model = qadapt.wrap(tiny_llama(), method=method, backend="none", targets=targets, method_options=options)
    ranks = {name: layer.adapters["default"].r for name, layer in adapter_layers(model)}
    assert ranks["model.layers.0.self_attn.v_proj"] == 2 and ranks["model.layers.1.mlp.down_proj"] == 8
    assert ranks["model.layers.0.mlp.down_proj"] == 4
    scaling = {name: layer.adapters["default"].scaling for name, layer in adapter_layers(model)}
    assert scaling["model.layers.1.self_attn.q_proj"] == 3.0 / 4
    perturb_adapters(model, scale=0.1)
    twin = peft.get_peft_model(tiny_llama(), METHODS[method][1](target_modules=targets, **options))
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            theirs = twin.base_model.model.get_submodule(name)
            for key, param in layer.adapters["default"].named_parameters():
                getattr(theirs, key)["default"].copy_(param)
        ids = token_ids()
        assert relative(model_output(model, ids), model_output(twin, ids)) <= 1e-6


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("loha", {"r": 0}, r"method\.options\.r: Input should be greater than or equal to 1"),
        ("loha", {"module_dropout": 1.0}, r"method\.options\.module_dropout: Input should be less than 1"),
        ("loha", {"alpha": float("inf")}, r"method\.options\.alpha: Input should be a finite number"),
        ("lokr", {"rank_pattern": {"q_proj": 0}}, r"method\.options\.rank_pattern.*ranks must be 1 to 65536"),
        ("lokr", {"rank_pattern": {"(": 2}}, r"method\.options\.rank_pattern.*not a valid regular expression"),
        ("lokr", {"decompose_factor": 0}, r"decompose_factor=0 is not a factor"),
        ("lokr", {"init_weights": "pissa"}, r"method\.options\.init_weights"),
    ],
    ids=["r", "module-dropout", "alpha", "rank-pattern", "pattern-regex", "factor", "init"],
)
def test_out_of_range_options_are_config_errors_naming_the_field(method, options, message):
    with pytest.raises(ConfigError, match=message):
        qadapt.wrap(tiny_llama(), method=method, backend="none", targets="q_proj", method_options=options)
