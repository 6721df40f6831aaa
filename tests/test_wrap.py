"""qadapt.wrap / merge / unmerge / unwrap / named adapters / summary on small real models."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import model_checksum
from methods_for_tests import AddDelta, KnownOptions, MixInput
from qadapt_int8sym import Int8SymBackend
from tiny_models import model_output, perturb_adapters, tiny_llama, token_ids
from torch import nn

import qadapt
from qadapt.errors import AdapterStateError, ConfigError, LayerFitError, TargetError, UnsafeMergeError
from qadapt.protocols import Method


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, qadapt.QuantAdapterLinear)]


# ------------------------------------------------------------------------------------- targeting


def test_suffix_targets_wrap_only_those_layers_and_freeze_the_rest():
    model = qadapt.wrap(tiny_llama(), method=AddDelta(), backend="none", targets=["q_proj", "mlp.down_proj"])
    assert layer_names(model) == [
        f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn.q_proj", "mlp.down_proj")
    ]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in name for name in trainable)


def test_all_linear_leaves_out_the_head_unless_named():
    model = qadapt.wrap(tiny_llama(), method=AddDelta(), backend="none", targets="all-linear")
    assert len(layer_names(model)) == 14 and "lm_head" not in layer_names(model)
    with_head = qadapt.wrap(tiny_llama(), method=AddDelta(), backend="none", targets=["all-linear", "lm_head"])
    assert "lm_head" in layer_names(with_head)


def test_regex_targets_and_exclusions():
    model = qadapt.wrap(
        tiny_llama(),
        method=AddDelta(),
        backend="none",
        targets=re.compile(r".*layers\.\d+\.self_attn\.[qkv]_proj"),
        exclude=["re:.*layers\\.1\\..*", "k_proj"],
    )
    assert layer_names(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_no_match_lists_the_closest_names():
    model = tiny_llama()
    with pytest.raises(TargetError, match=r"no module matched targets \['q_prj'\]; closest module names: q_proj"):
        qadapt.wrap(model, method=AddDelta(), backend="none", targets=["q_prj"])


def test_a_non_linear_target_is_refused_by_name():
    with pytest.raises(TargetError, match=r"model.norm is a LlamaRMSNorm, not a linear layer"):
        qadapt.wrap(tiny_llama(), method=AddDelta(), backend="none", targets=["model.norm"])


def test_wrapping_twice_points_to_add_adapter():
    model = qadapt.wrap(tiny_llama(), method=AddDelta(), backend="none", targets=["q_proj"])
    with pytest.raises(TargetError, match=r"already has adapters.*add_adapter"):
        qadapt.wrap(model, method=AddDelta(), backend="none", targets=["q_proj"])


# ------------------------------------------------------------------------------------ all or nothing


class RefusesWideLayers(AddDelta):
    """Refuses layers wider than 64 inputs: the MLP's down_proj comes after several layers that fit."""

    def check_layer(self, in_features: int, out_features: int) -> None:
        if in_features > 64:
            raise ConfigError(f"in_features={in_features} is over 64")


