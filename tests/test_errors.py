"""Errors and warnings: every error is a QAdaptError with the built-in base users catch, and a warning
points at the user's own call however it was reached."""

from __future__ import annotations

import warnings

import pytest
import torch
from methods_for_tests import AddDelta, KnownOptions
from tiny_models import perturb_adapters
from torch import nn

import qadapt
from qadapt.protocols import Backend, QuantizedWeight
from qadapt.registry.reference import FloatBackend

OPTIONAL_BACKEND_MEMBERS = [
    ("requantize_keep_state", (torch.zeros(2, 2), QuantizedWeight({}))),
    ("requantize_calibrated", (torch.zeros(2, 2), QuantizedWeight({}), None)),
    ("group_layout", (QuantizedWeight({}),)),
    ("get_group_scales", (QuantizedWeight({}),)),
    ("with_group_scales", (QuantizedWeight({}), torch.ones(1))),
    ("from_checkpoint", ({}, None)),
    ("to_checkpoint", (QuantizedWeight({}),)),
    ("checkpoint_config", (QuantizedWeight({}), None)),
    ("storage_options", (QuantizedWeight({}),)),
]


@pytest.mark.parametrize(("member", "args"), OPTIONAL_BACKEND_MEMBERS, ids=[m for m, _ in OPTIONAL_BACKEND_MEMBERS])
def test_a_missing_optional_member_raises_a_capability_error_that_is_not_implemented(member, args):
    backend = FloatBackend()  # the protocol's default member is what is under test, called directly
    with pytest.raises(qadapt.CapabilityError, match=f"does not implement {member}") as info:
        getattr(Backend, member)(backend, *args)
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, qadapt.QAdaptError)


def test_bad_plugin_options_type_and_registry_family_are_qadapt_errors():
    with pytest.raises(qadapt.ArgumentTypeError, match="options must be"):
        FloatBackend(options=3)
    with pytest.raises(qadapt.ConfigError, match="family must be one of"):
        qadapt.registry.names("quantizers")


def five() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(32, 32) for _ in range(5)])


@pytest.mark.parametrize("through", ["merge", "unwrap"])
def test_a_merge_warning_points_at_the_callers_line(through):
    model = qadapt.wrap(five(), method=AddDelta(KnownOptions()), backend="bnb4")
    perturb_adapters(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if through == "merge":
            qadapt.merge(model, warn_below=1.01)  # every layer keeps less than 101 %: it warns
        else:
            qadapt.unwrap(model, merge=True, warn_below=1.01)
    low = [w for w in caught if "keep less than" in str(w.message)]
    assert len(low) == 1
    assert low[0].filename == __file__, f"the warning points at {low[0].filename}:{low[0].lineno}"
