"""One layer's merge and inverse unmerge on bare storage: the protocol every merge path runs.

``merge_storage`` takes a backend's :class:`QuantizedWeight`, an adapter and its method, and
returns the new storage plus a :class:`MergeResult`. Nothing here touches a module, so the same
code merges a live layer, a whole model and a checkpoint's tensors.

The path per layer:

1. the method may merge straight into the storage (``Method.merge_storage``: exact, e.g. scales);
2. otherwise dequantize to float32, ``W' = method.merge_weight(W)``, check it is finite, and
   requantize: ``"keep"`` (the layer's scales kept bit for bit, codes chosen; the default where the
   backend can; a fresh requantize is tried too and kept when it lands closer, as it does for
   changes that leave a block's range), ``"calibrated"`` (codes and scales chosen against the layer's
   input statistics), or ``"fresh"`` (the backend's plain quantizer: new scales, what bitsandbytes
   and PEFT do);
3. a guard: if the merged layer is farther from the adapted layer than the unmerged base was
   (in the output metric ``H`` when calibration is given, else in weight space), the old storage
   is kept: a merge is never worse than no adapter.

``convert_weight`` is the same merge into another format (a float dtype or another backend's
quantizer), with the same guard; ``unmerge_storage`` the inverse unmerge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from qadapt.errors import CapabilityError, ConfigError
from qadapt.merging.figures import check_finite, kept_share, merge_sums, output_sq_error, weight_figures  # noqa: F401
from qadapt.merging.result import REQUANTIZE_MODES, MergePath, MergeResult, RequantizeMode
from qadapt.merging.scales import tune_group_scales
from qadapt.protocols import Backend, CalibrationStats, Method, QuantizedWeight

T = TypeVar("T")

_CANNOT_REQUANTIZE = (
    "backend {name!r} cannot requantize, so adapters stay unmerged on it "
    "(its forward is kept with the adapter applied on top)"
)


def check_requantize_mode(mode: object) -> None:
    """Raise :class:`ConfigError` for an unknown requantize mode."""
    if mode not in REQUANTIZE_MODES:
        raise ConfigError(f"requantize must be one of {', '.join(map(repr, REQUANTIZE_MODES))}, got {mode!r}")


def resolve_mode(backend: Backend, mode: RequantizeMode, stats: CalibrationStats | None) -> str:
    """The requantize path a backend actually runs for ``mode`` (keep/calibrated fall back to fresh)."""
    caps = backend.capabilities
    if mode == "calibrated":
        if stats is None:
            raise ConfigError("requantize='calibrated' needs calibration data: merge(model, calibration=batches)")
        if caps.calibrated:
            return "calibrated"
        mode = "keep"
    if mode == "keep" and caps.keep_state:
        return "keep"
    return "fresh"


def requantize(
    backend: Backend, weight: torch.Tensor, like: QuantizedWeight, path: str, stats: CalibrationStats | None
) -> QuantizedWeight:
    """Write float ``weight [out, in]`` into ``like``'s format along ``path`` (see :func:`resolve_mode`)."""
    if not backend.capabilities.requantize:
        raise CapabilityError(_CANNOT_REQUANTIZE.format(name=backend.name))
    if path == "calibrated":
        assert stats is not None
        return backend.requantize_calibrated(weight, like, stats)
    if path == "keep":
        return backend.requantize_keep_state(weight, like)
    return backend.requantize(weight, like=like)


