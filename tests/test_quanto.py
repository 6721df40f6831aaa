"""The ``quanto`` backend on real optimum-quanto layers: adoption, merge, exact unmerge, checkpoints, and
that nothing qadapt does builds quanto's C++ extension (whose stale lock hangs every later process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import model_checksum
from optimum.quanto import QLinear, freeze, qint2, qint4, qint8, quantize
from optimum.quanto.tensor.packed import pack_weights
from tiny_models import perturb_adapters, tiny_llama, token_ids

import qadapt
from qadapt import testing
from qadapt.errors import CapabilityError, CheckpointError
from qadapt.model.layer import QuantAdapterLinear
from qadapt_quanto import QuantoBackend, build_lock, check_build_lock
from qadapt_quanto import storage as st
from qadapt_quanto.extension import build_directory

QTYPES = {"qint8": qint8, "qint4": qint4}


def _built_files() -> set[str]:
    directory = build_directory()
    return set() if directory is None or not directory.exists() else {p.name for p in directory.iterdir()}


@pytest.fixture(autouse=True)
def no_extension_build():
    """Every test here leaves quanto's extension build folder as it found it: qadapt never compiles it."""
    before = _built_files()
    yield
    assert _built_files() == before, "quanto's C++ extension was built (or its build folder changed)"


def quanto_llama(qtype: str, frozen: bool = True, hidden_size: int = 160) -> torch.nn.Module:
    """A tiny Llama whose decoder linears were quantized by optimum.quanto.quantize (and frozen)."""
    model = tiny_llama(hidden_size=hidden_size)
    quantize(model.model, weights=QTYPES[qtype])
    if frozen:
        freeze(model)
    return model


@pytest.mark.parametrize("qtype", ["qint8", "qint4"])
@torch.no_grad()
def test_a_model_quantized_with_quanto_is_adopted_and_merges_and_unmerges_exactly(qtype: str):
    model = quanto_llama(qtype)
    ids = token_ids(length=8)
    if qtype == "qint8":  # quanto's own qint8 forward is plain torch: the adoption computes what it did
        before = model(ids).logits
    model = qadapt.wrap(model, method="lora", backend="auto", method_options={"r": 4})
    layers = [m for m in model.modules() if isinstance(m, QuantAdapterLinear)]
    assert len(layers) == 14 and all(m.backend.name == "quanto" for m in layers)
    assert all(isinstance(m.base, QLinear) for m in layers)
    base = model(ids).logits  # LoRA starts as the identity
    if qtype == "qint8":
        torch.testing.assert_close(base, before, rtol=1e-4, atol=1e-5)
    perturb_adapters(model, scale=0.003 if qtype == "qint8" else 0.03)
    checksum = model_checksum(model)
    unmerged = model(ids).logits
    report = qadapt.merge(model)
    merged = model(ids).logits
    # A correct merge: the merged model is far closer to the adapted one than the base is (PEFT #1997's
    # quanto merge was not), the rest is the format's rounding of the change.
    assert (merged - unmerged).norm() < 0.5 * (base - unmerged).norm()
    assert len(report.layers) == 14 and not any(r.reverted for r in report.layers.values())
    # The default merge keeps the scales, or takes quanto's fresh quantization where that lands closer.
    assert {r.path for r in report.layers.values()} <= {"keep", "fresh"}
    kept = {name for name, r in report.layers.items() if r.path == "keep"}
    for name, layer in model.named_modules():  # keep-state: the scales (and shifts) are the base's, bit for bit
        if name in kept:
            old, new = layer._merged.snapshot, layer.backend.get_storage(layer.base)
            assert all(torch.equal(old.tensors[k], new.tensors[k]) for k in old.tensors if k != "data")
    qadapt.unmerge(model)
    assert model_checksum(model) == checksum
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=0, atol=0)


@torch.no_grad()
def test_an_unfrozen_quanto_layer_is_read_as_its_forward_quantizes_it():
    frozen, live = quanto_llama("qint4"), quanto_llama("qint4", frozen=False)
    backend = QuantoBackend()
    for name, module in live.named_modules():
        if isinstance(module, QLinear):
            assert backend.owns(module)
            ours = backend.get_storage(module)
            assert ours.equal(backend.get_storage(frozen.get_submodule(name)))


@pytest.mark.parametrize("bits", [2, 4])
def test_the_pure_torch_packing_is_quantos_own(bits: int):
    generator = torch.Generator().manual_seed(bits)
    for count in (37, 40, 1):
        codes = torch.randint(0, 2**bits, (count, 24), generator=generator, dtype=torch.uint8)
        packed = st.pack(codes, bits)
        assert torch.equal(packed, pack_weights(codes, bits))  # quanto's own (pure-Python) packing
        assert torch.equal(st.unpack(packed, bits, count), codes)


