"""The gguf backend's block formats: bit-equal to the ``gguf`` package, and the K-quants' keep-state paths."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from qadapt_gguf.backend import GgufBackend, GgufLinear
from qadapt_gguf.quants import TYPES

from qadapt.errors import CapabilityError, ConfigError
from qadapt.protocols import CalibrationStats, QuantizedWeight


def random_blocks(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random blocks of type ``name`` whose float16 headers are finite (what a quantizer writes)."""
    t = TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, t.nbytes), dtype=np.uint8)
    halves = {"Q6_K": [208]}.get(name, [0, 2] if (t.has_offset or t.header == "k") else [0])
    for at in halves:
        raw[:, at : at + 2] = np.float16(rng.normal(size=n) * 0.05).reshape(-1, 1).view(np.uint8)
    return raw


@pytest.mark.parametrize("name", list(TYPES))
def test_dequantize_is_bit_equal_to_the_gguf_package(name):
    raw = random_blocks(name, 37)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(37, -1)
    got = TYPES[name].dequantize(torch.from_numpy(raw)).numpy()
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("name", list(TYPES))
def test_codes_written_back_give_the_same_bytes(name):
    blocks = torch.from_numpy(random_blocks(name, 9, seed=1))
    t = TYPES[name]
    assert torch.equal(t.with_index(blocks, t.index(blocks)), blocks)


@pytest.mark.parametrize("name", [n for n, t in TYPES.items() if t.fresh])
def test_quantize_is_bit_equal_to_the_gguf_package(name):
    x = np.random.default_rng(2).normal(size=(6, 96)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    x[1, 5] = 40.0  # an outlier
    expected = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    got = TYPES[name].quantize(torch.from_numpy(x).reshape(-1, 32)).reshape(6, -1).numpy()
    assert np.array_equal(got, expected)


def k_layer(name: str, out_f: int = 8, in_f: int = 512) -> GgufLinear:
    raw = random_blocks(name, out_f * in_f // 256, seed=3)
    return GgufLinear(torch.from_numpy(raw).reshape(out_f, -1), name, in_f, out_f, torch.zeros(out_f))


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_forward_keep_state_and_calibrated(name):
    backend = GgufBackend()
    layer = k_layer(name)
    storage = backend.get_storage(layer)
    weight = backend.dequantize(storage)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(backend.forward(layer, x), F.linear(x, weight, layer.bias), atol=1e-5)
    same = backend.requantize_keep_state(weight, storage)
    # (random sub-block scales include 0, where every code gives the same weight: compare weights)
    assert torch.equal(backend.dequantize(same), weight), "a weight on the grid comes back unchanged"
    target = weight + 0.3 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    t = TYPES[name]
    header = [i for i in range(t.nbytes) if i not in {b + f.start for f in t.fields for b in f.byte}]
    for new in (backend.requantize_keep_state(target, storage), backend.requantize(target, storage)):
        kept = new.tensors["blocks"].reshape(-1, t.nbytes)[:, header]
        assert torch.equal(kept, storage.tensors["blocks"].reshape(-1, t.nbytes)[:, header]), "scales and mins kept"
        assert (backend.dequantize(new) - target).norm() < (weight - target).norm()
    gen = torch.Generator().manual_seed(2)
    inputs = torch.randn(4096, 512, generator=gen) * torch.linspace(0.1, 3, 512)
    hessian = inputs.T @ inputs
    calibrated = backend.requantize_calibrated(target, storage, CalibrationStats(hessian, 4096))
    keep = backend.requantize_keep_state(target, storage)

    def objective(s: QuantizedWeight) -> float:
        error = (backend.dequantize(s) - target).double()
        return float(((error @ hessian.double()) * error).sum())

    assert objective(calibrated) < objective(keep)
    with pytest.raises(CapabilityError, match="sub-block scales"):
        backend.group_layout(storage)


def test_q4_1_min_is_the_zero_point_and_q4_0_has_none():
    backend = GgufBackend({"type": "q4_1"})
    linear = torch.nn.Linear(64, 4)
    storage = backend.get_storage(backend.quantize(linear))
    offsets = backend.get_group_offsets(storage)
    shifted = backend.with_group_offsets(storage, offsets + 0.125)
    # A shift of 1/8 is exact in float16 for mins of this size: every weight moves by exactly 0.125.
    assert torch.allclose(backend.dequantize(shifted), backend.dequantize(storage) + 0.125, atol=2e-4)
    q4_0 = GgufBackend({"type": "q4_0"})
    assert not q4_0.capabilities.group_offsets
    with pytest.raises(CapabilityError, match="no zero point"):
        q4_0.get_group_offsets(q4_0.get_storage(q4_0.quantize(linear)))


def test_rows_that_are_not_whole_blocks_are_refused_with_the_option_named():
    with pytest.raises(ConfigError, match=r"type q5_0 stores rows in blocks of 32 weights, so in_features \(48\)"):
        GgufBackend({"type": "q5_0"}).check_layer(48, 8)


def _trained(method: str, options: dict, backend: dict):
    from torch import nn

    from qadapt.model.layer import QuantAdapterLinear

    torch.manual_seed(0)
    layer = QuantAdapterLinear(nn.Linear(64, 48), method, "gguf", method_options=options, backend_options=backend)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in layer.adapters.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return layer.eval()


@pytest.mark.parametrize(
    ("method", "options", "kind"),
    [("qalora", {"r": 4, "group_size": 32}, "q4_1"), ("scales", {}, "q4_0"), ("scales", {}, "q4_1")],
    ids=["qalora-into-q4_1-mins", "scales-into-q4_0-d", "scales-into-q4_1-d-and-m"],
)
def test_exact_merges_into_the_block_header(method, options, kind):
    """QA-LoRA folds into each block's min, the scales method into each block's d: codes kept, output kept
    up to the float16 rounding of the header."""
    layer = _trained(method, options, {"type": kind})
    t = TYPES[kind.upper()]
    before = layer.backend.get_storage(layer.base)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        merged = layer(x)
    after = layer.backend.get_storage(layer.base)
    assert result.path == "storage" and not result.reverted
    assert torch.equal(
        t.index(after.tensors["blocks"].reshape(-1, t.nbytes)), t.index(before.tensors["blocks"].reshape(-1, t.nbytes))
    )
    assert not after.equal(before)
    assert float((merged - unmerged).norm() / unmerged.norm()) < 2e-3


def test_training_forward_keeps_blocks_not_the_float_weight_and_gives_the_same_gradient():
    backend = GgufBackend({"type": "q5_1"})
    layer = backend.quantize(torch.nn.Linear(64, 48))
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = layer(x)
    matmul = out.grad_fn.next_functions[0][0]  # out = (x @ W.T) + bias
    saved = list(matmul.saved_tensors)
    assert [t.dtype for t in saved] == [torch.uint8], "only the blocks are held for the backward"
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    reference = x.detach().clone().requires_grad_()
    expected = F.linear(reference, backend.dequantize(backend.get_storage(layer)), layer.bias)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), reference)
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(grad, expected_grad, atol=1e-4)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q5_0", "q5_1"])
def test_every_quantizable_type_passes_the_contract(kind):
    """(Q4_1 runs in tests/test_contract.py's matrix.) Q5_1's mins are float16, like Q4_1's."""
    from qadapt import testing

    other = {"type": "q4_1" if kind != "q4_1" else "q8_0"}
    for check in testing.backend_checks():
        extra = {"other_options": other} if check is testing.check_requantize_follows_like_not_options else {}
        if check is testing.check_group_offsets:
            extra["tolerance"] = 1e-3
        check("gguf", options={"type": kind}, **extra)
