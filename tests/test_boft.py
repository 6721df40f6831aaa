"""The ``boft`` method against PEFT 0.21.2's BOFT on float and quantized backends (real bitsandbytes, CPU).

PEFT builds BOFT's block-diagonal matrices with a CUDA extension; without it (any CPU machine) it
sets ``boft_n_butterfly_factor`` to 1. Parity with more factors is checked against PEFT's own
permutation and Cayley functions, composed as PEFT's ``get_delta_weight`` composes them.
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft_reference import TARGET, float_twin, inputs, peft_layer, peft_model, relative, trainable_count
from tiny_models import tiny_llama
from torch import nn

import qadapt
from qadapt import QuantAdapterLinear
from qadapt.errors import ConfigError
from qadapt_boft import BOFTMethod

BACKENDS = [("none", {}), ("bnb8", {}), ("bnb4", {"quant_type": "nf4"}), ("torchao", {"config": "int8"})]
BACKEND_IDS = ["none", "bnb8", "bnb4-nf4", "torchao-int8"]


def make_layer(in_f: int, out_f: int, options: dict, backend: tuple[str, dict]) -> QuantAdapterLinear:
    torch.manual_seed(0)
    name, backend_options = backend
    layer = QuantAdapterLinear(nn.Linear(in_f, out_f), BOFTMethod(options), name, backend_options=backend_options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in layer.adapters.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return layer


def peft_config(options: dict) -> peft.BOFTConfig:
    return peft.BOFTConfig(
        target_modules=[TARGET],
        boft_block_size=options.get("block_size", 0 if "block_num" in options else 4),
        boft_block_num=options.get("block_num", 0),
        boft_dropout=options.get("dropout", 0.0),
        init_weights=options.get("init_weights", True),
    )


def peft_twin(layer: QuantAdapterLinear, options: dict) -> tuple[nn.Module, nn.Module]:
    model = peft_model(peft_config(options), **{TARGET: float_twin(layer)})
    twin = peft_layer(model)
    with torch.no_grad():
        twin.boft_R["default"].copy_(layer.adapters["default"].boft_R)
        twin.boft_s["default"].copy_(layer.adapters["default"].boft_s)
    return model, twin


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(
    ("in_f", "out_f", "options"),
    [(64, 48, {}), (48, 96, {"block_num": 6}), (32, 40, {"block_size": 16})],
    ids=["64x48-size-4", "48x96-num-6", "32x40-size-16"],
)
def test_forward_gradients_and_merged_weight_equal_peft(in_f, out_f, options, backend):
    layer = make_layer(in_f, out_f, options, backend)
    model, twin = peft_twin(layer, options)
    x = inputs(in_f)
    ours, theirs = layer(x), model(x)
    assert relative(ours, theirs) <= 1e-6
    ours.square().mean().backward()
    theirs.square().mean().backward()
    adapter = layer.adapters["default"]
    for key in ("boft_R", "boft_s"):
        mine, reference = getattr(adapter, key), getattr(twin, key)["default"]
        assert mine.grad.abs().sum() > 0 and relative(mine.grad, reference.grad) <= 1e-5, key
    assert trainable_count(layer) == trainable_count(model)
    with torch.no_grad():
        merged = layer.methods["default"].merge_weight(adapter, twin.base_layer.weight.clone())
        twin.merge()
    assert relative(merged, twin.base_layer.weight) <= 1e-6


def peft_rotation(layer: nn.Module, boft_r: torch.Tensor, in_f: int, size: int, num: int) -> torch.Tensor:
    """PEFT's butterfly rotation for ``boft_r [N, D, b, b]``, from PEFT's own permutation, permutation-matrix
    and Cayley functions, composed as its ``get_delta_weight`` composes them."""
    factors = boft_r.shape[0]
    perms = torch.stack(
        [layer.perm2mat(layer.block_butterfly_perm(in_f, num // 2**i, size // 2, factors - 1)) for i in range(factors)]
    )
    blocks = layer.cayley_batch(boft_r.reshape(-1, size, size)).reshape(boft_r.shape)
    diagonal = torch.stack([torch.block_diag(*blocks[i]) for i in range(factors)])
    batch = torch.bmm(perms, torch.bmm(diagonal, perms.permute(0, 2, 1)))
    rotation = batch[0]
    for i in range(1, factors):
        rotation = batch[i] @ rotation
    return rotation


@pytest.mark.parametrize(
    ("in_f", "options", "size", "num"),
    [(64, {"block_size": 8, "n_butterfly_factor": 2}, 8, 8), (64, {"block_num": 4, "n_butterfly_factor": 3}, 16, 4)],
    ids=["size-8-two-factors", "num-4-three-factors"],
)
def test_butterfly_factors_compose_as_peft_s(in_f, options, size, num):
    layer = make_layer(in_f, 24, options, ("none", {}))
    adapter = layer.adapters["default"]
    assert tuple(adapter.boft_R.shape) == (options["n_butterfly_factor"], num, size, size)
    reference_layer = peft_layer(peft_model(peft_config({"block_size": 4}), **{TARGET: nn.Linear(in_f, 24)}))
    with torch.no_grad():
        expected = peft_rotation(reference_layer, adapter.boft_R.detach(), in_f, size, num)
        ours = adapter.rotation()
    assert relative(ours, expected) <= 1e-6
    assert relative(ours @ ours.T, torch.eye(in_f)) <= 1e-5  # still a rotation
    x = inputs(in_f)
    with torch.no_grad():
        linear = float_twin(layer)
        scale = adapter.boft_s.squeeze(-1)
        assert relative(layer(x), (linear(x @ expected) - linear.bias) * scale + linear.bias) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_fresh_adapter_is_the_base_and_merge_round_trips(backend):
    torch.manual_seed(0)
    fresh = QuantAdapterLinear(nn.Linear(64, 48), "boft", backend[0], backend_options=backend[1])
    x = inputs(64)
    with torch.no_grad():
        assert relative(fresh(x), fresh.base_forward(x)) <= 1e-6
    layer = make_layer(64, 48, {"block_size": 8, "n_butterfly_factor": 2}, backend).eval()
    before = layer.backend.snapshot(layer.base)
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        assert relative(layer(x), unmerged) <= 3 * result.error + 1e-6
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before)


def test_inverse_unmerge_and_seeded_initialisation():
    layer = make_layer(64, 48, {"block_size": 8}, ("none", {}))
    weight = layer.base.weight.detach().clone()
    layer.merge(keep_snapshot=False)
    layer.unmerge("inverse")
    assert relative(layer.base.weight, weight) <= 1e-6
    linear, other = nn.Linear(64, 48), nn.Linear(64, 48)
    torch.manual_seed(5)
    ours = QuantAdapterLinear(linear, BOFTMethod({"init_weights": False}), "none").adapters["default"]
    torch.manual_seed(5)
    twin = peft_layer(peft_model(peft_config({"init_weights": False}), **{TARGET: other}))
    assert torch.equal(ours.boft_R, twin.boft_R["default"]) and torch.equal(ours.boft_s, twin.boft_s["default"])


def test_dropout_draws_the_same_blocks_as_peft():
    options = {"block_size": 4, "dropout": 0.5}
    layer = make_layer(64, 48, options, ("none", {}))
    model, _ = peft_twin(layer, options)
    layer.train(), model.train()
    x = inputs(64)
    torch.manual_seed(11)
    ours = layer(x)
    torch.manual_seed(11)
    assert relative(ours, model(x)) <= 1e-6
    with torch.no_grad():
        assert not torch.equal(ours, layer.eval()(x))
        # A merge in training mode drops nothing: the merged weight is the eval-mode layer's.
        merged = layer.train().methods["default"].merge_weight(layer.adapters["default"], layer.base.weight)
        assert relative(nn.functional.linear(x, merged, layer.base.bias), layer.eval()(x)) <= 1e-6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": 5}, r"block_size=5 does not divide the layer's in_features=64"),
        ({"block_num": 6}, r"block_num=6 does not divide the layer's in_features=64"),
        ({"block_num": 4, "n_butterfly_factor": 4}, r"n_butterfly_factor=4 needs block_num to be a multiple of"),
        ({"block_size": 32, "n_butterfly_factor": 3}, r"needs in_features to be a multiple of block_size \* 2"),
        ({"block_size": 4, "block_num": 16}, r"give either block_size \(4\) or block_num \(16\), not both"),
        ({"n_butterfly_factor": 0}, r"method\.options\.n_butterfly_factor: Input should be greater than or equal to 1"),
        ({"dropout": -0.1}, r"method\.options\.dropout: Input should be greater than or equal to 0"),
    ],
    ids=["size", "num", "factor-vs-num", "factor-vs-size", "both", "factor-bound", "dropout-bound"],
)
def test_options_that_do_not_fit_are_config_errors_naming_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        qadapt.wrap(tiny_llama(), method="boft", backend="none", targets="q_proj", method_options=options)