def test_qint2_passes_the_contract_within_its_error():
    # 2 bits with min/max scaling: about 0.45 relative error on a random layer; every other bound holds.
    for check in testing.backend_checks():
        extra = {"max_relative_error": 0.5} if check.__name__ == "check_dequantize_shape_dtype_and_accuracy" else {}
        check(QuantoBackend({"weights": "qint2"}), **extra)


def test_group_sizes_follow_quantos_rule():
    backend = QuantoBackend()
    for in_features, expected in ((64, None), (160, 32), (192, 96), (256, 128), (130, None)):
        layer = backend.quantize(torch.nn.Linear(in_features, 8))
        assert layer.weight_group_size == expected
        assert backend.get_storage(layer).meta["group_size"] == expected == st.group_size_for(in_features)


@torch.no_grad()
def test_a_qint8_checkpoint_loads_into_quantos_own_layer():
    backend = QuantoBackend({"weights": "qint8"})
    layer = backend.quantize(torch.nn.Linear(48, 16))
    state = {**backend.to_checkpoint(backend.get_storage(layer)), "bias": layer.bias.detach().clone()}
    fresh = QLinear(48, 16, weights=qint8)
    fresh.load_state_dict(state, strict=True)
    fresh.freeze()
    assert backend.get_storage(fresh).equal(backend.get_storage(layer))


def test_hostile_checkpoints_are_refused_with_the_tensor_named():
    backend = QuantoBackend()
    storage = backend.get_storage(backend.quantize(torch.nn.Linear(192, 8)))
    tensors, config = backend.to_checkpoint(storage), backend.checkpoint_config(storage)
    cases = [
        ({**tensors, "weight._shape": torch.tensor([8, 2**30])}, config, "weight._shape must be positive"),
        ({**tensors, "weight._shape": torch.tensor([8.0, 192.0])}, config, "weight._shape must be 2 integers"),
        ({k: v for k, v in tensors.items() if k != "weight._shift"}, config, "a qint4 layer has"),
        ({**tensors, "weight._scale": tensors["weight._scale"][:-1]}, config, "weight._scale must be"),
        ({**tensors, "weight._scale": tensors["weight._scale"] * float("nan")}, config, "NaN"),
        (tensors, {**config, "weights": "int3"}, "quantization_config.weights must be one of"),
        (tensors, None, "need quantization_config.weights"),
    ]
    for damaged, cfg, message in cases:
        with pytest.raises(CheckpointError, match=message):
            backend.from_checkpoint(damaged, cfg)
    assert backend.from_checkpoint(tensors, config).equal(storage)


def test_a_stale_build_lock_is_named(tmp_path: Path):
    assert build_lock(tmp_path) is None
    check_build_lock(tmp_path)  # no lock: nothing to say
    (tmp_path / "lock").write_text("")
    assert build_lock(tmp_path) == tmp_path / "lock"
    with pytest.raises(CapabilityError, match=f"build lock {tmp_path / 'lock'} exists.*delete it"):
        check_build_lock(tmp_path)


def test_qint8_has_no_group_offsets():
    backend = QuantoBackend({"weights": "qint8"})
    assert not backend.capabilities.group_offsets and QuantoBackend().capabilities.group_offsets
    storage = backend.get_storage(backend.quantize(torch.nn.Linear(16, 8)))
    with pytest.raises(CapabilityError, match="no per-group offsets"):
        QuantoBackend().get_group_offsets(storage)


def test_layers_that_quantize_activations_are_not_adopted():
    layer = QLinear(16, 8, weights=qint8, activations=qint8)
    assert not QuantoBackend().owns(layer)
    assert QuantoBackend().owns(QLinear(16, 8, weights=qint2))


@torch.no_grad()
def test_quantos_cpu_optimized_qint4_layout_is_adopted_without_its_kernels():
    # qint4 with bfloat16 scales in groups of 128 becomes quanto's TinyGemm layout on CPU.
    model = torch.nn.Sequential(torch.nn.Linear(256, 64)).to(torch.bfloat16)
    quantize(model, weights=qint4)
    freeze(model)
    assert type(model[0].weight).__name__ == "TinyGemmWeightQBitsTensor"
    qadapt.wrap(model, method="lora", backend="auto", targets=["0"], method_options={"r": 4, "init_weights": False})
    layer = model[0]
    assert layer.backend.get_storage(layer.base).meta == {"qtype": "qint4", "group_size": 128, "shape": (64, 256)}
    x = torch.randn(3, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    unmerged = model(x)
    snapshot = layer.backend.get_storage(layer.base).clone()
    layer.merge()
    assert (model(x) - unmerged).float().norm() < 0.1 * unmerged.float().norm()
    layer.unmerge()
    assert layer.backend.get_storage(layer.base).equal(snapshot)
