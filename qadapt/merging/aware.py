"""Merge-aware layers: the one storage such a layer computes with, and the merge that stores it.

A layer trained merge-aware (``qadapt.wrap(..., merge_aware=True)``) runs its forward on
:func:`aware_storage`: the storage its merge will write. :func:`merge_aware_storage` is that merge;
it writes the same storage (same function, same inputs, so the same bits) and skips the guard,
which would otherwise keep the old codes where rounding loses to no adapter: here the adapter was
trained on the rounded weight, so the rounded weight *is* the model that was trained.

The requantize used, for every backend, is the merge's default one: the method's exact in-format
merge (:meth:`Method.merge_storage`) where it has one, else :meth:`Backend.requantize_keep_state`
(``like``'s scales kept bit for bit, codes chosen) where the backend declares ``keep_state``, else
:meth:`Backend.requantize` ``(weight, like)``.
"""

from __future__ import annotations

import torch
from torch import nn

from qadapt.merging.engine import float_merged_weight, requantize, resolve_mode
from qadapt.merging.figures import check_finite, kept_share, output_sq_error, weight_figures
from qadapt.merging.result import MergePath, MergeResult
from qadapt.protocols import Backend, Method, QuantizedWeight


@torch.no_grad()
def aware_storage(
    backend: Backend, method: Method, adapter: nn.Module, storage: QuantizedWeight
) -> tuple[QuantizedWeight, MergePath]:
    """``(storage', path)``: the storage a merge-aware layer computes with and its merge stores.

    ``storage'`` is ``method.merge_storage(...)`` (path ``"storage"``) or
    ``requantize(merge_weight(adapter, dequantize(storage)), like=storage)`` along ``"keep"`` or
    ``"fresh"`` (see :func:`qadapt.merging.engine.resolve_mode` with ``"keep"``).
    Holds at most the float32 weight ``[out, in]`` and its merge at once. ``storage`` is not modified.
    """
    new = method.merge_storage(adapter, backend, storage)
    if new is not None:
        return new, "storage"
    path = resolve_mode(backend, "keep", None)
    _, merged = float_merged_weight(backend, method, adapter, storage)
    return requantize(backend, merged, storage, path, None), path


@torch.no_grad()
def merge_aware_storage(
    backend: Backend,
    method: Method,
    adapter: nn.Module,
    storage: QuantizedWeight,
    *,
    name: str = "default",
    safe: bool = True,
) -> tuple[QuantizedWeight, MergeResult]:
    """Merge a merge-aware layer: returns :func:`aware_storage` (never the old storage) and its figures.

    ``MergeResult.merge_aware`` is True and ``reverted`` False: the guard is not run. The figures
    (``error``, ``delta_retained``, ``kept``, weight space) still say how far the stored weight is
    from the float merge ``W'``.

    Raises:
        UnsafeMergeError: ``safe`` and the float merge or the stored weight has NaN/Inf.
    """
    weight, merged = float_merged_weight(backend, method, adapter, storage)
    if safe:
        check_finite(merged, f"merging adapter {name!r}")
    new, path = aware_storage(backend, method, adapter, storage)
    stored = backend.dequantize(new).float()
    if safe:
        check_finite(stored, f"merging adapter {name!r} (as stored)")
    error, retained = weight_figures(weight, merged, stored)
    kept = kept_share(output_sq_error(weight - merged, None), output_sq_error(stored - merged, None))
    return new, MergeResult(name, error, retained, kept, "weight", path, reverted=False, merge_aware=True)