def test_failed_check_leaves_the_model_bit_identical_and_lists_every_layer():
    model = tiny_llama()
    before = model_checksum(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(
        TargetError, match=r"(?s)cannot wrap 2 of 14.*model.layers.0.mlp.down_proj \(128 -> 64\)"
    ) as info:
        qadapt.wrap(model, method=RefusesWideLayers(), backend="bnb4")
    # What docs/concepts.md says: check_layer raises ConfigError, and that is what reaches the user.
    assert isinstance(info.value, ConfigError) and isinstance(info.value, LayerFitError)
    assert model_checksum(model) == before
    assert not layer_names(model)
    assert [p.requires_grad for p in model.parameters()] == flags


class GroupedInt8(Int8SymBackend):
    """The example int8 backend, with (pretend) groups of 48 inputs that must divide in_features."""

    name = "grouped"

    def check_layer(self, in_features: int, out_features: int) -> None:
        if in_features % 48:
            raise ConfigError(f"backend.options.group_size=48 does not divide in_features={in_features}")


def test_backend_check_layer_names_every_float_layer_it_cannot_quantize():
    model = tiny_llama()
    before = model_checksum(model)
    with pytest.raises(LayerFitError) as info:
        qadapt.wrap(model, method="lora", backend=GroupedInt8(), targets=["q_proj", "down_proj"])
    message = str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, TargetError)
    assert "cannot wrap 4 of 4 target layers" in message
    for index in (0, 1):
        assert f"model.layers.{index}.self_attn.q_proj (64 -> 64): backend.options.group_size=48" in message
        assert f"model.layers.{index}.mlp.down_proj (128 -> 64): backend.options.group_size=48" in message
    assert model_checksum(model) == before and not layer_names(model)
    with pytest.raises(ConfigError, match="in_features=64"):
        qadapt.QuantAdapterLinear(nn.Linear(64, 8), "lora", GroupedInt8())


class FailsOnSecondAdapter(AddDelta):
    """Creating the second adapter fails (after the first layer was already quantized)."""

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> nn.Module:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise RuntimeError("out of memory (simulated in the method)")
        return super().create_adapter(in_features, out_features, shared)


def test_failure_midway_puts_the_original_modules_back():
    model = tiny_llama()
    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = model_checksum(model)
    with pytest.raises(RuntimeError, match="simulated"):
        qadapt.wrap(model, method=FailsOnSecondAdapter(), backend="bnb8")
    assert model_checksum(model) == before
    assert all(model.get_submodule(name) is module for name, module in originals.items())


def test_named_backend_refuses_a_layer_quantized_by_another():
    model = qadapt.unwrap(qadapt.wrap(tiny_llama(), method=AddDelta(), backend="bnb8", targets="q_proj"), merge=False)
    with pytest.raises(TargetError, match=r"backend 'bnb4' cannot adapt a Linear8bitLt.*belongs to backend 'bnb8'"):
        qadapt.wrap(model, method=AddDelta(), backend="bnb4", targets="q_proj")


def test_auto_adopts_each_layer_by_its_owner():
    # q_proj quantized by bnb4, v_proj by bnb8, everything else float.
    model = qadapt.wrap(tiny_llama(), method=AddDelta(), backend="bnb4", targets="q_proj")
    model = qadapt.unwrap(model, merge=False)
    model = qadapt.unwrap(qadapt.wrap(model, method=AddDelta(), backend="bnb8", targets="v_proj"), merge=False)
    qadapt.wrap(model, method=AddDelta(KnownOptions(scale=0.0)), targets="all-linear")
    owners = {name.rsplit(".", 1)[-1]: m.backend.name for name, m in model.named_modules() if hasattr(m, "backend")}
    assert owners == {"q_proj": "bnb4", "v_proj": "bnb8", "k_proj": "none", "o_proj": "none"} | {
        "gate_proj": "none",
        "up_proj": "none",
        "down_proj": "none",
    }
    assert qadapt.summary(model).backends == {"bnb4": 2, "bnb8": 2, "none": 10}


def test_summary_counts():
    model = qadapt.wrap(tiny_llama(), method=AddDelta(), backend="bnb4", targets=["q_proj", "k_proj"])
    info = qadapt.summary(model)
    assert info.layers == 4 and info.adapters == ["default"]
    # AddDelta holds a full [out, in] delta per layer: q_proj 64x64, k_proj 32x64.
    assert info.trainable_params == 2 * (64 * 64 + 32 * 64)
    packed = sum(m.base.weight.numel() for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear))
    assert packed < info.quantized_bytes < 2 * packed  # 4-bit codes plus scales
    assert info.quantized_bytes < info.total_bytes
    assert "layers wrapped:   4 (bnb4 x4)" in str(info)


