"""One layer's merge on bare storage: the protocol every merge path runs (in memory and export).

``merge_storage`` takes a backend's :class:`QuantizedWeight`, an adapter and its method, and
returns the new storage plus a :class:`MergeResult`. Nothing here touches a module, so the same
code merges a live layer and a checkpoint's tensors.

The path per layer:

1. the method may merge straight into the storage (``Method.merge_storage``: exact, e.g. scales);
2. otherwise dequantize to float32, ``W' = method.merge_weight(W)``, check it is finite, and
   requantize: ``"keep"`` (the layer's scales kept bit for bit, codes chosen; the default where the
   backend can; a fresh requantize is tried too and kept when it lands closer, as it does for
   changes that leave a block's range), ``"calibrated"`` (codes and scales chosen against the layer's input statistics),
   or ``"fresh"`` (the backend's plain quantizer: new scales, what bitsandbytes and PEFT do);
3. a guard: if the merged layer is farther from the adapted layer than the unmerged base was
   (in the output metric ``H`` when calibration is given, else in weight space), the old storage
   is kept: a merge is never worse than no adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from qadapt.errors import CapabilityError, ConfigError, UnsafeMergeError
from qadapt.protocols import Backend, CalibrationStats, Method, QuantizedWeight

RequantizeMode = Literal["keep", "fresh", "calibrated"]
REQUANTIZE_MODES: tuple[str, ...] = ("keep", "fresh", "calibrated")

#: Rows per block when reducing over weight matrices (bounds temporaries to a few rows).
_ROWS = 256


@dataclass(frozen=True)
class MergeResult:
    """What one layer's merge did and measured.

    ``error``: relative Frobenius norm ``||deq(new) - W'|| / ||W'||`` between the exact float merged
    weight ``W'`` and what the storage now holds.
    ``delta_retained``: the projection of the stored change onto the intended change ``W' - W``
    (1.0: all of it; None when the adapter changes nothing).
    ``kept``: the share of the adapter's effect the merged layer keeps,
    ``1 - ||E_merged|| / ||E_base||`` where ``E`` is the difference to the adapted layer, measured on
    held-out calibration inputs (``metric == "output"``) or on the weights (``metric == "weight"``).
    0.0 is no better than no adapter; negative would be worse (the guard prevents it).
    ``path``: how the storage was written: ``"storage"`` (the method merged in-format, exact),
    ``"keep"``, ``"fresh"``, ``"calibrated"``, or ``"float"`` (an unquantized target).
    ``reverted``: the requantized layer was worse than no adapter, so the old storage was kept.
    ``tuned``: group scales were refit after requantization (``tune_scales``).
    """

    adapter: str
    error: float
    delta_retained: float | None
    kept: float | None = None
    metric: Literal["weight", "output"] = "weight"
    path: str = "fresh"
    reverted: bool = False
    tuned: bool = False

    def __float__(self) -> float:
        return self.error


class LayerFigures:
    """Summary figures over a ``layers: dict[str, MergeResult]`` attribute (merge and export reports)."""

    layers: dict[str, MergeResult]

    @property
    def max_error(self) -> float:
        """The largest relative merge error over the merged layers (0.0 when none)."""
        return max((r.error for r in self.layers.values()), default=0.0)

    @property
    def min_delta_retained(self) -> float | None:
        """The smallest share of an adapter's change that survived requantization (None: no change)."""
        kept = [r.delta_retained for r in self.layers.values() if r.delta_retained is not None]
        return min(kept) if kept else None

    @property
    def min_kept(self) -> float | None:
        """The smallest per-layer kept share (see :class:`MergeResult`; None when no adapter changed anything)."""
        kept = [r.kept for r in self.layers.values() if r.kept is not None]
        return min(kept) if kept else None

    @property
    def median_kept(self) -> float | None:
        """The median per-layer kept share."""
        kept = sorted(r.kept for r in self.layers.values() if r.kept is not None)
        return kept[len(kept) // 2] if kept else None

    @property
    def reverted(self) -> list[str]:
        """Layers whose requantized merge would have been worse than no adapter (old storage kept)."""
        return [name for name, r in self.layers.items() if r.reverted]


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
        raise CapabilityError(
            f"backend {backend.name!r} cannot requantize, so adapters stay unmerged on it "
            "(its forward is kept with the adapter applied on top)"
        )
    if path == "calibrated":
        assert stats is not None
        return backend.requantize_calibrated(weight, like, stats)
    if path == "keep":
        return backend.requantize_keep_state(weight, like)
    return backend.requantize(weight, like=like)


def check_finite(weight: torch.Tensor, what: str) -> None:
    """Raise :class:`UnsafeMergeError` when ``weight`` has NaN/Inf (in the dtype it is in)."""
    # A sum is non-finite whenever any term is (or on overflow, which the mask then clears);
    # 16-bit weights are summed in float32 so ordinary sizes do not overflow.
    total = weight.sum() if weight.dtype in (torch.float32, torch.float64) else weight.float().sum()
    if bool(torch.isfinite(total)):
        return
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise UnsafeMergeError(
            f"{what} gives {bad} non-finite value(s) of {weight.numel()} (NaN/Inf) in {weight.dtype}; "
            "nothing was written"
        )


def output_sq_error(error: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """``tr(E H E^T)`` for ``E [out, in]`` (``||E||_F^2`` when ``hessian`` is None).

    With ``H``, the products run in float32 (a float64 ``[out, in] @ [in, in]`` took 3x as long and
    was most of a calibrated merge's time at 4096) and each row's sum accumulates in float64; where
    float32 overflows (weights near 1e19 and up), it is computed again in float64.
    """
    if hessian is None:
        return sum(float(rows.double().square().sum()) for rows in error.split(_ROWS))
    h = hessian.float()
    total = sum(float(((rows @ h) * rows).sum(dtype=torch.float64)) for rows in error.float().split(_ROWS))
    if math.isfinite(total):
        return total
    h = hessian.double()
    return sum(float(((rows @ h) * rows).sum()) for rows in error.double().split(_ROWS))


def kept_share(base_sq: float, merged_sq: float) -> float | None:
    """``1 - sqrt(merged / base)``: the share of the adapter's effect kept (None when there was none)."""
    if base_sq <= 0.0 or not math.isfinite(base_sq):
        return None
    return 1.0 - math.sqrt(max(merged_sq, 0.0) / base_sq)


def weight_figures(before: torch.Tensor, target: torch.Tensor, stored: torch.Tensor) -> tuple[float, float | None]:
    """``(error, delta_retained)`` of :class:`MergeResult` from ``[out, in]`` weights, a block of rows at a time.

    Rows are scaled by their largest magnitude before squaring, so weights near the float32 limit
    (1e30) still give finite figures.
    """
    sums = torch.zeros(4, dtype=torch.float64)
    for b, t, s in zip(before.split(_ROWS), target.split(_ROWS), stored.split(_ROWS), strict=True):
        b, t, s = b.double(), t.double(), s.double()
        intended = t - b
        sums += torch.stack(
            [t.square().sum(), (s - t).square().sum(), ((s - b) * intended).sum(), intended.square().sum()]
        ).cpu()
    target_sq, error_sq, overlap, intended_sq = sums.tolist()
    error = math.sqrt(error_sq / target_sq) if target_sq > 0 else 0.0
    retained = overlap / intended_sq if intended_sq > 0 else None
    return error, retained


def float_merged_weight(
    backend: Backend, method: Method, adapter: nn.Module, storage: QuantizedWeight
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, W')``: the dequantized weight and the exact float merged weight, float32 ``[out, in]``."""
    weight = backend.dequantize(storage).float()
    merged = method.merge_weight(adapter, weight).float()
    return weight, merged


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
    """
    check_requantize_mode(requantize_mode)
    weight, merged = float_merged_weight(backend, method, adapter, storage)
    if safe:
        check_finite(merged, f"merging adapter {name!r}")
    new = method.merge_storage(adapter, backend, storage)
    path = "storage"
    stored: torch.Tensor | None = None
    if new is None:
        path = resolve_mode(backend, requantize_mode, stats)
        new = requantize(backend, merged, storage, path, stats)
        if path == "keep":
            # Kept scales win for the small moves trained adapters make (a fresh quantizer rescales
            # whole blocks); a change that leaves a block's range is clipped by them, where new
            # scales follow it. Both candidates are cheap: keep the closer one in the fit metric.
            fit = None if stats is None else stats.hessian
            fresh = requantize(backend, merged, storage, "fresh", stats)
            stored, fresh_stored = backend.dequantize(new).float(), backend.dequantize(fresh).float()
            if output_sq_error(fresh_stored - merged, fit) < output_sq_error(stored - merged, fit):
                new, path, stored = fresh, "fresh", fresh_stored
    tuned = None
    if tune_steps > 0 and stats is not None and path != "storage":
        tuned = tune_group_scales(backend, new, merged, stats.hessian, tune_steps)
        new = tuned if tuned is not None else new
    if stored is None or tuned is not None:
        stored = backend.dequantize(new).float()
    if safe:
        check_finite(stored, f"merging adapter {name!r} (as stored)")

    # (base, stored) squared output distances to W' per metric H: each is an [out, in] @ [in, in]
    # product, so the guard and the reported figure share them.
    distances: dict[int, tuple[float, float]] = {}

    def distance(hessian: torch.Tensor | None) -> tuple[float, float]:
        if id(hessian) not in distances:
            distances[id(hessian)] = (
                output_sq_error(weight - merged, hessian),
                output_sq_error(stored - merged, hessian),
            )
        return distances[id(hessian)]

    reverted = False
    if guard and path != "storage":
        # Kept only if no worse than the unmerged base on the fit rows and on the held-out rows the
        # report measures: the choice is binary (old codes or new), so judging it on held-out rows
        # cannot overfit, and a reported figure is then never below 0.
        metrics = [None] if stats is None else [stats.hessian] + ([] if heldout is None else [heldout])
        if any(merged_sq > base_sq for base_sq, merged_sq in map(distance, metrics)):
            new, stored, reverted = storage, weight, True
    error, retained = weight_figures(weight, merged, stored)
    base_sq, merged_sq = distance(heldout)
    kept = kept_share(base_sq, base_sq if reverted else merged_sq)
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


def _group_sums(values: torch.Tensor, group_size: int, num_groups: int) -> torch.Tensor:
    """Sum a weight-shaped ``[out, in]`` tensor over each flat run of ``group_size``: ``[num_groups]``."""
    flat = values.reshape(-1)
    pad = num_groups * group_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(num_groups, group_size).sum(1)


@torch.no_grad()
def tune_group_scales(
    backend: Backend, storage: QuantizedWeight, target: torch.Tensor, hessian: torch.Tensor, steps: int
) -> QuantizedWeight | None:
    """Refit ``storage``'s per-group scales so its layer's outputs come closer to ``target``'s.

    Minimises ``f(m) = tr(E H E^T)`` with ``E = deq(storage) * expand(m) - target`` (``target``:
    the exact merged weight ``[out, in]``; ``m``: one multiplier per group, starting at 1) by
    ``steps`` conjugate-gradient steps (``f`` is quadratic in ``m``; each step costs one
    ``[out, in] @ [in, in]`` product). Returns the new storage, or None when the backend has no
    group scales or the refit (after the format's own rounding of scales) does not lower ``f``.
    """
    if steps <= 0 or not backend.capabilities.group_scales:
        return None
    layout = backend.group_layout(storage)
    stored = backend.dequantize(storage).float()
    shape = tuple(stored.shape)
    hessian = hessian.float()

    def apply(v: torch.Tensor) -> torch.Tensor:  # the quadratic form's matrix times v: [num_groups]
        scaled = stored * layout.expand(v.float(), shape)
        return _group_sums((scaled @ hessian) * stored, layout.group_size, layout.num_groups).double()

    b = _group_sums((target @ hessian) * stored, layout.group_size, layout.num_groups).double()
    m = torch.ones(layout.num_groups, dtype=torch.float64, device=stored.device)
    r = b - apply(m)
    p = r.clone()
    rr = float(r @ r)
    for _ in range(steps):
        if rr <= 1e-30:
            break
        ap = apply(p)
        curvature = float(p @ ap)
        if curvature <= 0:
            break
        alpha = rr / curvature
        m += alpha * p
        r -= alpha * ap
        rr_next = float(r @ r)
        p = r + (rr_next / rr) * p
        rr = rr_next
    if not bool(torch.isfinite(m).all()):
        return None
    scales = backend.get_group_scales(storage).double() * m
    new = backend.with_group_scales(storage, scales.float())
    before = output_sq_error(stored - target, hessian)
    after = output_sq_error(backend.dequantize(new).float() - target, hessian)
    return new if after < before else None
