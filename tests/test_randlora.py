"""The ``randlora`` method against PEFT 0.21.2's float RandLora on every backend (real bitsandbytes on CPU)."""

from __future__ import annotations

import warnings

import peft
import pydantic
import pytest
import torch
from peft_reference import (
    TARGET,
    assert_matches_peft,
    float_twin,
    inputs,
    peft_layer,
    peft_model,
    relative,
    trainable_count,
)
from torch import nn

from qadapt import QuantAdapterLinear, registry
from qadapt.errors import ConfigError
from qadapt_randlora import RandLoraBases, RandLoraMethod, RandLoraOptions, generate_bases, scaled_basis

BACKENDS = [("none", {}), ("bnb8", {}), ("bnb4", {"quant_type": "nf4"}), ("bnb4", {"quant_type": "fp4"})]
BACKEND_IDS = ["none", "bnb8", "bnb4-nf4", "bnb4-fp4"]

CASES = [
    (384, 1536, {}),
    (1536, 384, {}),
    (40, 72, {"r": 16, "sparse": True, "alpha": 48.0}),
    (72, 40, {"r": 8, "very_sparse": True, "projection_prng_key": 11}),
    (48, 48, {"r": 10, "projection_prng_key": 3}),
]
CASE_IDS = ["384x1536", "1536x384", "sparse", "very-sparse", "square-r10"]


def peft_config(options: dict) -> peft.RandLoraConfig:
    opts = RandLoraOptions(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.RandLoraConfig(
            target_modules=[TARGET] if TARGET else None,
            r=opts.r,
            randlora_alpha=opts.alpha,
            randlora_dropout=opts.dropout,
            sparse=opts.sparse,
            very_sparse=opts.very_sparse,
            projection_prng_key=opts.projection_prng_key,
            save_projection=opts.save_projection,
            init_weights=opts.init_weights,
        )


def make_layer(in_f: int, out_f: int, options: dict, backend: tuple[str, dict], seed: int = 0) -> QuantAdapterLinear:
    torch.manual_seed(seed)
    name, backend_options = backend
    layer = QuantAdapterLinear(nn.Linear(in_f, out_f), RandLoraMethod(options), name, backend_options=backend_options)
    if not RandLoraOptions(**options).init_weights:
        with torch.no_grad():  # gamma too, so that no factor is a constant
            layer.adapters["default"].gamma.uniform_(-0.05, 0.05)
    return layer


def peft_twin(layer: QuantAdapterLinear, options: dict) -> tuple[nn.Module, nn.Module]:
    model = peft_model(peft_config(options), **{TARGET: float_twin(layer)})
    twin = peft_layer(model)
    adapter = layer.adapters["default"]
    with torch.no_grad():
        twin.randlora_lambda["default"].copy_(adapter.lambda_)
        twin.randlora_gamma["default"].copy_(adapter.gamma)
    return model, twin


@pytest.mark.parametrize(
    "options", [{}, {"projection_prng_key": 7, "r": 8}, {"sparse": True}, {"very_sparse": True, "r": 4}]
)
def test_bases_are_pefts_tensors_for_a_multi_layer_model(options):
    shapes = {"proj": (48, 80), "up": (96, 32), "down": (20, 24)}  # (in, out): largest is (96, 80)
    model = peft_model(
        peft.RandLoraConfig(**{**peft_config(options).to_dict(), "target_modules": list(shapes)}),
        **{name: nn.Linear(i, o) for name, (i, o) in shapes.items()},
    )
    ours = RandLoraMethod(options).create_shared(list(shapes.values()))
    drawn = torch.float32 if options.get("sparse") or options.get("very_sparse") else torch.bfloat16
    theirs_a, theirs_b = model.base_model.randlora_A["default"], model.base_model.randlora_B["default"]
    for mine, theirs in ((ours.basis_a, theirs_a), (ours.basis_b, theirs_b)):
        assert mine.dtype == drawn and mine.shape == theirs.shape
        # PEFT casts its copy to the base layer's dtype (float32 here) after the draw; we keep the drawn dtype.
        assert theirs.dtype == torch.float32
        assert torch.equal(mine.to(theirs.dtype), theirs) and torch.equal(mine, theirs.to(mine.dtype))
    assert ours.basis_a.shape[2] == 80 and ours.basis_b.shape[0] == 96


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(("in_f", "out_f", "options"), CASES, ids=CASE_IDS)
def test_forward_and_merged_weight_equal_peft(backend, in_f, out_f, options):
    options = {**options, "init_weights": False}
    layer = make_layer(in_f, out_f, options, backend)
    model, twin = peft_twin(layer, options)
    assert_matches_peft(layer, model, twin, inputs(in_f))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_identity_at_init_is_bit_identical_to_the_base(backend):
    layer = make_layer(72, 40, {"r": 8}, backend)
    x = inputs(72)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_forward(x))
    adapter = layer.adapters["default"]
    assert not adapter.lambda_.any() and torch.all(adapter.gamma == 1 / max(adapter.gamma.shape))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(("in_f", "out_f"), [(40, 72), (72, 40)], ids=["wide", "narrow"])
