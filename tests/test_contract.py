"""The built-in and test plugins pass qadapt.testing's contract suite, and the suite catches a broken plugin."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND_IDS, BACKENDS
from methods_for_tests import AddDelta, MixInput

from qadapt import registry, testing
from qadapt.protocols import QuantizedWeight
from qadapt.reference import FloatBackend

BUILTIN_METHODS = [name for name in ("oft", "randlora") if name in registry.names("methods")]
LIBRARY_BACKEND_IDS = [i for i, (name, _) in zip(BACKEND_IDS, BACKENDS, strict=True) if name in ("torchao", "hqq")]
LIBRARY_BACKENDS = [BACKENDS[BACKEND_IDS.index(i)] for i in LIBRARY_BACKEND_IDS]


#: Bounds a library's own quantizer cannot meet, by (backend id, check), with the reason.
#: torchao's symmetric intx quantizer scales a group's largest magnitude to 7.5 steps and rounds it to
#: code -8 or 7, so the dequantized weight's largest magnitude is 8 steps: a fresh requantize picks a
#: scale 8/7.5 larger and re-rounds every code (drift about the quantization error itself, 0.067 here).
CHECK_OPTIONS = {("torchao-int4", "check_requantize_round_trip"): {"max_relative_error": 0.1}}


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
