"""The ``scales`` method: identity at init, trains, merges in-format (exactly up to nested rounding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import float_linear, model_checksum
from tiny_models import model_output, perturb_adapters, tiny_llama, token_ids

import qadapt
from qadapt import testing
from qadapt.errors import CapabilityError
from qadapt.model.layer import QuantAdapterLinear

BACKENDS = [
    pytest.param("bnb4", {"compress_statistics": True}, id="bnb4-nested"),
    pytest.param("bnb4", {"compress_statistics": False, "quant_type": "fp4"}, id="bnb4-fp4"),
    pytest.param("bnb8", {}, id="bnb8"),
]


def layer(backend: str, options: dict, shape: tuple[int, int] = (48, 256)) -> QuantAdapterLinear:
    return QuantAdapterLinear(float_linear(shape[1], shape[0]), "scales", backend, backend_options=options)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_float_backend_refuses_scales_at_wrap_with_the_reason():
    model = tiny_llama()
    before = model_checksum(model)
    with pytest.raises(CapabilityError, match=r"needs backend capabilities \['group_scales'\].*'none'"):
        qadapt.wrap(model, method="scales", backend="none", targets="q_proj")
    assert model_checksum(model) == before


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
def test_one_multiplier_per_group_and_identity_at_init(backend, options):
    quant = layer(backend, options).eval()
    adapter = quant.adapters["default"]
    storage = quant.backend.get_storage(quant.base)
    assert adapter.scale.shape == (quant.backend.group_layout(storage).num_groups,)
    assert bool((adapter.scale == 1.0).all())
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(quant(x), quant.base_forward(x))


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
def test_training_moves_the_output_towards_a_target(backend, options):
    quant = layer(backend, options).train()
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = quant(x)
        target = start * 1.1
    optimizer = torch.optim.Adam(quant.adapters.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (quant(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    assert not torch.equal(quant.adapters["default"].scale.detach(), torch.ones_like(quant.adapters["default"].scale))


@pytest.mark.parametrize(
    ("backend", "options", "tolerance"),
    [
        # Double quantization: 192 blocks, so the nested code table holds every new scale exactly.
        pytest.param("bnb4", {"compress_statistics": True}, 1e-6, id="bnb4-nested"),
        pytest.param("bnb4", {"compress_statistics": False}, 1e-6, id="bnb4"),
        pytest.param("bnb8", {}, 1e-5, id="bnb8"),
    ],
)
def test_merge_writes_scales_and_keeps_the_output(backend, options, tolerance):
    quant = layer(backend, options)
    quant.train()  # bnb8: the forward on the dequantized weight (eval would quantize activations too)
    with torch.no_grad():
        quant.adapters["default"].scale.mul_(1 + 0.05 * torch.randn(quant.adapters["default"].scale.shape))
    before = quant.backend.snapshot(quant.base)
    x = torch.randn(8, 256)
    with torch.no_grad():
        unmerged = quant(x)
        result = quant.merge()
        merged = quant(x)
    assert result.path == "storage" and not result.reverted
    assert relative(merged, unmerged) <= tolerance, relative(merged, unmerged)
    codes = "data" if backend == "bnb4" else "CB"
    assert torch.equal(quant.backend.get_storage(quant.base).tensors[codes], before.tensors[codes])
    quant.unmerge("exact")
    assert quant.backend.get_storage(quant.base).equal(before)
    with torch.no_grad():
        assert torch.equal(quant(x), unmerged)


def test_scales_passes_the_method_contract():
    # On bnb8 the contract's eval-mode forward runs LLM.int8(), which also quantizes activations:
    # the merge test above covers bnb8 in training mode instead.
    testing.check_method("scales", backend="bnb4")


def test_saves_and_loads_through_save_adapter(tmp_path: Path):
    ids = token_ids()
    model = qadapt.wrap(tiny_llama(), method="scales", backend="bnb4", targets=["q_proj", "v_proj"])
    perturb_adapters(model, scale=0.05)
    expected = model_output(model, ids)
    qadapt.save_adapter(model, tmp_path)
    fresh = qadapt.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(model_output(fresh, ids), expected)
    assert model_checksum(fresh) == model_checksum(model)


def test_a_multi_layer_model_merges_scales_exactly_with_double_quantization():
    """Every layer has at most 256 blocks: the nested state holds the trained scales exactly, so the
    merged model computes what the unmerged one did (bitsandbytes' fixed nested map moved them by up
    to 0.25 %: 2.5e-3 relative on these logits)."""
    ids = token_ids()
    model = qadapt.wrap(tiny_llama(num_layers=3), method="scales", backend="bnb4").eval()
    perturb_adapters(model, scale=0.05)
    with torch.no_grad():
        unmerged = model_output(model, ids)
        report = qadapt.merge(model)
        merged = model_output(model, ids)
    assert {r.path for r in report.layers.values()} == {"storage"}
    assert relative(merged, unmerged) <= 1e-5, relative(merged, unmerged)
    assert report.max_error <= 1e-6


def test_nested_scales_beyond_256_blocks_are_bitsandbytes_own_double_quantization():
    import bitsandbytes.functional as bnbF

    from qadapt_bnb import bnb4_codes

    quant = layer("bnb4", {"compress_statistics": True}, shape=(64, 512))  # 512 blocks
    storage = quant.backend.get_storage(quant.base)
    scales = quant.backend.get_group_scales(storage) * (1 + 0.05 * torch.randn(512))
    new = quant.backend.with_group_scales(storage, scales)
    offset = scales.mean()
    qabsmax, state2 = bnbF.quantize_blockwise(scales - offset, code=storage.tensors["nested_code"], blocksize=256)
    assert torch.equal(new.tensors["absmax"], qabsmax) and torch.equal(new.tensors["nested_absmax"], state2.absmax)
    assert torch.equal(new.tensors["nested_code"], storage.tensors["nested_code"])
    # Within one nested step of the requested scales.
    assert relative(bnb4_codes.effective_absmax(new), scales) < 3e-3
