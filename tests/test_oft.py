"""The ``oft`` method against PEFT 0.21.2's OFT on every backend (real bitsandbytes on CPU)."""

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
from qadapt_oft import OFTMethod, OFTOptions, rotation

BACKENDS = [("none", {}), ("bnb8", {}), ("bnb4", {"quant_type": "nf4"}), ("bnb4", {"quant_type": "fp4"})]
BACKEND_IDS = ["none", "bnb8", "bnb4-nf4", "bnb4-fp4"]

# (in, out, options): the two required non-square shapes, then every variant of the parametrization.
CASES = [
    (384, 1536, {"block_size": 32}),
    (1536, 384, {"r": 24}),
    (96, 64, {"block_size": 16, "block_share": True}),
    (64, 96, {"block_size": 8, "coft": True, "eps": 1e-3}),
    (96, 48, {"block_size": 16, "use_cayley_neumann": False}),
    (64, 32, {"block_size": 8, "num_cayley_neumann_terms": 3}),
    (64, 32, {"block_size": 8, "num_cayley_neumann_terms": 7}),
]
CASE_IDS = ["384x1536-b32", "1536x384-r24", "share", "coft", "exact-cayley", "neumann3", "neumann7"]


def peft_config(options: dict) -> peft.OFTConfig:
    """The PEFT config equivalent to our options (PEFT takes one of r / oft_block_size, the other 0)."""
    opts = OFTOptions(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.OFTConfig(
            target_modules=[TARGET],
            r=opts.r or 0,
            oft_block_size=0 if opts.r else (opts.block_size or 32),
            block_share=opts.block_share,
            coft=opts.coft,
            eps=opts.eps,
            use_cayley_neumann=opts.use_cayley_neumann,
            num_cayley_neumann_terms=opts.num_cayley_neumann_terms,
            module_dropout=opts.module_dropout,
            init_weights=opts.init_weights,
        )


def make_layer(in_f: int, out_f: int, options: dict, backend: tuple[str, dict], seed: int = 0) -> QuantAdapterLinear:
    torch.manual_seed(seed)
    name, backend_options = backend
    return QuantAdapterLinear(nn.Linear(in_f, out_f), OFTMethod(options), name, backend_options=backend_options)


def peft_twin(layer: QuantAdapterLinear, options: dict) -> tuple[nn.Module, nn.Module]:
    """PEFT's OFT on a float linear holding ``layer``'s dequantized weight, with our adapter values."""
    model = peft_model(peft_config(options), **{TARGET: float_twin(layer)})
    twin = peft_layer(model)
    with torch.no_grad():
        twin.oft_R["default"].weight.copy_(layer.adapters["default"].weight)
    return model, twin


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(("in_f", "out_f", "options"), CASES, ids=CASE_IDS)
def test_forward_and_merged_weight_equal_peft(backend, in_f, out_f, options):
    options = {**options, "init_weights": False}
    layer = make_layer(in_f, out_f, options, backend)
    model, twin = peft_twin(layer, options)
    assert_matches_peft(layer, model, twin, inputs(in_f))


def test_bnb8_eval_forward_is_peft_up_to_int8_activations():
    layer = make_layer(96, 64, {"block_size": 16, "init_weights": False}, ("bnb8", {}))
    model, _ = peft_twin(layer, {"block_size": 16, "init_weights": False})
    layer.eval()
    with torch.no_grad():
        error = relative(layer(inputs(96)), model(inputs(96)))
    assert 0 < error < 3e-2


@pytest.mark.parametrize("exact", [False, True], ids=["neumann", "exact"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_identity_at_init_is_bit_identical_to_the_base(backend, exact):
    layer = make_layer(96, 48, {"block_size": 16, "use_cayley_neumann": not exact}, backend)
    x = inputs(96)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_forward(x))
    assert not layer.adapters["default"].weight.any()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("share", [False, True], ids=["blocks", "shared"])
def test_only_adapter_gets_gradients_equal_to_peft(backend, share):
    options = {"block_size": 16, "block_share": share, "init_weights": False}
    layer = make_layer(64, 48, options, backend)
    model, twin = peft_twin(layer, options)
    x = inputs(64)
    layer(x).square().mean().backward()
    model(x).square().mean().backward()
    ours = layer.adapters["default"].weight
    assert ours.grad is not None and ours.grad.abs().sum() > 0
    assert relative(ours.grad, twin.oft_R["default"].weight.grad) < 1e-5
    assert all(p.grad is None and not p.requires_grad for p in layer.base.parameters())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["adapters.default.weight"]
    assert trainable_count(layer) == trainable_count(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", [BACKENDS[0], BACKENDS[2]], ids=["none", "bnb4-nf4"])
def test_forward_in_each_input_dtype(backend, dtype):
    layer = make_layer(64, 32, {"block_size": 8, "init_weights": False}, backend)
    x = inputs(64)
    with torch.no_grad():
        reference, out = layer(x), layer(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert relative(out, reference) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_of_a_half_precision_float_layer(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(dtype)
    reference = linear.weight.detach().float().clone()
    layer = QuantAdapterLinear(linear, OFTMethod({"block_size": 8, "init_weights": False}), "none")
    expected = layer.methods["default"].merge_weight(layer.adapters["default"], reference)
    x = inputs(64).to(dtype)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert layer.base.weight.dtype == dtype and merged.dtype == dtype
    assert torch.isfinite(layer.base.weight).all()
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert relative(layer.base.weight, expected) < tolerance
    assert relative(merged, unmerged) < 5 * tolerance


def test_bnb4_exact_unmerge_is_bit_identical_and_inverse_is_close():
    options = {"block_size": 16, "init_weights": False}
    layer = make_layer(96, 64, options, ("bnb4", {"quant_type": "nf4"}))
    before = layer.backend.snapshot(layer.base)
    original = layer.backend.dequantize_module(layer.base)
    layer.merge()
    assert not layer.backend.get_storage(layer.base).equal(before)
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before)

    result = layer.merge(keep_snapshot=False)
    layer.unmerge("inverse")
    assert relative(layer.backend.dequantize_module(layer.base), original) <= 2 * result.error + 1e-6


@pytest.mark.parametrize("neumann", [True, False], ids=["neumann", "exact"])
def test_unmerge_weight_inverts_merge_weight_with_a_solve(neumann):
    method = OFTMethod({"block_size": 8, "init_weights": False, "use_cayley_neumann": neumann})
    adapter = method.create_adapter(64, 40, None)
    weight = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    merged = method.merge_weight(adapter, weight)
    assert relative(method.unmerge_weight(adapter, merged), weight) < 1e-5
    rot = method.rotations(adapter).detach()
    transpose_inverse = rotation.rotate_weight(merged, rot.transpose(-2, -1))
    if neumann:  # the truncated series is not orthogonal, so a transpose would not undo it
        assert relative(transpose_inverse, weight) > 1e-4
    else:
        assert relative(transpose_inverse, weight) < 1e-5


def test_blockwise_merge_equals_the_dense_block_diagonal_product():
    method = OFTMethod({"r": 4, "init_weights": False})
    adapter = method.create_adapter(48, 20, None)
    weight = torch.randn(20, 48)
    with torch.no_grad():
        dense = torch.block_diag(*method.rotations(adapter))
    assert relative(method.merge_weight(adapter, weight), weight @ dense.T) < 1e-6
    before = weight.clone()
    method.merge_weight(adapter, weight)
    method.unmerge_weight(adapter, weight)
    assert torch.equal(weight, before)


def test_cayley_neumann_approaches_the_cayley_transform():
    adapter = OFTMethod({"block_size": 6}).create_adapter(12, 4, None)
    with torch.no_grad():
        adapter.weight.normal_(0, 0.02)
        q = adapter.skew().double()
    eye = torch.eye(6, dtype=torch.float64).expand_as(q)
    target = torch.linalg.solve(eye - q, eye + q, left=False)  # (I + Q)(I - Q)^-1
    errors = [relative(rotation.cayley_neumann(q, n), target) for n in (2, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-7
    assert torch.equal(rotation.cayley_neumann(q, 3), rotation.cayley_neumann(q, 4))  # PEFT's series
    exact = rotation.cayley_exact(q)
    assert relative(exact @ exact.transpose(-2, -1), eye) < 1e-6


def test_block_size_that_does_not_divide_is_a_clear_error_and_leaves_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(96, 8)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    with pytest.raises(
        ConfigError, match=r"block_size=10 does not divide .*in_features=96.*closest valid block_size: 8 or 12"
    ):
        QuantAdapterLinear(linear, "oft", "bnb4", method_options={"block_size": 10})
    assert type(linear) is nn.Linear and all(torch.equal(before[k], v) for k, v in linear.state_dict().items())
    with pytest.raises(ConfigError, match=r"r=7 does not divide .*closest valid r: 6 or 8"):
        OFTMethod({"r": 7}).check_layer(96, 8)
    with pytest.raises(ConfigError, match=r"block_size=200 .*closest valid block_size: 96\b"):
        OFTMethod({"block_size": 200}).check_layer(96, 8)
    with pytest.raises(pydantic.ValidationError, match="either r"):
        OFTMethod({"r": 4, "block_size": 24})
    with pytest.raises(pydantic.ValidationError, match="module_dropout"):
        OFTMethod({"module_dropout": 1.0})


@pytest.mark.parametrize(("field", "value"), [("block_size", 10), ("block_size", 11), ("r", 7), ("r", 500)])
def test_adjustment_warns_and_picks_what_peft_picks(field, value):
    options = {field: value, "adjust_block_size": True}
    method = OFTMethod(options)
    with pytest.warns(UserWarning, match=rf"adjusted {field} from {value} to \d+"):
        adapter = method.create_adapter(96, 8, None)
    peft_options = {"r": value} if field == "r" else {"block_size": value}
    model = peft_model(peft_config(peft_options), **{TARGET: nn.Linear(96, 8)})
    assert adapter.block_size == peft_layer(model).oft_block_size["default"]
    assert tuple(adapter.weight.shape) == tuple(peft_layer(model).oft_R["default"].weight.shape)


def test_module_dropout_is_training_only_and_drops_whole_blocks():
    method = OFTMethod({"block_size": 8, "module_dropout": 0.5, "init_weights": False})
    adapter = method.create_adapter(64, 8, None)
    x = inputs(64)

    def rotated(module: nn.Module) -> torch.Tensor:
        return method.forward(module, x, lambda z: z)  # an identity "base layer" shows the rotated input

    full = rotation.rotate_input(x, method.rotations(adapter)).detach()
    adapter.eval()
    assert torch.equal(rotated(adapter), full)
    adapter.train()
    torch.manual_seed(5)
    out = rotated(adapter).detach().reshape(3, 5, 8, 8)
    kept = [torch.equal(out[..., j, :], full.reshape(3, 5, 8, 8)[..., j, :]) for j in range(8)]
    dropped = [torch.equal(out[..., j, :], x.reshape(3, 5, 8, 8)[..., j, :]) for j in range(8)]
    assert sum(dropped) == 4 and all(k != d for k, d in zip(kept, dropped, strict=True))


def test_coft_keeps_the_parameter_on_its_ball():
    method = OFTMethod({"block_size": 8, "coft": True, "eps": 1e-3, "init_weights": False})
    adapter = method.create_adapter(32, 8, None)
    merged_before = method.merge_weight(adapter, torch.eye(8, 32))
    method.forward(adapter, inputs(32), lambda z: z)
    radius = 1e-3 / 2.0  # eps / sqrt(4 stored blocks)
    norms = torch.linalg.vector_norm(adapter.skew().detach(), dim=(-2, -1))
    assert torch.allclose(norms, torch.full_like(norms, radius), rtol=1e-5)
    assert relative(method.merge_weight(adapter, torch.eye(8, 32)), merged_before) < 1e-6


def test_state_dict_shape_matches_peft_and_entry_point_loads():
    assert registry.load("methods", "oft") is OFTMethod
    for options in ({"block_size": 16}, {"r": 3}, {"block_size": 16, "block_share": True}):
        layer = QuantAdapterLinear(nn.Linear(48, 8), OFTMethod(options), "none")
        ours = {k: v.shape for k, v in layer.state_dict().items() if k.startswith("adapters.")}
        model = peft_model(peft_config(options), **{TARGET: nn.Linear(48, 8)})
        theirs = {k: v.shape for k, v in model.state_dict().items() if ".oft_R." in k}
        assert list(ours) == ["adapters.default.weight"]
        assert list(theirs.values()) == [ours["adapters.default.weight"]]