def test_summary_counts_the_same_whatever_the_backend_stores_codes_in():
    """bnb4 keeps packed codes in a Parameter, int8sym in buffers, bnb8 in a Parameter and its matmul state:
    the weights they represent count alike, and every byte the model holds is counted once."""
    plain = tiny_llama()
    float_params = sum(p.numel() for p in plain.parameters())
    float_bytes = sum(t.numel() * t.element_size() for t in [*plain.parameters(), *plain.buffers()])
    infos = {}
    for backend in ("none", "bnb4", "bnb8", "int8sym"):
        model = qadapt.wrap(tiny_llama(), method="lora", backend=backend, targets=["q_proj", "down_proj"])
        with torch.no_grad():
            model(token_ids())  # bnb8 moves its codes into its matmul state on the first forward
        infos[backend] = qadapt.summary(model)
    adapters = infos["none"].trainable_params
    assert adapters == 2 * 8 * ((64 + 64) + (128 + 64))
    for backend, info in infos.items():
        assert info.trainable_params == adapters, backend
        assert info.total_params == float_params + adapters, backend
    assert infos["none"].total_bytes == float_bytes + 4 * adapters
    for backend in ("bnb4", "bnb8", "int8sym"):
        saved = infos["none"].quantized_bytes - infos[backend].quantized_bytes
        assert saved > 0 and infos[backend].total_bytes == infos["none"].total_bytes - saved, backend


# -------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("backend", ["none", "bnb8", "bnb4"])
def test_merge_unmerge_unwrap(backend: str):
    ids = token_ids()
    model = qadapt.wrap(tiny_llama(), method=MixInput(KnownOptions(scale=0.02)), backend=backend)
    adapted = model_output(model, ids)
    before = model_checksum(model)
    report = qadapt.merge(model)
    assert len(report.layers) == 14 and report.adapter == "default"
    assert 0.0 <= report.max_error < (1e-6 if backend == "none" else 0.2)
    merged = model_output(model, ids)
    assert torch.allclose(merged, adapted, rtol=0, atol=1e-4 if backend == "none" else 0.5)
    qadapt.unmerge(model)
    assert model_checksum(model) == before
    qadapt.unwrap(model, merge=True)
    assert not layer_names(model)
    # After unwrap the layer runs its own forward; bitsandbytes' Linear4bit repacks the weight for
    # its CPU inference kernel, which rounds differently from the dequantize-and-matmul path.
    unwrapped = model_output(model, ids)
    if backend == "bnb4":
        assert (unwrapped - merged).abs().max() / merged.abs().max() < 1e-2
    else:
        assert torch.equal(unwrapped, merged)


class NaNOnLayer(AddDelta):
    """Merging gives NaN for one chosen layer width."""

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        if weight.shape[1] == 128:
            return weight * float("nan")
        return super().merge_weight(adapter, weight)


@pytest.mark.parametrize("keep_snapshot", [True, False])
def test_a_failed_merge_rolls_back_the_layers_before(keep_snapshot: bool):
    model = qadapt.wrap(tiny_llama(), method=NaNOnLayer(), backend="bnb4")
    before = model_checksum(model)
    with pytest.raises(UnsafeMergeError, match="non-finite"):
        qadapt.merge(model, keep_snapshot=keep_snapshot)
    assert model_checksum(model) == before
    assert not any(m.merged for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear))


def test_unmerge_needs_something_merged():
    model = qadapt.wrap(tiny_llama(), method=AddDelta(), backend="none", targets="q_proj")
    with pytest.raises(AdapterStateError, match="nothing to unmerge"):
        qadapt.unmerge(model)


def test_unwrap_without_merge_gives_the_plain_quantized_model():
    ids = token_ids()
    model = qadapt.wrap(tiny_llama(), method=AddDelta(), backend="bnb8")
    qadapt.disable_adapters(model)
    plain = model_output(model, ids)
    qadapt.enable_adapters(model)
    qadapt.merge(model)
    qadapt.unwrap(model, merge=False)
    assert torch.equal(model_output(model, ids), plain)


