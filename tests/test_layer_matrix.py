"""QuantAdapterLinear against every backend x two methods with known math (real bitsandbytes, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND_IDS, BACKENDS, float_linear
from methods_for_tests import AddDelta, MixInput

from qadapt import AdapterStateError, QuantAdapterLinear, TargetError, UnsafeMergeError
from qadapt.errors import CapabilityError, ConfigError
from qadapt.registry.reference import float_base_layer
from qadapt_lora import DoraMethod, LoraMethod

#: Non-zero from the start (init_weights=False): a LoRA / DoRA update of a few percent of the weight.
LORA_START = {"r": 4, "alpha": 1, "init_weights": False}
METHODS = [AddDelta, MixInput, lambda: LoraMethod(LORA_START), lambda: DoraMethod(LORA_START)]
METHOD_IDS = ["add_delta", "mix_input", "lora", "dora"]
IN, OUT = 192, 96


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).float()) / torch.linalg.vector_norm(b.float()))


@pytest.fixture(params=BACKENDS, ids=BACKEND_IDS)
def backend_spec(request):
    return request.param


@pytest.fixture(params=METHODS, ids=METHOD_IDS)
def layer(request, backend_spec) -> QuantAdapterLinear:
    name, options = backend_spec
    return QuantAdapterLinear(float_linear(IN, OUT), request.param(), name, backend_options=options)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 7, IN, generator=torch.Generator().manual_seed(1))


def reference(layer: QuantAdapterLinear, x: torch.Tensor) -> torch.Tensor:
    """The method applied around a plain float linear holding the dequantized weight."""
    weight = layer.backend.dequantize_module(layer.base)
    bias = layer.base.bias
    base = float_base_layer(weight, None if bias is None else bias.float())
    name = layer.active_adapter
    return layer.methods[name].forward(layer.adapters[name], x, base)


def test_forward_equals_dequantized_weight_reference(layer, x):
    with torch.no_grad():
        assert relative(layer(x), reference(layer, x)) < 1e-5


def test_merged_forward_matches_unmerged_within_quantization_error(layer, x):
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        merged = layer(x)
    assert layer.merged and result.adapter == "default"
    assert 0.0 <= result.error < 0.2
    assert relative(merged, unmerged) <= 3 * result.error + 1e-5


def test_exact_unmerge_restores_storage_bit_identically(layer, x):
    before = layer.backend.snapshot(layer.base)
    with torch.no_grad():
        out_before = layer.base_forward(x)
    result = layer.merge()
    # A merge writes new storage, unless the guard kept the old one (it would have been worse).
    assert layer.backend.get_storage(layer.base).equal(before) == result.reverted
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before)
    with torch.no_grad():
        assert torch.equal(layer.base_forward(x), out_before)
    assert not layer.merged


def test_exact_unmerge_survives_many_cycles(layer):
    before = layer.backend.snapshot(layer.base)
    for _ in range(5):
        layer.merge()
        layer.unmerge()
    assert layer.backend.get_storage(layer.base).equal(before)


def test_inverse_unmerge_within_twice_the_quantization_error(layer):
    original = layer.backend.dequantize_module(layer.base)
    result = layer.merge(keep_snapshot=False)
    layer.unmerge("inverse")
    restored = layer.backend.dequantize_module(layer.base)
    assert relative(restored, original) <= 2 * result.error + 1e-6


def test_safe_merge_of_nan_adapter_raises_and_writes_nothing(layer):
    before = layer.backend.snapshot(layer.base)
    param = next(layer.adapters["default"].parameters())
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
    with pytest.raises(UnsafeMergeError, match="non-finite"):
        layer.merge(safe=True)
    assert isinstance(UnsafeMergeError("x"), ValueError)
    assert layer.backend.get_storage(layer.base).equal(before)
    assert not layer.merged


def test_merge_twice_and_unmerge_unmerged_are_clear_errors(layer):
    with pytest.raises(AdapterStateError, match="nothing is merged"):
        layer.unmerge()
    layer.merge()
    snapshot_after_first = layer.backend.snapshot(layer.base)
    with pytest.raises(AdapterStateError, match="already merged"):
        layer.merge()
    assert layer.backend.get_storage(layer.base).equal(snapshot_after_first)


def test_exact_unmerge_without_snapshot_points_to_inverse(layer):
    layer.merge(keep_snapshot=False)
    with pytest.raises(AdapterStateError, match="mode='inverse'"):
        layer.unmerge("exact")
    with pytest.raises(ConfigError, match="'exact' or 'inverse'"):
        layer.unmerge("approximate")  # type: ignore[arg-type]
    layer.unmerge("inverse")
    assert not layer.merged


def test_disabled_adapters_give_the_base_layer(layer, x):
    layer.disable_adapters()
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_forward(x))
    layer.enable_adapters()
    with torch.no_grad():
        assert not torch.equal(layer(x), layer.base_forward(x))


def test_cannot_disable_while_merged(layer):
    layer.merge()
    with pytest.raises(AdapterStateError, match="unmerge"):
        layer.disable_adapters()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_in_input_dtype(layer, x, dtype):
    with torch.no_grad():
        out = layer(x.to(dtype))
        ref = layer(x)
    assert out.dtype == dtype
    assert relative(out.float(), ref) < 0.05


def test_autocast_gives_autocast_dtype_and_close_values(layer, x):
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.dtype == torch.bfloat16
    assert relative(out.float(), ref) < 0.05


def test_gradients_reach_only_the_adapter(layer, x):
    layer(x.requires_grad_()).square().mean().backward()
    adapter_params = list(layer.adapters.parameters())
    assert adapter_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params)
    assert all(not p.requires_grad for p in layer.base.parameters())
    assert x.grad is not None


def test_extra_repr_names_method_backend_and_options(backend_spec):
    name, options = backend_spec
    layer = QuantAdapterLinear(float_linear(32, 16), AddDelta({"scale": 0.5}), name, backend_options=options)
    text = repr(layer)
    assert f"backend={name}(" in text and "add_delta(scale=0.5)" in text
    if options.get("quant_type") == "fp4":
        assert "quant_type='fp4'" in text


def test_named_adapters_switch_and_delete(backend_spec, x):
    name, options = backend_spec
    layer = QuantAdapterLinear(float_linear(IN, OUT), AddDelta(), name, backend_options=options)
    layer.add_adapter("other", MixInput())
    assert layer.active_adapter == "other"
    with torch.no_grad():
        out_other = layer(x)
        layer.set_adapter("default")
        out_default = layer(x)
    assert not torch.equal(out_other, out_default)
    layer.merge(adapter_name="other")
    with pytest.raises(AdapterStateError, match="merged"):
        layer.delete_adapter("other")
    layer.unmerge()
    layer.delete_adapter("other")
    assert list(layer.adapters) == ["default"]
    with pytest.raises(ConfigError, match="already exists"):
        layer.add_adapter("default", AddDelta())
    with pytest.raises(ConfigError, match="no adapter named 'missing'"):
        layer.set_adapter("missing")


def test_non_linear_and_double_wrap_are_refused():
    with pytest.raises(TargetError, match="Conv1d"):
        QuantAdapterLinear(torch.nn.Conv1d(4, 4, 1), AddDelta(), "none")
    layer = QuantAdapterLinear(float_linear(8, 8), AddDelta(), "none")
    with pytest.raises(TargetError, match="already"):
        QuantAdapterLinear(layer, AddDelta(), "none")


def test_backend_without_requantize_keeps_adapter_unmerged_and_says_why():
    from qadapt.protocols import BackendCapabilities
    from qadapt.registry.reference import FloatBackend

    class ForwardOnly(FloatBackend):
        name = "forward_only"
        capabilities = BackendCapabilities(requantize=False, snapshot=False)

    layer = QuantAdapterLinear(float_linear(8, 8), AddDelta(), ForwardOnly())
    before = layer.backend.snapshot(layer.base)
    with pytest.raises(CapabilityError, match="cannot requantize"):
        layer.merge()
    assert layer.backend.get_storage(layer.base).equal(before) and not layer.merged


def test_third_party_plugins_work_through_the_generic_layer(x):
    layer = QuantAdapterLinear(float_linear(IN, OUT), "rowscale", "half", method_options={"init": 0.1})
    before = layer.backend.snapshot(layer.base)
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        merged = layer(x)
    assert relative(merged, unmerged) <= 3 * result.error + 1e-5
    layer.unmerge()
    assert layer.backend.get_storage(layer.base).equal(before)
