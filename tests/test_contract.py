"""The built-in and test plugins pass qadapt.testing's contract suite, and the suite catches a broken plugin."""

from __future__ import annotations

import inspect
from typing import Literal

import pytest
import torch
from conftest import BACKEND_IDS, BACKENDS
from methods_for_tests import AddDelta, MixInput
from pydantic import Field
from torch import nn

from qadapt import registry, testing
from qadapt.protocols import PluginOptions, QuantizedWeight
from qadapt.registry.reference import FloatBackend

METHOD_NAMES = ("oft", "randlora", "lora", "dora", "ia3", "vera", "loha", "lokr", "boft", "qalora")
BUILTIN_METHODS = [name for name in METHOD_NAMES if name in registry.names("methods")]
#: Backends beside bnb4 that every method is checked on (every method x backend).
LIBRARY_BACKEND_NAMES = ("torchao", "hqq", "compressed", "quanto", "gguf")
LIBRARY_BACKEND_IDS = [i for i, (name, _) in zip(BACKEND_IDS, BACKENDS, strict=True) if name in LIBRARY_BACKEND_NAMES]
LIBRARY_BACKENDS = [BACKENDS[BACKEND_IDS.index(i)] for i in LIBRARY_BACKEND_IDS]


#: Bounds a library's own quantizer cannot meet, by (backend id, check), with the reason.
#: torchao's symmetric intx quantizer scales a group's largest magnitude to 7.5 steps and rounds it to
#: code -8 or 7, so the dequantized weight's largest magnitude is 8 steps: a fresh requantize picks a
#: scale 8/7.5 larger and re-rounds every code (drift about the quantization error itself, 0.067 here).
#: compressed-tensors' symmetric int4 scales a group's absmax to 7.5 steps the same way.
#: GGUF's Q4_1/Q5_1 store each block's min as float16: a shifted min is rounded to 11 significant bits.
CHECK_OPTIONS = {
    ("torchao-int4", "check_requantize_round_trip"): {"max_relative_error": 0.1},
    ("compressed-w4", "check_requantize_round_trip"): {"max_relative_error": 0.1},
    ("gguf-q4_1", "check_group_offsets"): {"tolerance": 1e-3},
}


