"""Module-level dtype casts keep the quantized format's bits (bnb4 with a float ``quant_storage``).

bnb4 packs its 4-bit codes two per byte; with ``quant_storage`` set to a float dtype (what FSDP
needs) those bytes sit in a float tensor, and ``model.half()`` / ``.to(dtype)`` / ``.type()``
would convert them by value. Every such cast runs through ``QuantAdapterLinear._apply``, which
never casts the tensors the backend declares (``Backend.dtype_fixed_tensors``) nor any integer
tensor: they only follow a device move (so a tensor subclass that refuses casts never sees one).
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from conftest import model_checksum
from tiny_models import tiny_llama, token_ids

import qadapt
from qadapt import testing
from qadapt.errors import AdapterStateError
from qadapt.registry.reference import FloatBackend

STORAGES = ["uint8", "bfloat16", "float16", "float32"]
CASTS = {
    "half": lambda m: m.half(),
    "float": lambda m: m.float(),
    "bfloat16": lambda m: m.bfloat16(),
    "double": lambda m: m.double(),
    "to-float16": lambda m: m.to(torch.float16),
    "to-cpu-bfloat16": lambda m: m.to(device="cpu", dtype=torch.bfloat16),
    "type-float16": lambda m: m.type(torch.float16),
}


def wrapped(quant_storage: str, backend: str = "bnb4") -> torch.nn.Module:
    options = {"quant_storage": quant_storage} if backend == "bnb4" else {}
    model = qadapt.wrap(
        tiny_llama(),
        method="oft",
        backend=backend,
        targets=["q_proj", "down_proj"],
        method_options={"block_size": 16},
        backend_options=options,
    )
    return model


@cache
def reference_logits(quant_storage: str) -> torch.Tensor:
    with torch.no_grad():
        return wrapped(quant_storage)(token_ids(seed=4)).logits


def storages(model: torch.nn.Module) -> list[str]:
    """Checksums of every wrapped layer's quantized base."""
    return [model_checksum(m.base) for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear)]


@pytest.mark.parametrize("quant_storage", STORAGES)
def test_the_contract_check_holds_for_every_quant_storage(quant_storage):
    testing.check_casts_keep_the_format(qadapt.registry.backend_class("bnb4")({"quant_storage": quant_storage}))


@pytest.mark.parametrize("cast", CASTS, ids=list(CASTS))
@pytest.mark.parametrize("quant_storage", STORAGES)
def test_a_model_level_cast_keeps_the_packed_codes(quant_storage, cast):
    model = wrapped(quant_storage)
    layers = [m for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear)]
    weights = [layer.backend.dequantize_module(layer.base) for layer in layers]
    before = storages(model)
    CASTS[cast](model)
    assert storages(model) == before
    for layer, weight in zip(layers, weights, strict=True):
        assert torch.equal(layer.backend.dequantize_module(layer.base), weight)
    # The model computes what it did, up to its float parameters' new dtype.
    model.float()
    with torch.no_grad():
        logits = model(token_ids(seed=4)).logits
    reference = reference_logits(quant_storage)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, reference, atol=5e-2, rtol=0), (logits - reference).abs().max()


@pytest.mark.parametrize("quant_storage", ["bfloat16", "float32"])
def test_a_cast_runs_a_low_precision_forward_close_to_float32(quant_storage):
    model = wrapped(quant_storage)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer(x)
        for dtype in (torch.float16, torch.bfloat16):
            layer.to(dtype)
            out = layer(x.to(dtype)).float()
            assert ((out - expected).norm() / expected.norm()).item() < 2e-2


def test_bnb8_int8_codes_and_oft_index_buffers_survive_type():
    model = wrapped("uint8", backend="bnb8")
    before = storages(model)
    ids = token_ids(seed=4)
    with torch.no_grad():
        expected = model(ids).logits
        model.type(torch.float16)
        assert storages(model) == before
        model.float()
        assert torch.allclose(model(ids).logits, expected, atol=5e-2, rtol=0)


def test_codes_converted_behind_the_layers_back_are_refused_not_used():
    model = wrapped("bfloat16")
    layer = model.model.layers[0].self_attn.q_proj
    layer.base.weight.data = layer.base.weight.data.to(torch.float16)  # what a bare Linear4bit cast does
    with pytest.raises(AdapterStateError, match=r"stored as torch\.bfloat16 but the weight now is torch\.float16"):
        model(token_ids())


class CastRefusingTensor(torch.Tensor):
    """A quantizer's tensor subclass that refuses dtype casts (as optimum-quanto's packed tensors do)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("half", "float", "double", "bfloat16", "type") or (
            name == "to" and any(isinstance(a, torch.dtype) for a in [*args[1:], *kwargs.values()])
        ):
            raise TypeError(f"CastRefusingTensor cannot be cast ({name})")
        return super().__torch_function__(func, types, args, kwargs)


class FixedFloatBackend(FloatBackend):
    """The float backend, its weight a CastRefusingTensor declared in dtype_fixed_tensors."""

    def quantize(self, linear: torch.nn.Module) -> torch.nn.Module:
        weight = linear.weight.detach().clone().as_subclass(CastRefusingTensor)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        return linear

    def owns(self, module: torch.nn.Module) -> bool:
        return isinstance(getattr(module, "weight", None), CastRefusingTensor)

    def dtype_fixed_tensors(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {**super().dtype_fixed_tensors(module), "weight": module.weight}


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to-float16", "to-cpu-bfloat16", "type-float16"])
def test_a_cast_never_touches_the_fixed_tensors_even_one_that_refuses_casts(cast):
    torch.manual_seed(0)
    layer = qadapt.QuantAdapterLinear(torch.nn.Linear(32, 16), "lora", FixedFloatBackend(), method_options={"r": 2})
    weight = layer.base.weight
    with pytest.raises(TypeError, match="cannot be cast"):
        weight.half()  # the subclass does refuse
    CASTS[cast](layer)
    assert layer.base.weight is weight and layer.base.weight.dtype == torch.float32
    adapter = layer.adapters["default"]
    assert all(p.dtype != torch.float32 for p in adapter.parameters()), "the adapter follows the cast"
