"""The method contract: one check per rule a method plugin must keep."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from qadapt.errors import ConfigError
from qadapt.model.layer import QuantAdapterLinear
from qadapt.protocols import Backend, Method
from qadapt.registry.reference import float_base_layer
from qadapt.testing.backend_rules import _check_layer_refusal, _shapes
from qadapt.testing.fixtures import _backend, _float_linear, _input, _method, _relative

MethodCheck = Callable[..., None]


# Every method check takes the method (instance, class or registered name) and, as keywords,
# ``options``, ``backend`` (default "none"), ``in_features``, ``out_features`` and ``seed``.


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
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """The adapter has trainable parameters, they get gradients through autograd, and the base gets none."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed)
    params = [p for p in layer.adapters.parameters() if p.requires_grad]
    assert params, "the adapter has no trainable parameter"
    layer.train()
    out = layer(_input(in_features, seed))
    assert out.requires_grad, (
        "the adapted output does not require grad: the adapter's contribution is computed outside autograd "
        "(under torch.no_grad, or from detached tensors), so training cannot move it"
    )
    out.square().mean().backward()
    assert all(p.grad is not None for p in params), "an adapter parameter got no gradient"
    assert all(not p.requires_grad for p in layer.base.parameters()), "a base parameter is trainable"


def check_training_step_moves_the_output(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """Some adapter gradient is non-zero, and one gradient step on the trainable parameters moves the output
    (catches trainable state kept in buffers or plain attributes, which an optimizer never sees)."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed).train()
    params = [p for p in layer.adapters.parameters() if p.requires_grad]
    x = _input(in_features, seed)
    target = torch.randn(*x.shape[:-1], out_features, generator=torch.Generator().manual_seed(seed + 3))
    out = layer(x)
    if not out.requires_grad:
        raise AssertionError("the adapted output does not require grad (see check_adapter_is_trainable_and_alone)")
    (out - target).square().mean().backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert any(bool(g.abs().sum() > 0) for g in grads), (
        "every adapter gradient is zero: the output does not depend on the trainable parameters"
    )
    with torch.no_grad():
        before = layer.eval()(x)
        for p in params:
            if p.grad is not None:
                p.sub_(p.grad / p.grad.norm().clamp_min(1e-12) * (p.norm() + 1e-3) * 1e-2)
        after = layer(x)
    assert _relative(after, before) > 1e-7, (
        "a gradient step on the adapter's parameters does not move the output: the state the forward uses is "
        "not (only) in nn.Parameters (a buffer or plain tensor attribute is never updated by an optimizer)"
    )


def check_merge_weight_matches_forward(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-4,
) -> None:
    """``merge_weight(W)`` is float32 ``[out, in]``, and a plain linear on it gives the adapted forward (eval)."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed).eval()
    name = layer.active_adapter
    x = _input(in_features, seed)
    with torch.no_grad():
        weight = layer.backend.dequantize_module(layer.base)
        kept = weight.clone()
        merged = layer.methods[name].merge_weight(layer.adapters[name], weight)
        assert torch.equal(weight, kept), "merge_weight() modified its input"
        assert merged.shape == weight.shape, f"merge_weight() shape {tuple(merged.shape)}"
        assert merged.dtype == torch.float32, (
            f"merge_weight() returned {merged.dtype}; the contract is float32 [out, in] (compute the merged weight "
            "in float32, whatever the adapter's dtype)"
        )
        bias = layer.base.bias
        expected = layer.methods[name].forward(layer.adapters[name], x, float_base_layer(weight, bias))
        new_bias = None if bias is None else layer.methods[name].merge_bias(layer.adapters[name], bias.float())
        merged_b = bias if new_bias is None else new_bias
        error = _relative(F.linear(x, merged, merged_b), expected)
    changes = "merge_bias(b)" if new_bias is not None else "b"
    assert error <= tolerance, (
        f"linear(x, merge_weight(W), {changes}) differs from the adapted forward by {error:.2e}"
        + (
            "; a method whose output is not W'x + b for the base's own bias b (it scales the bias, say) "
            "returns the merged bias from merge_bias()"
            if new_bias is None
            else ""
        )
    )


def check_unmerge_weight_inverts_merge_weight(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-4,
) -> None:
    """``unmerge_weight(merge_weight(W)) ~ W``, float32, and neither writes into its input."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed)
    name = layer.active_adapter
    with torch.no_grad():
        weight = layer.backend.dequantize_module(layer.base)
        merged = layer.methods[name].merge_weight(layer.adapters[name], weight)
        kept = merged.clone()
        restored = layer.methods[name].unmerge_weight(layer.adapters[name], merged)
    assert torch.equal(merged, kept), "unmerge_weight() modified its input"
    assert restored.dtype == torch.float32, f"unmerge_weight() returned {restored.dtype}; the contract is float32"
    error = _relative(restored, weight)
    assert error <= tolerance, f"unmerge_weight(merge_weight(W)) differs from W by {error:.2e}"


def check_merge_protocol_through_layer(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """Through ``QuantAdapterLinear``: merge keeps the output, exact unmerge restores the bits."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed).eval()
    x = _input(in_features, seed)
    before = layer.backend.snapshot(layer.base)
    bias_before = None if layer.bias_tensor is None else layer.bias_tensor.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        merged = layer(x)
    error = _relative(merged, unmerged)
    assert error <= 3 * result.error + 1e-4, f"merged output differs by {error:.2e} (merge error {result.error:.2e})"
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before), "exact unmerge is not bit-identical"
    if bias_before is not None:
        assert torch.equal(layer.bias_tensor, bias_before), "exact unmerge did not give the bias back bit for bit"


