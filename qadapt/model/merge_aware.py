"""The merge-aware forward: compute with the storage the merge will store, train with a straight-through gradient.

A merge-aware layer's output is the backend's own quantized forward on
``aware_storage(adapter, W)`` (:func:`qadapt.merging.aware.aware_storage`, the storage ``merge()``
writes), with the merged bias where the method changes it. Its gradient is the one of the
method's own float adapted forward (``method.forward``, what plain training differentiates): the
value of the quantized path, the gradient of the float one (straight-through). So after training,
``merge()`` stores exactly what training computed with and the merged model computes what was
trained. Nothing is asked of the method beyond the protocol (``merge_weight`` need not be
differentiable).

Cost per step and layer, beyond plain training: one merge and requantize (cached while the
adapter's tensors and the base storage are unchanged, so gradient accumulation and gradient
checkpointing's recompute reuse it) and one more quantized forward. The float weight and its merge
exist only while one layer's target is computed. A method's dropout acts on the gradient path only
(the value, like the merged layer, has none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qadapt.merging.aware import aware_storage
from qadapt.merging.engine import merged_bias
from qadapt.protocols import Backend, Method, QuantizedWeight

#: ``swap_bias(bias)``: make ``bias`` the base module's bias object (the layer's ``_swap_bias``).
SwapBias = Callable[[torch.Tensor | None], None]


def bias_like(value: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """``value`` as a bias object of ``like``'s kind, dtype and device (a frozen parameter for a parameter)."""
    assert like is not None
    tensor = value.detach().to(device=like.device, dtype=like.dtype)
    return nn.Parameter(tensor, requires_grad=False) if isinstance(like, nn.Parameter) else tensor


@dataclass
class AwareTarget:
    """What a merge-aware layer computes with for one adapter: the storage and bias its merge will write.

    ``bias`` is None when the merge leaves the bias as it is. ``key`` identifies the inputs it was
    computed from (the adapter's tensors by identity, version and address; the base storage and bias
    by identity); the references in it keep those objects alive, so an identity cannot be reused.
    """

    key: tuple[Any, ...]
    storage: QuantizedWeight
    bias: torch.Tensor | None


def _where(t: torch.Tensor) -> tuple[Any, ...]:
    """Where a tensor's values live: backends never write storage in place, so this names its values."""
    return (t.device, t.dtype, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _key(name: str, adapter: nn.Module, storage: QuantizedWeight, bias: torch.Tensor | None) -> tuple[Any, ...]:
    # Storage tensors are often fresh aliases (``param.data``) on every call, so they are named by where
    # their values live; the key holds them, so that memory cannot be reused while the key exists.
    # Adapter tensors change in place (optimizer steps): their version counters say when.
    tensors = [*adapter.parameters(), *adapter.buffers()]
    versions = tuple((t, t._version, t.data_ptr()) for t in tensors)
    held = (*storage.tensors.values(), *([] if bias is None else [bias]))
    return (name, versions, tuple(_where(t) for t in held), held)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Keys equal: the same adapter tensors (identity, version, address), storage and bias at the same place."""
    name_a, versions_a, where_a, _ = a
    name_b, versions_b, where_b, _ = b
    return (
        name_a == name_b
        and where_a == where_b
        and len(versions_a) == len(versions_b)
        and all(x[0] is y[0] and x[1:] == y[1:] for x, y in zip(versions_a, versions_b, strict=True))
    )


def aware_target(
    backend: Backend,
    method: Method,
    adapter: nn.Module,
    storage: QuantizedWeight,
    bias: torch.Tensor | None,
    *,
    name: str,
    cached: AwareTarget | None,
) -> AwareTarget:
    """The :class:`AwareTarget` for these inputs: ``cached`` when it was computed from the same ones."""
    key = _key(name, adapter, storage, bias)
    if cached is not None and _same(cached.key, key):
        return cached
    new, _ = aware_storage(backend, method, adapter, storage)
    new_bias = merged_bias(method, adapter, bias, name=name, safe=False)
    return AwareTarget(key, new, None if new_bias is None else bias_like(new_bias, bias))


@dataclass
class AwareCall:
    """One merge-aware forward of a layer: everything its backward needs besides the input."""

    backend: Backend
    method: Method
    adapter: nn.Module
    module: nn.Module
    #: the base storage the merge starts from (a reference, not a copy).
    base_storage: QuantizedWeight
    base_bias: torch.Tensor | None
    target: AwareTarget
    #: the adapter parameters that take a gradient.
    params: list[nn.Parameter]

    def quantized(self, x: torch.Tensor, swap_bias: SwapBias) -> torch.Tensor:
        """The backend's forward ``[..., out]`` on the target storage (and bias), the module left as it was."""
        if self.target.bias is None:
            return self.backend.forward_storage(self.module, self.target.storage, x)
        swap_bias(self.target.bias)
        try:
            return self.backend.forward_storage(self.module, self.target.storage, x)
        finally:
            swap_bias(self.base_bias)


def aware_forward(
    call: AwareCall, x: torch.Tensor, swap_bias: SwapBias, float_forward: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """The merge-aware output ``[..., out]`` for ``x [..., in]``: the quantized path's value; where autograd
    records (grad enabled and the input or an adapter parameter needs it), the gradient of
    ``float_forward()``, the method's own adapted forward.

    Straight-through as ``q + (f - f.detach())``: for finite ``f`` the added term is exactly zero, so
    the value is ``q`` bit for bit, and autograd sees the identity from the output to ``f``.
    """
    with torch.no_grad():
        quantized = call.quantized(x, swap_bias)
    if not (torch.is_grad_enabled() and (x.requires_grad or call.params)):
        return quantized
    adapted = float_forward()
    return quantized + (adapted - adapted.detach())
