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
Checks run on small CPU layers (``64 -> 48`` by default); pass ``in_features`` / ``out_features``
where a plugin needs other sizes (a block size that must divide them, say).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qadapt import registry
from qadapt.layer import QuantAdapterLinear
from qadapt.protocols import Backend, Method

BackendCheck = Callable[..., None]
MethodCheck = Callable[..., None]


def _backend(backend: Backend | str, options: Any = None) -> Backend:
    return registry.backend_class(backend)(options) if isinstance(backend, str) else backend


def _method(method: Method | str, options: Any = None) -> Method:
    return registry.method_class(method)(options) if isinstance(method, str) else method


def _float_linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.1)
    return linear


def _input(in_features: int, seed: int, batch: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    return torch.randn(*batch, in_features, generator=torch.Generator().manual_seed(seed + 1))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = torch.linalg.vector_norm(b.float())
    return float(torch.linalg.vector_norm((a - b).float()) / denominator) if denominator > 0 else float(a.abs().max())


def _quantized(backend: Backend, in_features: int, out_features: int, seed: int) -> tuple[nn.Linear, nn.Module]:
    linear = _float_linear(in_features, out_features, seed)
    reference = _float_linear(in_features, out_features, seed)  # quantize() may consume its input
    return reference, backend.quantize(linear)


# ------------------------------------------------------------------- backend checks


def check_quantize_gives_an_owned_module(
    backend: Backend | str, *, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """``quantize`` returns a module that ``owns`` accepts, with the right ``features``."""
    backend = _backend(backend)
    _, module = _quantized(backend, in_features, out_features, seed)
    assert backend.owns(module), "owns() must be True for a module returned by quantize()"
    assert not backend.owns(nn.Conv1d(4, 4, 1)), "owns() must be False for a non-linear module"
    features = backend.features(module)
    assert tuple(features) == (in_features, out_features), f"features() gave {features}"


def check_dequantize_shape_dtype_and_accuracy(
    backend: Backend | str,
    *,
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    max_relative_error: float = 0.25,
) -> None:
    """``dequantize`` gives a finite float32 ``[out, in]`` weight close to the original."""
    backend = _backend(backend)
    reference, module = _quantized(backend, in_features, out_features, seed)
    weight = backend.dequantize(backend.get_storage(module))
    assert weight.shape == (out_features, in_features), f"dequantize() shape {tuple(weight.shape)}"
    assert weight.dtype == torch.float32, f"dequantize() must return float32, got {weight.dtype}"
    assert bool(torch.isfinite(weight).all()), "dequantize() returned non-finite values"
    error = _relative(weight, reference.weight.detach())
    assert error <= max_relative_error, f"quantization error {error:.4f} above {max_relative_error}"


def check_forward_matches_dequantized_weight(
    backend: Backend | str,
    *,
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-3,
) -> None:
    """``forward`` equals a float linear on the dequantized weight (same bias), shape ``[..., out]``."""
    backend = _backend(backend)
    reference, module = _quantized(backend, in_features, out_features, seed)
    x = _input(in_features, seed)
    with torch.no_grad():
        out = backend.forward(module, x)
        expected = F.linear(x, backend.dequantize_module(module), reference.bias)
    assert out.shape == (*x.shape[:-1], out_features), f"forward() shape {tuple(out.shape)}"
    error = _relative(out, expected)
    assert error <= tolerance, f"forward() differs from the dequantized reference by {error:.2e}"


def check_forward_output_is_fresh_and_storage_untouched(
    backend: Backend | str, *, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """Writing into a forward output does not change the next one, and forward leaves storage as it was."""
    backend = _backend(backend)
    _, module = _quantized(backend, in_features, out_features, seed)
    before = backend.snapshot(module)
    x = _input(in_features, seed)
    with torch.no_grad():
        first = backend.forward(module, x)
        expected = first.clone()
        first.add_(1.0)
        second = backend.forward(module, x)
    assert torch.equal(second, expected), "writing into a forward() output changed a later output"
    assert torch.equal(first, expected + 1.0), "a later forward() call overwrote an earlier output"
    assert backend.get_storage(module).equal(before), "forward() modified the quantized storage"


def check_requantize_round_trip(
    backend: Backend | str,
    *,
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    max_relative_error: float = 0.05,
) -> None:
    """Requantizing a dequantized weight reproduces it closely and never writes into ``like``."""
    backend = _backend(backend)
    _, module = _quantized(backend, in_features, out_features, seed)
    storage = backend.get_storage(module)
    before = storage.clone()
    weight = backend.dequantize(storage)
    backend.requantize(weight * 0.5 + 0.01, like=storage)
    assert storage.equal(before), "requantize() modified the storage passed as `like`"
    again = backend.requantize(weight, like=before)
    error = _relative(backend.dequantize(again), weight)
    assert error <= max_relative_error, f"dequantize -> requantize -> dequantize drifts by {error:.4f}"


def check_set_storage_swaps_and_snapshot_restores_bits(
    backend: Backend | str, *, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """``set_storage`` makes a new storage current; ``restore(snapshot)`` brings back identical bits."""
    backend = _backend(backend)
    _, module = _quantized(backend, in_features, out_features, seed)
    snapshot = backend.snapshot(module)
    storage = backend.get_storage(module)
    changed = backend.requantize(backend.dequantize(storage) * 1.5 + 0.01, like=storage)
    backend.set_storage(module, changed)
    assert backend.get_storage(module).equal(changed), "get_storage() after set_storage() differs"
    assert snapshot.equal(backend.snapshot(module)) is False, "set_storage() had no effect"
    x = _input(in_features, seed)
    with torch.no_grad():
        out_changed = backend.forward(module, x)
    backend.restore(module, snapshot)
    assert backend.get_storage(module).equal(snapshot), "restore() is not bit-identical"
    with torch.no_grad():
        assert not torch.equal(backend.forward(module, x), out_changed), "forward() ignores restored storage"


def check_gradient_reaches_input(
    backend: Backend | str, *, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """When ``capabilities.train_forward``, gradients flow through forward to the input only."""
    backend = _backend(backend)
    if not backend.capabilities.train_forward:
        return
    _, module = _quantized(backend, in_features, out_features, seed)
    x = _input(in_features, seed).requires_grad_()
    backend.forward(module, x).square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()), "no finite gradient reached the input"


def check_low_precision_inputs(
    backend: Backend | str, *, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """bfloat16 and float16 inputs give finite outputs close to the float32 one."""
    backend = _backend(backend)
    _, module = _quantized(backend, in_features, out_features, seed)
    x = _input(in_features, seed)
    with torch.no_grad():
        expected = backend.forward(module, x).float()
        for dtype in (torch.bfloat16, torch.float16):
            out = backend.forward(module, x.to(dtype)).float()
            assert bool(torch.isfinite(out).all()), f"{dtype} input gives non-finite output"
            error = _relative(out, expected)
            assert error < 0.05, f"{dtype} input differs from float32 by {error:.3f}"


def check_checkpoint_round_trip(
    backend: Backend | str, *, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """With ``capabilities.checkpoint``: ``from_checkpoint(to_checkpoint(s))`` gives ``s`` back bit for bit,
    ``checkpoint_config`` is JSON, ``storage_options`` re-create the format, ``export_targets`` validate."""
    backend = _backend(backend)
    if not backend.capabilities.checkpoint:
        assert not backend.export_targets, "export_targets need capabilities.checkpoint"
        return
    _, module = _quantized(backend, in_features, out_features, seed)
    storage = backend.get_storage(module)
    tensors = backend.to_checkpoint(storage)
    assert tensors and all(isinstance(t, torch.Tensor) for t in tensors.values()), "to_checkpoint() gave no tensors"
    assert "bias" not in tensors, "to_checkpoint() must leave the bias to the caller"
    config = backend.checkpoint_config(storage)
    json.dumps(config)  # raises when the config is not plain JSON
    again = backend.from_checkpoint(dict(tensors), config)
    assert again is not None, "from_checkpoint() does not read what to_checkpoint() wrote"
    assert again.equal(storage), "from_checkpoint(to_checkpoint(storage)) is not bit-identical"
    assert backend.checkpoint_config(again, config) == config, "checkpoint_config() changes when read back"
    options = backend.storage_options(storage)
    fresh = type(backend)(options).quantize(_float_linear(in_features, out_features, seed + 5))
    assert backend.storage_options(backend.get_storage(fresh)) == options, (
        f"quantize() under storage_options() {options} writes another format"
    )
    for target, target_options in backend.export_targets.items():
        type(backend)({**options, **target_options})  # raises when the target's options do not validate
        assert target.isidentifier() or target.replace("-", "_").isidentifier(), f"export target name {target!r}"
    foreign = {"weight": torch.zeros(3, 4, dtype=torch.int16), "unrelated.key": torch.zeros(1)}
    assert backend.from_checkpoint(foreign, None) is None, "from_checkpoint() must return None for a foreign layout"


def backend_checks() -> list[BackendCheck]:
    """Every backend check, for ``pytest.mark.parametrize``."""
    return [
        check_quantize_gives_an_owned_module,
        check_dequantize_shape_dtype_and_accuracy,
        check_forward_matches_dequantized_weight,
        check_forward_output_is_fresh_and_storage_untouched,
        check_requantize_round_trip,
        check_set_storage_swaps_and_snapshot_restores_bits,
        check_gradient_reaches_input,
        check_low_precision_inputs,
        check_checkpoint_round_trip,
    ]


# -------------------------------------------------------------------- method checks


def _perturbed_layer(
    method: Method, backend: str | Backend, in_features: int, out_features: int, seed: int
) -> QuantAdapterLinear:
    layer = QuantAdapterLinear(_float_linear(in_features, out_features, seed), method, backend)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for param in layer.adapters.parameters():
            if param.dtype.is_floating_point:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return layer


def check_adapter_is_trainable_and_alone(
    method: Method | str,
    *,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """The adapter has trainable parameters, they get gradients, and the base gets none."""
    layer = _perturbed_layer(_method(method), backend, in_features, out_features, seed)
    params = [p for p in layer.adapters.parameters() if p.requires_grad]
    assert params, "the adapter has no trainable parameter"
    layer.train()
    layer(_input(in_features, seed)).square().mean().backward()
    assert all(p.grad is not None for p in params), "an adapter parameter got no gradient"
    assert all(not p.requires_grad for p in layer.base.parameters()), "a base parameter is trainable"


def check_merge_weight_matches_forward(
    method: Method | str,
    *,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-4,
) -> None:
    """A plain linear on ``merge_weight(W)`` gives the adapted forward (in eval mode)."""
    layer = _perturbed_layer(_method(method), backend, in_features, out_features, seed).eval()
    name = layer.active_adapter
    x = _input(in_features, seed)
    with torch.no_grad():
        weight = layer.backend.dequantize_module(layer.base)
        kept = weight.clone()
        merged = layer.methods[name].merge_weight(layer.adapters[name], weight)
        assert torch.equal(weight, kept), "merge_weight() modified its input"
        assert merged.shape == weight.shape, f"merge_weight() shape {tuple(merged.shape)}"
        bias = layer.base.bias
        expected = layer.methods[name].forward(layer.adapters[name], x, lambda z: F.linear(z, weight, bias))
        error = _relative(F.linear(x, merged, bias), expected)
    assert error <= tolerance, f"linear(merge_weight(W)) differs from the adapted forward by {error:.2e}"


def check_unmerge_weight_inverts_merge_weight(
    method: Method | str,
    *,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-4,
) -> None:
    """``unmerge_weight(merge_weight(W)) ~ W`` and neither writes into its input."""
    layer = _perturbed_layer(_method(method), backend, in_features, out_features, seed)
    name = layer.active_adapter
    with torch.no_grad():
        weight = layer.backend.dequantize_module(layer.base)
        merged = layer.methods[name].merge_weight(layer.adapters[name], weight)
        kept = merged.clone()
        restored = layer.methods[name].unmerge_weight(layer.adapters[name], merged)
    assert torch.equal(merged, kept), "unmerge_weight() modified its input"
    error = _relative(restored, weight)
    assert error <= tolerance, f"unmerge_weight(merge_weight(W)) differs from W by {error:.2e}"


def check_merge_protocol_through_layer(
    method: Method | str,
    *,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """Through ``QuantAdapterLinear``: merge keeps the output, exact unmerge restores the bits."""
    layer = _perturbed_layer(_method(method), backend, in_features, out_features, seed).eval()
    x = _input(in_features, seed)
    before = layer.backend.snapshot(layer.base)
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        merged = layer(x)
    error = _relative(merged, unmerged)
    assert error <= 3 * result.error + 1e-4, f"merged output differs by {error:.2e} (merge error {result.error:.2e})"
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before), "exact unmerge is not bit-identical"


def method_checks() -> list[MethodCheck]:
    """Every method check, for ``pytest.mark.parametrize``."""
    return [
        check_adapter_is_trainable_and_alone,
        check_merge_weight_matches_forward,
        check_unmerge_weight_inverts_merge_weight,
        check_merge_protocol_through_layer,
    ]


# -------------------------------------------------------------------------- runners


def _run(checks: list[Callable[..., None]], plugin: Any, **kwargs: Any) -> None:
    failures = []
    for check in checks:
        try:
            check(plugin, **kwargs)
        except AssertionError as exc:
            failures.append(f"{check.__name__}: {exc}")
    if failures:
        raise AssertionError("plugin contract broken:\n  " + "\n  ".join(failures))


def check_backend(backend: Backend | str, **kwargs: Any) -> None:
    """Run every backend check; raise one ``AssertionError`` listing all failures."""
    _run(backend_checks(), _backend(backend), **kwargs)


def check_method(method: Method | str, **kwargs: Any) -> None:
    """Run every method check (on ``backend="none"`` unless given); one ``AssertionError`` lists all failures."""
    _run(method_checks(), _method(method), **kwargs)
