"""The ``vera`` method against PEFT 0.21.2's VeRA on float and quantized backends (real bitsandbytes, CPU)."""

from __future__ import annotations

import peft
import pytest
import torch
from peft_reference import TARGET, float_twin, inputs, peft_layer, peft_model, relative, trainable_count
from tiny_models import model_output, tiny_llama, token_ids
from torch import nn

import qadapt
from qadapt import QuantAdapterLinear
from qadapt.errors import ConfigError
from qadapt.model.layers import shared_state
from qadapt.model.wrap import adapter_layers
from qadapt_vera import VeraMethod, VeraOptions

BACKENDS = [
    ("none", {}),
    ("bnb8", {}),
    ("bnb4", {"quant_type": "nf4"}),
    ("torchao", {"config": "int4", "group_size": 16}),
]
BACKEND_IDS = ["none", "bnb8", "bnb4-nf4", "torchao-int4"]
CASES = [(64, 48, {"r": 8}), (48, 96, {"r": 16, "d_initial": 0.5}), (32, 64, {"r": 80})]
CASE_IDS = ["64x48", "48x96", "r-above-both"]


def peft_config(options: dict, **extra) -> peft.VeraConfig:
    opts = VeraOptions(**options)
    return peft.VeraConfig(
        target_modules=[TARGET],
        r=opts.r,
        d_initial=opts.d_initial,
        vera_dropout=opts.dropout,
        projection_prng_key=opts.projection_prng_key,
        init_weights=opts.init_weights,
        **extra,
    )


def make_layer(in_f: int, out_f: int, options: dict, backend: tuple[str, dict]) -> QuantAdapterLinear:
    torch.manual_seed(0)
    name, backend_options = backend
    layer = QuantAdapterLinear(nn.Linear(in_f, out_f), VeraMethod(options), name, backend_options=backend_options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in layer.adapters.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return layer


def peft_twin(layer: QuantAdapterLinear, options: dict) -> tuple[nn.Module, nn.Module]:
    model = peft_model(peft_config(options), **{TARGET: float_twin(layer)})
    twin = peft_layer(model)
    adapter = layer.adapters["default"]
    with torch.no_grad():
        twin.vera_lambda_b["default"].copy_(adapter.vera_lambda_b)
        twin.vera_lambda_d["default"].copy_(adapter.vera_lambda_d)
    return model, twin


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(("in_f", "out_f", "options"), CASES, ids=CASE_IDS)
def test_forward_gradients_and_merged_weight_equal_peft(in_f, out_f, options, backend):
    layer = make_layer(in_f, out_f, options, backend)
    model, twin = peft_twin(layer, options)
    adapter = layer.adapters["default"]
    # The shared projections are PEFT's draw, bit for bit.
    assert torch.equal(adapter.projections.vera_A, twin.vera_A["default"])
    assert torch.equal(adapter.projections.vera_B, twin.vera_B["default"])
    x = inputs(in_f)
    ours, theirs = layer(x), model(x)
    assert relative(ours, theirs) <= 1e-6
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for key in ("vera_lambda_b", "vera_lambda_d"):
        mine, reference = getattr(adapter, key), getattr(twin, key)["default"]
        assert mine.grad.abs().sum() > 0 and relative(mine.grad, reference.grad) <= 1e-5
    assert trainable_count(layer) == trainable_count(model) == out_f + options["r"]
    with torch.no_grad():
        merged = layer.methods["default"].merge_weight(adapter, twin.base_layer.weight.clone())
        twin.merge()
    assert relative(merged, twin.base_layer.weight) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_fresh_adapter_is_a_no_op_and_merge_round_trips(backend):
    torch.manual_seed(0)
    layer = QuantAdapterLinear(
        nn.Linear(64, 48), "vera", backend[0], backend_options=backend[1], method_options={"r": 8}
    )
    x = inputs(64)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_forward(x))
    make = make_layer(64, 48, {"r": 8}, backend).eval()
    before = make.backend.snapshot(make.base)
    with torch.no_grad():
        unmerged = make(x)
        result = make.merge()
        assert relative(make(x), unmerged) <= 3 * result.error + 1e-6
    make.unmerge("exact")
    assert make.backend.get_storage(make.base).equal(before)


def test_seeded_initialisation_and_projections_are_peft_s_over_a_model():
    targets = ["q_proj", "v_proj", "down_proj", "up_proj"]
    options = {"r": 8, "init_weights": False, "projection_prng_key": 11}
    # tiny_llama() seeds the global generator: both adapters draw lambda_d from the same state, layer by layer.
    model = qadapt.wrap(tiny_llama(), method="vera", backend="none", targets=targets, method_options=options)
    twin = peft.get_peft_model(
        tiny_llama(), peft.VeraConfig(target_modules=targets, r=8, init_weights=False, projection_prng_key=11)
    )
    projections = shared_state(model)["default"]
    # Sized by the largest target: in = 128 (down_proj), out = 128 (up_proj).
    assert tuple(projections.vera_A.shape) == (8, 128) and tuple(projections.vera_B.shape) == (128, 8)
    assert torch.equal(projections.vera_A, twin.base_model.vera_A["default"])
    for name, layer in adapter_layers(model):
        theirs = twin.base_model.model.get_submodule(name)
        assert torch.equal(layer.adapters["default"].vera_lambda_d, theirs.vera_lambda_d["default"]), name
        assert torch.equal(layer.adapters["default"].vera_lambda_b, theirs.vera_lambda_b["default"]), name
    ids = token_ids()
    with torch.no_grad():
        assert relative(model_output(model, ids), model_output(twin, ids)) <= 1e-6


def test_dropout_draws_the_same_mask_as_peft():
    options = {"r": 8, "dropout": 0.3}
    layer = make_layer(64, 48, options, ("none", {}))
    model, _ = peft_twin(layer, options)
    layer.train(), model.train()
    x = inputs(64)
    torch.manual_seed(11)
    ours = layer(x)
    torch.manual_seed(11)
    theirs = model(x)
    assert relative(ours, theirs) <= 1e-6
    with torch.no_grad():
        assert not torch.equal(ours, layer.eval()(x))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, r"method\.options\.r: Input should be greater than or equal to 1"),
        ({"dropout": 1.0}, r"method\.options\.dropout: Input should be less than 1"),
        ({"d_initial": float("nan")}, r"method\.options\.d_initial: Input should be a finite number"),
        ({"projection_prng_key": -1}, r"method\.options\.projection_prng_key: Input should be greater than or equal"),
    ],
    ids=["r", "dropout", "d-initial", "key"],
)
def test_out_of_range_options_are_config_errors_naming_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        qadapt.wrap(tiny_llama(), method="vera", backend="none", targets="q_proj", method_options=options)


def test_projections_that_do_not_fit_a_layer_are_refused():
    method = VeraMethod({"r": 4})
    small = method.create_shared([(16, 8)])
    with pytest.raises(ConfigError, match="cannot serve a layer with in_features=32"):
        method.create_adapter(32, 8, small)