def test_only_adapter_gets_gradients_equal_to_peft(backend, in_f, out_f):
    options = {"r": 8, "init_weights": False}
    layer = make_layer(in_f, out_f, options, backend)
    model, twin = peft_twin(layer, options)
    x = inputs(in_f)
    layer(x).square().mean().backward()
    model(x).square().mean().backward()
    adapter = layer.adapters["default"]
    for ours, theirs in (
        (adapter.lambda_, twin.randlora_lambda["default"]),
        (adapter.gamma, twin.randlora_gamma["default"]),
    ):
        assert ours.grad is not None and ours.grad.abs().sum() > 0
        assert relative(ours.grad, theirs.grad) < 1e-5
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["adapters.default.lambda_", "adapters.default.gamma"]
    assert all(p.grad is None for p in layer.base.parameters())
    assert trainable_count(layer) == trainable_count(model) == 8 * 5 + 5 * 40


def test_scaled_basis_gradient_and_what_it_keeps_for_backward():
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 1, 10, dtype=torch.float64, generator=gen)
    lam = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    gamma = torch.randn(3, 10, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(scaled_basis, (basis, lam, gamma))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = scaled_basis(basis, lam, gamma)
    assert out.shape == (4, 3, 10) and sum(saved) == 4 * 10 + 4 * 3 + 3 * 10  # inputs only, not [r, N, d]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", [BACKENDS[0], BACKENDS[2]], ids=["none", "bnb4-nf4"])
def test_forward_in_each_input_dtype(backend, dtype):
    layer = make_layer(40, 72, {"r": 8, "init_weights": False, "alpha": 8.0}, backend)
    x = inputs(40)
    with torch.no_grad():
        reference, out = layer(x), layer(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert relative(out, reference) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_of_a_half_precision_float_layer(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(40, 72).to(dtype)
    reference = linear.weight.detach().float().clone()
    layer = QuantAdapterLinear(linear, RandLoraMethod({"r": 8, "init_weights": False, "alpha": 8.0}), "none")
    expected = layer.methods["default"].merge_weight(layer.adapters["default"], reference)
    x = inputs(40).to(dtype)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert layer.base.weight.dtype == dtype and merged.dtype == dtype
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert relative(layer.base.weight, expected) < tolerance
    assert relative(merged, unmerged) < 5 * tolerance


def test_bnb4_exact_unmerge_is_bit_identical_and_inverse_is_close():
    layer = make_layer(72, 40, {"r": 8, "init_weights": False, "alpha": 0.5}, ("bnb4", {"quant_type": "nf4"}))
    before = layer.backend.snapshot(layer.base)
    original = layer.backend.dequantize_module(layer.base)
    layer.merge()
    assert not layer.backend.get_storage(layer.base).equal(before)
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before)

    result = layer.merge(keep_snapshot=False)
    assert result.delta_retained is not None and result.delta_retained > 0.5
    layer.unmerge("inverse")
    assert relative(layer.backend.dequantize_module(layer.base), original) <= 2 * result.error + 1e-6


def test_unmerge_weight_subtracts_exactly_what_merge_added():
    method = RandLoraMethod({"r": 4, "init_weights": False})
    adapter = method.create_adapter(24, 16, None)
    weight = torch.randn(16, 24)
    delta = adapter.delta_weight().detach()
    assert delta.abs().sum() > 0
    assert torch.equal(method.merge_weight(adapter, weight), weight + delta)
    assert torch.equal(method.unmerge_weight(adapter, weight), weight - delta)


def test_shared_bases_serve_every_layer_and_refuse_a_misfit():
    method = RandLoraMethod({"r": 8})
    shared = method.create_shared([(40, 72), (72, 40), (16, 16)])
    layers = [QuantAdapterLinear(nn.Linear(i, o), method, "none", shared=shared) for i, o in [(40, 72), (72, 40)]]
    assert all(layer.adapters["default"].bases is shared for layer in layers)
    assert not any("basis" in key for layer in layers for key in layer.state_dict())
    with pytest.raises(ConfigError, match="every target's shape"):
        method.create_adapter(100, 40, shared)
    with pytest.raises(ConfigError, match="same r"):
        RandLoraMethod({"r": 4}).create_adapter(40, 72, shared)


def test_projection_tensors_save_and_regenerate():
    options = RandLoraOptions(r=8, projection_prng_key=5, save_projection=False)
    shapes = [(40, 72), (64, 16)]
    bases = generate_bases(options, shapes)
    assert bases.save_projection is False
    tensors = bases.projection_tensors()
    assert set(tensors) == {"randlora_A", "randlora_B"}
    regenerated = generate_bases(options, shapes)
    assert all(torch.equal(tensors[k], regenerated.projection_tensors()[k]) for k in tensors)
    other = generate_bases(options.model_copy(update={"projection_prng_key": 6}), shapes)
    assert not torch.equal(other.basis_a, bases.basis_a)
    other.load_projection_tensors({k: v.clone() for k, v in tensors.items()})
    assert torch.equal(other.basis_a, bases.basis_a) and torch.equal(other.basis_b, bases.basis_b)
    with pytest.raises(ConfigError, match="randlora_B has shape"):
        other.load_projection_tensors({"randlora_A": tensors["randlora_A"], "randlora_B": torch.zeros(3, 3, 8)})
    assert isinstance(other, RandLoraBases)


def test_dropout_is_training_only():
    layer = make_layer(40, 72, {"r": 8, "dropout": 0.5, "init_weights": False}, ("none", {}))
    x = inputs(40)
    layer.eval()
    with torch.no_grad():
        first, second = layer(x), layer(x)
        no_dropout = QuantAdapterLinear(nn.Linear(40, 72), RandLoraMethod({"r": 8}), "none")
        no_dropout.base.load_state_dict(layer.base.state_dict())
        no_dropout.adapters["default"].load_state_dict(layer.adapters["default"].state_dict())
        assert torch.equal(first, second) and torch.equal(first, no_dropout(x))
        layer.train()
        assert not torch.equal(layer(x), first)


def test_options_defaults_follow_peft_and_bad_combinations_are_refused():
    defaults, theirs = RandLoraOptions(), peft.RandLoraConfig()
    assert (defaults.r, defaults.alpha, defaults.projection_prng_key) == (
        theirs.r,
        theirs.randlora_alpha,
        theirs.projection_prng_key,
    )
    assert RandLoraMethod().scaling == 20.0
    with pytest.raises(pydantic.ValidationError, match="exclusive"):
        RandLoraMethod({"sparse": True, "very_sparse": True})
    with pytest.raises(pydantic.ValidationError, match="r"):
        RandLoraMethod({"r": 0})
    assert registry.load("methods", "randlora") is RandLoraMethod