def check_row_merger_matches_merge_weight(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-5,
) -> None:
    """A ``row_merger`` (optional) gives ``merge_weight``'s rows, block by uneven block, float32."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed)
    name = layer.active_adapter
    method_obj, adapter = layer.methods[name], layer.adapters[name]
    with torch.no_grad():
        merge_rows = method_obj.row_merger(adapter)
        if merge_rows is None:
            return
        weight = layer.backend.dequantize_module(layer.base)
        expected = method_obj.merge_weight(adapter, weight)
        bounds = [0, 1, out_features // 3, out_features - 1, out_features]  # blocks of 1, a few, the rest
        parts = []
        for start, stop in itertools.pairwise(bounds):
            rows = weight[start:stop].clone()
            part = merge_rows(rows, slice(start, stop))
            assert torch.equal(rows, weight[start:stop]), "row_merger's function modified its input rows"
            assert part.dtype == torch.float32 and part.shape == rows.shape, (
                f"row_merger's function returned {part.dtype} {tuple(part.shape)} for rows {start}..{stop}; "
                f"the contract is float32 {tuple(rows.shape)}"
            )
            parts.append(part)
    error = _relative(torch.cat(parts), expected)
    assert error <= tolerance, f"row_merger's rows differ from merge_weight's by {error:.2e}"


def check_check_layer_agrees_with_create_adapter(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """``check_layer`` refuses a shape only with a ConfigError, and every shape it accepts gets an adapter.

    Shapes the backend's own ``check_layer`` refuses (a group size that does not divide them, say)
    are skipped: the method is not at fault there.
    """
    method = _method(method, options)
    backend = _backend(backend)
    for in_f, out_f in _shapes(in_features, out_features):
        if _check_layer_refusal(method, in_f, out_f):
            continue
        try:
            backend.check_layer(in_f, out_f)
        except ConfigError:
            continue
        try:
            QuantAdapterLinear(_float_linear(in_f, out_f, seed), method, backend)
        except Exception as exc:
            raise AssertionError(
                f"check_layer({in_f}, {out_f}) accepted the shape but building the adapted layer raised "
                f"{type(exc).__name__}: {exc}"
            ) from None


def _overrides(method: Method, member: str) -> bool:
    return getattr(type(method), member) is not getattr(Method, member)


def check_merge_bias_inverts(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-5,
) -> None:
    """``merge_bias`` and ``unmerge_bias`` (optional, a pair): float32 ``[out]``, inputs left alone, the one
    undoing the other. A method implementing neither passes (skipped: capability not declared)."""
    method_obj = _method(method, options)
    has = {member: _overrides(method_obj, member) for member in ("merge_bias", "unmerge_bias")}
    if not any(has.values()):
        return
    if not all(has.values()):
        given = next(m for m, v in has.items() if v)
        lacking = next(m for m, v in has.items() if not v)
        raise AssertionError(
            f"{type(method_obj).__name__} implements {given} but not {lacking}: a merged bias that cannot be "
            "taken out breaks the inverse unmerge (they come as a pair)"
        )
    layer = _perturbed_layer(method_obj, backend, in_features, out_features, seed)
    name = layer.active_adapter
    adapter, layer_method = layer.adapters[name], layer.methods[name]
    with torch.no_grad():
        bias = layer.base.bias.detach().float().clone()
        kept = bias.clone()
        merged = layer_method.merge_bias(adapter, bias)
        assert torch.equal(bias, kept), "merge_bias() modified its input"
        if merged is None:
            return  # this layer's bias is left as it is (an IA³ feed-forward layer, say)
        assert merged.dtype == torch.float32 and merged.shape == bias.shape, (
            f"merge_bias() returned {merged.dtype} {tuple(merged.shape)}; the contract is float32 {tuple(bias.shape)}"
        )
        merged_kept = merged.clone()
        restored = layer_method.unmerge_bias(adapter, merged)
        assert torch.equal(merged, merged_kept), "unmerge_bias() modified its input"
    assert restored is not None, "merge_bias() changed the bias but unmerge_bias() returned None (bias unchanged)"
    assert restored.dtype == torch.float32, f"unmerge_bias() returned {restored.dtype}; the contract is float32"
    error = _relative(restored, bias)
    assert error <= tolerance, f"unmerge_bias(merge_bias(b)) differs from b by {error:.2e}"


def check_for_layer_keeps_the_method(
    method: Method | str,
    *,
    options: Any = None,
    names: tuple[str, ...] = ("proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"),
) -> None:
    """``for_layer(name)`` (optional) returns an instance of the method's own class with the same options
    (a checkpoint describes every layer by one set of options) and leaves the method itself alone."""
    method_obj = _method(method, options)
    before = method_obj.options.model_dump(mode="json")
    for name in names:
        layer_method = method_obj.for_layer(name)
        assert type(layer_method) is type(method_obj), (
            f"for_layer({name!r}) returned a {type(layer_method).__name__}, not a {type(method_obj).__name__}: a "
            "layer's method must be the registered plugin itself (checkpoints name it by its class)"
        )
        got = layer_method.options.model_dump(mode="json")
        assert got == before, (
            f"for_layer({name!r}) returned options {got}, the method has {before}: per-layer choices must come from "
            "the layer's name under one set of options, so that a checkpoint's options describe every layer"
        )
    assert method_obj.options.model_dump(mode="json") == before, "for_layer() changed the method's own options"


def method_checks() -> list[MethodCheck]:
    """Every method check, for ``pytest.mark.parametrize``."""
    return [
        check_check_layer_agrees_with_create_adapter,
        check_adapter_is_trainable_and_alone,
        check_training_step_moves_the_output,
        check_merge_weight_matches_forward,
        check_unmerge_weight_inverts_merge_weight,
        check_merge_protocol_through_layer,
        check_row_merger_matches_merge_weight,
        check_merge_bias_inverts,
        check_for_layer_keeps_the_method,
    ]