def float_merged_weight(
    backend: Backend, method: Method, adapter: nn.Module, storage: QuantizedWeight
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, W')``: the dequantized weight and the exact float merged weight, float32 ``[out, in]``."""
    weight = backend.dequantize(storage).float()
    merged = method.merge_weight(adapter, weight).float()
    return weight, merged


@torch.no_grad()
def merged_bias(
    method: Method,
    adapter: nn.Module,
    bias: torch.Tensor | None,
    *,
    name: str = "default",
    safe: bool = True,
    inverse: bool = False,
) -> torch.Tensor | None:
    """The bias ``[out]`` float32 of the merged layer (``inverse``: of the unmerged one), or None when the
    method leaves the bias as it is (or the layer has none). See :meth:`Method.merge_bias`."""
    if bias is None:
        return None
    hook = method.unmerge_bias if inverse else method.merge_bias
    new = hook(adapter, bias.detach().float())
    if new is None:
        return None
    if tuple(new.shape) != tuple(bias.shape):
        member = "unmerge_bias" if inverse else "merge_bias"
        raise ConfigError(
            f"{method.name or type(method).__name__}.{member} returned shape {tuple(new.shape)} for a bias of "
            f"shape {tuple(bias.shape)}"
        )
    new = new.float()
    if safe:
        check_finite(new, f"{'unmerging' if inverse else 'merging'} adapter {name!r} (bias)")
    return new


class _Candidates:
    """The storages a merge chose between, dequantized, with their figures: weight-space sums from one
    pass (:func:`merge_sums`), output-space distances ``tr(E H E^T)`` each computed once per metric."""

    def __init__(self, backend: Backend, weight: torch.Tensor, merged: torch.Tensor, storages: dict) -> None:
        self.weight, self.merged = weight, merged
        self.storages: dict[str, QuantizedWeight] = storages
        self.stored = {key: backend.dequantize(new).float() for key, new in storages.items()}
        self.index = {key: i for i, key in enumerate(self.stored)}
        self.sums = merge_sums(weight, merged, list(self.stored.values()))
        self._distances: dict[tuple[str, int], float] = {}

    def distance(self, key: str, hessian: torch.Tensor | None) -> float:
        """Squared distance of candidate ``key`` (or ``"base"``: the unmerged ``W``) to ``W'`` in metric ``H``
        (None: weight space, from the shared sums)."""
        if hessian is None:
            return self.sums.base_sq if key == "base" else self.sums.error_sq[self.index[key]]
        cached = self._distances.get((key, id(hessian)))
        if cached is None:
            source = self.weight if key == "base" else self.stored[key]
            cached = self._distances[(key, id(hessian))] = output_sq_error(source - self.merged, hessian)
        return cached

    def check_finite(self, key: str, what: str) -> None:
        """The safe check of what candidate ``key`` stores (a full pass only when its sums are not finite)."""
        if not self.sums.finite(self.index[key]):
            check_finite(self.stored[key], what)


def _candidates(
    backend: Backend,
    method: Method,
    adapter: nn.Module,
    storage: QuantizedWeight,
    weight: torch.Tensor,
    merged: torch.Tensor,
    mode: RequantizeMode,
    stats: CalibrationStats | None,
) -> tuple[str, _Candidates]:
    """``(path, candidates)``: the method's in-format merge, or the requantize along ``mode``'s path; for
    ``"keep"`` a fresh requantize too (kept scales win for the small moves trained adapters make; a
    change that leaves a block's range is clipped by them, where new scales follow it)."""
    new = method.merge_storage(adapter, backend, storage)
    if new is not None:
        return "storage", _Candidates(backend, weight, merged, {"storage": new})
    path = resolve_mode(backend, mode, stats)
    storages = {path: requantize(backend, merged, storage, path, stats)}
    if path == "keep":
        storages["fresh"] = requantize(backend, merged, storage, "fresh", stats)
    candidates = _Candidates(backend, weight, merged, storages)
    if path == "keep":
        fit = None if stats is None else stats.hessian
        if candidates.distance("fresh", fit) < candidates.distance("keep", fit):
            path = "fresh"
    return path, candidates


@torch.no_grad()
def merge_storage(
    backend: Backend,
    method: Method,
    adapter: nn.Module,
    storage: QuantizedWeight,
    *,
    name: str = "default",
    requantize_mode: RequantizeMode = "keep",
    stats: CalibrationStats | None = None,
    heldout: torch.Tensor | None = None,
    safe: bool = True,
    guard: bool = True,
    tune_steps: int = 0,
) -> tuple[QuantizedWeight, MergeResult]:
    """Merge ``adapter`` into ``storage``; returns the new storage (``storage`` itself when reverted).

    ``stats``: the layer's fit statistics (needed for ``"calibrated"`` and ``tune_steps``; also the
    guard's metric). ``heldout``: ``H`` of held-out calibration rows ``[in, in]``, for the reported
    ``kept``. ``tune_steps``: refit the requantized layer's group scales (see
    :func:`tune_group_scales`; needs ``stats`` and a backend with group scales).

    Every figure and the guard share one pass of weight-space sums (:func:`merge_sums`) and, with
    calibration, one ``tr(E H E^T)`` per candidate and metric.
    """
    check_requantize_mode(requantize_mode)
    weight, merged = float_merged_weight(backend, method, adapter, storage)
    if safe:
        check_finite(merged, f"merging adapter {name!r}")
    path, candidates = _candidates(backend, method, adapter, storage, weight, merged, requantize_mode, stats)
    key, tuned = path, None  # key: the chosen candidate
    if tune_steps > 0 and stats is not None and path != "storage":
        tuned = tune_group_scales(backend, candidates.storages[path], merged, stats.hessian, tune_steps)
        if tuned is not None:
            key, candidates = "tuned", _Candidates(backend, weight, merged, {"tuned": tuned})
    if safe:
        candidates.check_finite(key, f"merging adapter {name!r} (as stored)")
    new = candidates.storages[key]
    reverted = False
    if guard and path != "storage":
        # Kept only if no worse than the unmerged base on the fit rows and on the held-out rows the
        # report measures: the choice is binary (old codes or new), so judging it on held-out rows
        # cannot overfit, and a reported figure is then never below 0.
        metrics = [None] if stats is None else [stats.hessian] + ([] if heldout is None else [heldout])
        if any(candidates.distance(key, h) > candidates.distance("base", h) for h in metrics):
            new, reverted = storage, True
    error, retained = candidates.sums.figures(None if reverted else candidates.index[key])
    base_sq = candidates.distance("base", heldout)
    kept = kept_share(base_sq, base_sq if reverted else candidates.distance(key, heldout))
    result = MergeResult(
        adapter=name,
        error=error,
        delta_retained=retained,
        kept=kept,
        metric="output" if heldout is not None else "weight",
        path=path,
        reverted=reverted,
        tuned=tuned is not None and not reverted,
    )
    return new, result


@torch.no_grad()
def unmerge_storage(
    backend: Backend, method: Method, adapter: nn.Module, storage: QuantizedWeight, *, name: str, safe: bool = True
) -> QuantizedWeight:
    """The inverse unmerge: ``requantize(method.unmerge_weight(dequantize(storage)))`` in ``storage``'s format.

    The result carries the quantization error of two round trips (an exact unmerge restores a snapshot).
    """
    if not backend.capabilities.requantize:
        raise CapabilityError(_CANNOT_REQUANTIZE.format(name=backend.name))
    weight = backend.dequantize(storage).float()
    restored = method.unmerge_weight(adapter, weight).float()
    if safe:
        check_finite(restored, f"unmerging adapter {name!r}")
    return backend.requantize(restored, like=storage)


@torch.no_grad()
def convert_weight(
    weight: torch.Tensor,
    merged: torch.Tensor,
    write: Callable[[torch.Tensor], T],
    read: Callable[[T], torch.Tensor],
    *,
    name: str,
    path: MergePath,
    what: str | None = None,
    safe: bool = True,
    guard: bool = True,
) -> tuple[T, MergeResult]:
    """Write the float merged weight ``merged [out, in]`` into another format; returns ``(written, result)``.

    ``write`` turns a float weight into the target format (a dtype cast, another backend's
    quantizer) and ``read`` back into float. With ``guard``, ``weight`` (the unmerged base) is
    written the same way too, and kept instead (``result.reverted``) when it lands closer to
    ``merged``: converting is never worse than converting without the adapter (one more ``write``).
    ``name``: the adapter, ``what``: how the finite checks describe the merge.
    """
    what = what or f"merging adapter {name!r}"
    if safe:
        check_finite(merged, what)
    written = [write(merged)]
    stored = [read(written[0]).float()]
    if guard:
        written.append(write(weight))
        stored.append(read(written[1]).float())
    sums = merge_sums(weight, merged, stored)
    if safe and not sums.finite(0):
        check_finite(stored[0], f"{what} (as stored)")
    chosen = 1 if guard and sums.error_sq[1] < sums.error_sq[0] else 0
    error, retained = sums.figures(chosen)
    kept = kept_share(sums.base_sq, sums.error_sq[chosen])
    return written[chosen], MergeResult(name, error, retained, kept, "weight", path, chosen == 1)