# ----------------------------------------------------------------------------------- named adapters


def test_named_adapters_add_switch_disable_delete_and_merge_one():
    ids = token_ids()
    model = qadapt.wrap(tiny_llama(), method=AddDelta(KnownOptions(seed=1)), backend="none", targets="q_proj")
    first = model_output(model, ids)
    qadapt.add_adapter(model, "other", MixInput(KnownOptions(scale=0.1, seed=2)))
    assert qadapt.list_adapters(model) == ["default", "other"]
    second = model_output(model, ids)
    assert not torch.allclose(first, second)
    qadapt.set_adapter(model, "default")
    assert torch.equal(model_output(model, ids), first)
    qadapt.disable_adapters(model)
    plain = model_output(model, ids)
    assert not torch.allclose(plain, first)
    qadapt.enable_adapters(model)
    report = qadapt.merge(model, adapter_name="other")
    assert report.adapter == "other"
    assert torch.allclose(model_output(model, ids), second, atol=1e-5)
    with pytest.raises(AdapterStateError, match="merged"):
        qadapt.delete_adapter(model, "other")
    qadapt.unmerge(model)
    qadapt.delete_adapter(model, "other")
    assert qadapt.list_adapters(model) == ["default"]
    with pytest.raises(ConfigError, match=r"no adapter named 'other'.*adapters: default"):
        qadapt.set_adapter(model, "other")


def test_add_adapter_on_some_layers_runs_the_others_plain():
    ids = token_ids()
    model = qadapt.wrap(tiny_llama(), method=AddDelta(KnownOptions(scale=0.0)), backend="none", targets="q_proj")
    plain = model_output(model, ids)
    with pytest.raises(ConfigError, match=r"'half' is taken by a torch.nn.Module attribute"):
        qadapt.add_adapter(model, "half", AddDelta())
    qadapt.add_adapter(model, "partial", AddDelta(), targets=["model.layers.0.self_attn.q_proj"])
    layer1 = model.get_submodule("model.layers.1.self_attn.q_proj")
    assert layer1.active_adapter is None
    assert not torch.allclose(model_output(model, ids), plain)


class CheckedMethod(AddDelta):
    def check_layer(self, in_features: int, out_features: int) -> None:
        raise ConfigError("never fits")


def test_add_adapter_failure_changes_nothing():
    model = qadapt.wrap(tiny_llama(), method=AddDelta(), backend="none", targets="q_proj")
    before = model_checksum(model)
    with pytest.raises(TargetError, match="never fits"):
        qadapt.add_adapter(model, "bad", CheckedMethod())
    assert model_checksum(model) == before and qadapt.list_adapters(model) == ["default"]


def test_wrap_by_plugin_name_validates_options_with_locations():
    with pytest.raises(ConfigError, match=r"method.options.int: unknown key 'int'; did you mean 'init'\?"):
        qadapt.wrap(tiny_llama(), method="rowscale", backend="none", method_options={"int": 0.5})
    model = qadapt.wrap(tiny_llama(), method="rowscale", backend="none", method_options={"init": 0.5}, targets="q_proj")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer.methods["default"], Method) and layer.methods["default"].options.init == 0.5
    perturb_adapters(model)


def test_auto_skips_a_backend_whose_options_have_no_valid_defaults(make_distribution):
    make_distribution(
        "needs-options",
        "1.0",
        {"qadapt.backends": {"needsopts": "needs_opts:NeedsOptions"}},
        {
            "needs_opts": """
            from pydantic import Field
            from qadapt.protocols import PluginOptions
            from qadapt.registry.reference import FloatBackend

            class Required(PluginOptions):
                bits: int = Field(description="no default")

            class NeedsOptions(FloatBackend):
                Options = Required
            """
        },
    )
    model = qadapt.wrap(tiny_llama(), method="lora", backend="auto", targets="q_proj")
    assert qadapt.summary(model).backends == {"none": 2}
