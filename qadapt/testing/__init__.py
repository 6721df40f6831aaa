"""The plugin contract suite: conformance checks a plugin author runs against their own plugin.

Each check is a plain function that takes the plugin (an instance, or a registered name) and
raises ``AssertionError`` with a message naming the contract rule it broke. Run them from pytest::

    import pytest
    from qadapt.testing import backend_checks, method_checks

    @pytest.mark.parametrize("check", backend_checks(), ids=lambda c: c.__name__)
    def test_my_backend(check):
        check(MyBackend())

    @pytest.mark.parametrize("check", method_checks(), ids=lambda c: c.__name__)
    def test_my_method(check):
        check(MyMethod())

or all at once with :func:`check_backend` / :func:`check_method`, which collect every failure.
The rules live in ``backend_rules`` and ``method_rules``, their shared layers in ``fixtures``.
Checks run on small CPU layers (``64 -> 48`` by default); pass ``in_features`` / ``out_features``
where a plugin needs other sizes (a block size that must divide them, say).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from qadapt.protocols import Backend, Method
from qadapt.testing.backend_rules import (
    BackendCheck,
    backend_checks,
    check_calibrated_requantize,
    check_casts_keep_the_format,
    check_check_layer_agrees_with_quantize,
    check_checkpoint_refuses_damaged_tensors,
    check_checkpoint_round_trip,
    check_dequantize_shape_dtype_and_accuracy,
    check_forward_matches_dequantized_weight,
    check_forward_output_is_fresh_and_storage_untouched,
    check_forward_storage_matches_a_swap,
    check_gradient_reaches_input,
    check_group_offsets,
    check_group_scales,
    check_keep_state_requantize,
    check_low_precision_inputs,
    check_model_files,
    check_quantize_gives_an_owned_module,
    check_requantize_follows_like_not_options,
    check_requantize_round_trip,
    check_set_storage_swaps_and_snapshot_restores_bits,
    check_state_dict_round_trip,
)
from qadapt.testing.fixtures import _backend, _method
from qadapt.testing.method_rules import (
    MethodCheck,
    check_adapter_is_trainable_and_alone,
    check_check_layer_agrees_with_create_adapter,
    check_for_layer_keeps_the_method,
    check_merge_bias_inverts,
    check_merge_protocol_through_layer,
    check_merge_weight_matches_forward,
    check_row_merger_matches_merge_weight,
    check_training_step_moves_the_output,
    check_unmerge_weight_inverts_merge_weight,
    method_checks,
)


def _run(checks: list[Callable[..., None]], plugin: Any, **kwargs: Any) -> None:
    """Run ``checks``, each with the keywords it takes; collect every failure, naming its check.

    An exception other than ``AssertionError`` is reported as a failure of that check (with its
    type), so one broken rule never hides the others.
    """
    failures = []
    for check in checks:
        accepted = inspect.signature(check).parameters
        try:
            check(plugin, **{k: v for k, v in kwargs.items() if k in accepted})
        except AssertionError as exc:
            failures.append(f"{check.__name__}: {exc}")
        except Exception as exc:
            failures.append(f"{check.__name__}: raised {type(exc).__name__}: {exc}")
    if failures:
        raise AssertionError("plugin contract broken:\n  " + "\n  ".join(failures))


def check_backend(backend: Backend | str | type, **kwargs: Any) -> None:
    """Run every backend check; raise one ``AssertionError`` listing all failures.

    Keywords: ``options`` (for a name or class), ``other_options`` (a second, format-changing option
    set for :func:`check_requantize_follows_like_not_options`), ``in_features``, ``out_features``, ``seed``.
    """
    _run(backend_checks(), _backend(backend, kwargs.pop("options", None)), **kwargs)


def check_method(method: Method | str | type, **kwargs: Any) -> None:
    """Run every method check (on ``backend="none"`` unless given); one ``AssertionError`` lists all failures.

    Keywords: ``options`` (for a name or class), ``backend``, ``in_features``, ``out_features``, ``seed``.
    """
    _run(method_checks(), _method(method, kwargs.pop("options", None)), **kwargs)

__all__ = [
    "BackendCheck",
    "MethodCheck",
    "backend_checks",
    "check_adapter_is_trainable_and_alone",
    "check_backend",
    "check_calibrated_requantize",
    "check_casts_keep_the_format",
    "check_check_layer_agrees_with_create_adapter",
    "check_check_layer_agrees_with_quantize",
    "check_checkpoint_refuses_damaged_tensors",
    "check_checkpoint_round_trip",
    "check_dequantize_shape_dtype_and_accuracy",
    "check_for_layer_keeps_the_method",
    "check_forward_matches_dequantized_weight",
    "check_forward_output_is_fresh_and_storage_untouched",
    "check_forward_storage_matches_a_swap",
    "check_gradient_reaches_input",
    "check_group_offsets",
    "check_group_scales",
    "check_keep_state_requantize",
    "check_low_precision_inputs",
    "check_merge_bias_inverts",
    "check_merge_protocol_through_layer",
    "check_merge_weight_matches_forward",
    "check_method",
    "check_model_files",
    "check_quantize_gives_an_owned_module",
    "check_requantize_follows_like_not_options",
    "check_requantize_round_trip",
    "check_row_merger_matches_merge_weight",
    "check_set_storage_swaps_and_snapshot_restores_bits",
    "check_state_dict_round_trip",
    "check_training_step_moves_the_output",
    "check_unmerge_weight_inverts_merge_weight",
    "method_checks",
]