@pytest.mark.parametrize("check", testing.backend_checks(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", BACKENDS, ids=BACKEND_IDS)
def test_builtin_backends_pass_the_contract(check, spec):
    name, options = spec
    backend_id = BACKEND_IDS[BACKENDS.index(spec)]
    check(registry.backend_class(name)(options), **CHECK_OPTIONS.get((backend_id, check.__name__), {}))


@pytest.mark.parametrize("check", testing.method_checks(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", [AddDelta(), MixInput(), "rowscale", *BUILTIN_METHODS], ids=str)
def test_methods_pass_the_contract(check, method):
    check(method)


@pytest.mark.parametrize("method", ["rowscale", *BUILTIN_METHODS])
def test_methods_pass_the_contract_on_bnb4(method):
    testing.check_method(method, backend="bnb4")


@pytest.mark.parametrize("method", ["rowscale", *BUILTIN_METHODS])
@pytest.mark.parametrize("spec", LIBRARY_BACKENDS, ids=LIBRARY_BACKEND_IDS)
def test_methods_pass_the_contract_on_torchao_and_hqq(method, spec):
    name, options = spec
    testing.check_method(method, backend=registry.backend_class(name)(options))


def test_third_party_backend_passes_the_contract():
    testing.check_backend("half")


class LeakyBackend(FloatBackend):
    """Breaks two rules: requantize writes into ``like``, and forward returns shared memory."""

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        like.tensors["weight"].copy_(weight)
        return like

    def forward(self, module, x):
        out = super().forward(module, x)
        if torch.is_grad_enabled():
            return out
        self._cache = getattr(self, "_cache", None)
        if self._cache is None or self._cache.shape != out.shape:
            self._cache = out
        else:
            self._cache.copy_(out)
        return self._cache


def test_the_suite_names_each_broken_rule():
    with pytest.raises(AssertionError) as info:
        testing.check_backend(LeakyBackend())
    message = str(info.value)
    assert "check_requantize_round_trip: requantize() modified the storage passed as `like`" in message
    assert "check_forward_output_is_fresh_and_storage_untouched: a later forward() call overwrote" in message
    assert "check_dequantize_shape_dtype_and_accuracy" not in message


def test_the_suite_catches_a_method_whose_merge_disagrees_with_its_forward():
    class WrongMerge(AddDelta):
        def merge_weight(self, adapter, weight):
            return weight - adapter.delta.float()

    with pytest.raises(AssertionError, match="check_merge_weight_matches_forward"):
        testing.check_method(WrongMerge())


# ----------------------------------------------------------------- options for the suite

#: A second, format-changing option set per backend, for check_requantize_follows_like_not_options.
#: torchao's differs from each of the three test formats in config, group size and mapping; hqq's in
#: bit width, group size, axis, compute dtype and solver.
OTHER_OPTIONS = {
    "none": {},
    "bnb8": {"threshold": 6.0},
    "bnb4": {"quant_type": "fp4", "blocksize": 128, "compress_statistics": False},
    "int8sym": {"compute_dtype": "bfloat16"},
    "torchao": {"config": "int4", "group_size": 16, "mapping": "asymmetric"},
    "hqq": {"nbits": 3, "group_size": 32, "axis": 0, "compute_dtype": "bfloat16", "optimize": False},
    "compressed": {"group_size": 32, "scale_dtype": "bfloat16"},
    "quanto": {"weights": "qint2"},
    "gguf": {"type": "q8_0"},
}


@pytest.mark.parametrize("spec", [*BACKENDS, ("int8sym", {})], ids=[*BACKEND_IDS, "int8sym"])
def test_backends_pass_the_contract_with_a_second_option_set(spec, request):
    name, options = spec
    backend_id = request.node.callspec.id
    if not any(key[0] == backend_id for key in CHECK_OPTIONS):
        testing.check_backend(name, options=options, other_options=OTHER_OPTIONS[name])
        return
    # check_backend hands a keyword to every check that takes it, and max_relative_error means
    # different bounds in different checks: run the checks one by one, each with its own bound.
    for check in testing.backend_checks():
        takes_other = "other_options" in inspect.signature(check).parameters
        extra = {"other_options": OTHER_OPTIONS[name]} if takes_other else {}
        check(name, options=options, **extra, **CHECK_OPTIONS.get((backend_id, check.__name__), {}))


# ------------------------------------------------------- plugins that got past the suite before


class BufferLora(AddDelta):
    """A LoRA whose B factor was registered as a buffer: B stays zero, so training never moves the output."""

    def create_adapter(self, in_features, out_features, shared):
        module = nn.Module()
        module.a = nn.Parameter(torch.randn(2, in_features) * 0.1)
        module.register_buffer("b", torch.zeros(out_features, 2))
        return module

    def forward(self, adapter, x, base_forward):
        return base_forward(x) + x @ adapter.a.T @ adapter.b.T

    def merge_weight(self, adapter, weight):
        return weight + adapter.b @ adapter.a.detach()

    def unmerge_weight(self, adapter, weight):
        return weight - adapter.b @ adapter.a.detach()


class CopyingSetStorage(FloatBackend):
    """set_storage copies into the current tensor instead of swapping it in."""

    def set_storage(self, module, storage):
        module.weight.data.copy_(storage.tensors["weight"])


class CastOptions(PluginOptions):
    dtype: Literal["float32", "bfloat16"] = "float32"


class IgnoresLike(FloatBackend):
    """'Quantizes' by casting to options.dtype, and requantizes with its own options instead of `like`'s."""

    Options = CastOptions

    def quantize(self, linear):
        return linear.to(getattr(torch, self.options.dtype))

    def requantize(self, weight, like):
        return QuantizedWeight({"weight": weight.to(getattr(torch, self.options.dtype))})


class InferenceStorage(FloatBackend):
    """Makes its storage under torch.inference_mode (load_state_dict cannot write into it)."""

    def quantize(self, linear):
        with torch.inference_mode():
            weight = linear.weight.detach().clone()
        linear.weight = nn.Parameter(weight, requires_grad=False)
        return linear


class ViewForward(FloatBackend):
    """Keeps an output scratch tensor in its storage and returns it from forward."""

    def quantize(self, linear):
        linear.register_buffer("scratch", torch.empty(0))
        return linear

    def get_storage(self, module):
        return QuantizedWeight({"weight": module.weight.data, "scratch": module.scratch})

    def set_storage(self, module, storage):
        module.weight.data = storage.tensors["weight"]
        module.scratch = storage.tensors["scratch"]

    def requantize(self, weight, like):
        return QuantizedWeight({"weight": weight.to(like.tensors["weight"].dtype), "scratch": torch.empty(0)})

    def forward(self, module, x):
        out = super().forward(module, x)
        if torch.is_grad_enabled():
            return out
        if module.scratch.shape != out.shape:
            module.scratch = torch.empty_like(out)
        return module.scratch.copy_(out)


class NoGradDelta(AddDelta):
    """Computes its delta under no_grad: the output does not depend on the adapter through autograd."""

    def forward(self, adapter, x, base_forward):
        with torch.no_grad():
            delta = x @ adapter.delta.to(x.dtype).T
        return base_forward(x) + delta


class DetachingBackend(FloatBackend):
    """Detaches its input: no gradient reaches anything before the layer."""

    def forward(self, module, x):
        return super().forward(module, x.detach())


class Bf16Merge(AddDelta):
    """merge_weight returns bfloat16."""

    def merge_weight(self, adapter, weight):
        return (weight + adapter.delta.float()).bfloat16()


class RowMergerIgnoresRows(AddDelta):
    """row_merger adds the first rows of the delta to every block (ignores which rows it was given)."""

    def row_merger(self, adapter):
        delta = adapter.delta.detach().float()
        return lambda weight_rows, rows: weight_rows + delta[: weight_rows.shape[0]]


class OutputScale(AddDelta):
    """Scales the whole output (bias included) by ``1 + delta[:, 0]``, but merges only the weight."""

    def forward(self, adapter, x, base_forward):
        return base_forward(x) * (1 + adapter.delta[:, 0])

    def merge_weight(self, adapter, weight):
        return weight * (1 + adapter.delta.detach().float()[:, :1])

    def unmerge_weight(self, adapter, weight):
        return weight / (1 + adapter.delta.detach().float()[:, :1])


class BiasWithoutInverse(OutputScale):
    """Merges the scaled bias but cannot take it out again."""

    def merge_bias(self, adapter, bias):
        return bias * (1 + adapter.delta.detach().float()[:, 0])


class BiasInverseWrong(BiasWithoutInverse):
    """unmerge_bias does not undo merge_bias."""

    def unmerge_bias(self, adapter, bias):
        return bias.clone()


class ForLayerWithOtherOptions(AddDelta):
    """Answers for_layer with other options, which no checkpoint could describe."""

    def for_layer(self, name):
        return type(self)({"scale": 0.5})


class TrustingCheckpoint(FloatBackend):
    """from_checkpoint takes any float ``weight`` as it comes, whatever its length."""

    def from_checkpoint(self, tensors, config):
        weight = tensors.get("weight")
        if set(tensors) != {"weight"} or not weight.dtype.is_floating_point:
            return None
        return QuantizedWeight({"weight": weight})


class RequiredOptions(PluginOptions):
    scale: float = Field(description="No default: the suite must be told a value.")
    seed: int = 0


class NoDefaults(AddDelta):
    Options = RequiredOptions


@pytest.mark.parametrize(
    ("run", "rule", "message"),
    [
        (
            lambda: testing.check_method(BufferLora()),
            "check_training_step_moves_the_output",
            "every adapter gradient is zero",
        ),
        (
            lambda: testing.check_backend(CopyingSetStorage()),
            "check_set_storage_swaps_and_snapshot_restores_bits",
            "set_storage() wrote into the storage it replaced",
        ),
        (
            lambda: testing.check_backend(IgnoresLike, options={"dtype": "bfloat16"}, other_options={}),
            "check_requantize_follows_like_not_options",
            "requantize() depends on the instance's options, not only on `like`",
        ),
        (
            lambda: testing.check_backend(InferenceStorage()),
            "check_state_dict_round_trip",
            "storage from quantize() holds inference tensors ['weight']",
        ),
        (
            lambda: testing.check_backend(ViewForward()),
            "check_forward_output_is_fresh_and_storage_untouched",
            "forward() returned a tensor that shares memory with the layer's storage",
        ),
        (
            lambda: testing.check_method(NoGradDelta()),
            "check_adapter_is_trainable_and_alone",
            "the adapted output does not require grad",
        ),
        (
            lambda: testing.check_backend(DetachingBackend()),
            "check_gradient_reaches_input",
            "forward() output does not depend on the input through autograd",
        ),
        (
            lambda: testing.check_method(Bf16Merge()),
            "check_merge_weight_matches_forward",
            "merge_weight() returned torch.bfloat16; the contract is float32",
        ),
        (
            lambda: testing.check_method(RowMergerIgnoresRows()),
            "check_row_merger_matches_merge_weight",
            "row_merger's rows differ from merge_weight's",
        ),
        (
            lambda: testing.check_method(OutputScale()),
            "check_merge_weight_matches_forward",
            "linear(x, merge_weight(W), b) differs from the adapted forward by",
        ),
        (
            lambda: testing.check_method(BiasWithoutInverse()),
            "check_merge_bias_inverts",
            "BiasWithoutInverse implements merge_bias but not unmerge_bias",
        ),
        (
            lambda: testing.check_method(BiasInverseWrong()),
            "check_merge_bias_inverts",
            "unmerge_bias(merge_bias(b)) differs from b by",
        ),
        (
            lambda: testing.check_method(ForLayerWithOtherOptions()),
            "check_for_layer_keeps_the_method",
            "for_layer('proj') returned options {'scale': 0.5, 'seed': 0}, the method has",
        ),
        (
            lambda: testing.check_backend(TrustingCheckpoint()),
            "check_checkpoint_refuses_damaged_tensors",
            "from_checkpoint() read a layer whose 'weight' is one element short instead of refusing it",
        ),
    ],
    ids=[
        "buffer-adapter",
        "copying-set-storage",
        "requantize-ignores-like",
        "inference-storage",
        "forward-view-of-storage",
        "no-grad-delta",
        "detaching-backend",
        "bf16-merge",
        "row-merger-ignores-rows",
        "bias-not-merged",
        "bias-without-inverse",
        "bias-inverse-wrong",
        "for-layer-other-options",
        "trusting-checkpoint-reader",
    ],
)
def test_the_suite_names_the_rule_a_broken_plugin_breaks(run, rule, message):
    with pytest.raises(AssertionError) as info:
        run()
    text = str(info.value)
    assert f"{rule}: {message}" in text, text


def test_an_options_model_without_defaults_is_named_and_options_can_be_passed():
    with pytest.raises(
        AssertionError,
        match=r"options: NoDefaults cannot be built from its Options model's defaults "
        r"\(1 problem\(s\): scale: Field required\).*pass options=\{\.\.\.\} to the suite",
    ):
        testing.check_method(NoDefaults)
    testing.check_method(NoDefaults, options={"scale": 0.05})
    with pytest.raises(AssertionError, match=r"cannot be built from the options passed to the suite"):
        testing.check_method(NoDefaults, options={"scale": "big"})


def test_an_unexpected_exception_is_reported_under_its_check():
    class Exploding(AddDelta):
        def unmerge_weight(self, adapter, weight):
            raise KeyError("boom")

    with pytest.raises(AssertionError, match=r"check_unmerge_weight_inverts_merge_weight: raised KeyError: 'boom'"):
        testing.check_method(Exploding())


def test_check_layer_must_refuse_with_a_config_error_and_accept_only_what_works():
    class BareError(AddDelta):
        def check_layer(self, in_features, out_features):
            if in_features % 2:
                raise ValueError("odd")

    class AcceptsTooMuch(FloatBackend):
        def quantize(self, linear):
            if linear.in_features % 2:
                raise RuntimeError("odd widths are not supported")
            return linear

    with pytest.raises(
        AssertionError, match=r"check_layer\(7, 5\) raised ValueError \(odd\); it must raise .*ConfigError"
    ):
        testing.check_method(BareError())
    with pytest.raises(AssertionError, match=r"check_layer\(7, 5\) accepted the shape but quantize\(\) raised"):
        testing.check_check_layer_agrees_with_quantize(AcceptsTooMuch())


def test_the_suite_catches_a_keep_state_requantize_that_recomputes_scales():
    from qadapt_bnb.bnb8 import Bnb8Backend

    class FreshScales(Bnb8Backend):
        def requantize_keep_state(self, weight, like):
            return self.requantize(weight, like)

    with pytest.raises(AssertionError, match=r"check_keep_state_requantize: .* farther from the target"):
        testing.check_backend(FreshScales())


def test_the_suite_catches_group_scales_that_leak_into_other_groups():
    from qadapt_bnb.bnb8 import Bnb8Backend

    class Leaky(Bnb8Backend):
        def with_group_scales(self, storage, scales):
            return super().with_group_scales(storage, scales * 1.1)

    with pytest.raises(AssertionError, match=r"check_group_scales: with_group_scales\(get_group_scales\(\)\) moves"):
        testing.check_backend(Leaky())


def test_the_suite_catches_zero_points_written_to_the_wrong_group():
    from qadapt_hqq.backend import HqqBackend

    class ShiftedOffsets(HqqBackend):
        def with_group_offsets(self, storage, offsets):
            return super().with_group_offsets(storage, offsets.roll(1))

    with pytest.raises(AssertionError, match=r"check_group_offsets: with_group_offsets\(get_group_offsets\(\)\) moves"):
        testing.check_backend(ShiftedOffsets({"nbits": 4, "group_size": 16}))
