"""What a merge did and measured: :class:`MergeResult` per layer, :class:`LayerFigures` over layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RequantizeMode = Literal["keep", "fresh", "calibrated"]
REQUANTIZE_MODES: tuple[str, ...] = ("keep", "fresh", "calibrated")
#: How a merge wrote a layer: the method merged in-format (``"storage"``, exact), a requantize
#: path, a float target (``"float"``), or another backend's format (``"to:<backend>"``).
MergePath = Literal["storage", "keep", "fresh", "calibrated", "float"] | str


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
    ``merge_aware``: the layer was trained merge-aware, so the merge stored exactly the storage its
    forward computed with (:func:`qadapt.merging.aware.aware_storage`); the guard was not run.
    """

    adapter: str
    error: float
    delta_retained: float | None
    kept: float | None = None
    metric: Literal["weight", "output"] = "weight"
    path: MergePath = "fresh"
    reverted: bool = False
    tuned: bool = False
    merge_aware: bool = False

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
