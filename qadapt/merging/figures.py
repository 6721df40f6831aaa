"""The figures of a merge: weight-space error and retained change, output-space distances, the finite check.

Every merge path (a live layer, a whole model, an export) measures through these, a block of rows
at a time, so the temporaries stay a few rows big.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from qadapt.errors import ConfigError, UnsafeMergeError

#: Rows per block when reducing over weight matrices (bounds temporaries to a few rows).
ROWS = 256
#: Elements per block of :func:`merge_sums` (temporaries stay in cache and below the allocator's mmap threshold).
_BLOCK_ELEMENTS = 1 << 20

Precision = Literal["float64", "float32"]


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
    was most of a calibrated merge's time at 4096), so does each block's dot product, and blocks add
    up in float64; where float32 overflows (weights near 1e19 and up), it is computed again in float64.
    """
    if hessian is None:
        return sum(float(rows.double().square().sum()) for rows in error.split(ROWS))
    h = hessian.float()
    total = sum(float(torch.dot((rows @ h).reshape(-1), rows.reshape(-1))) for rows in error.float().split(ROWS))
    if math.isfinite(total):
        return total
    h = hessian.double()
    return sum(float(((rows @ h) * rows).sum()) for rows in error.double().split(ROWS))


def kept_share(base_sq: float, merged_sq: float) -> float | None:
    """``1 - sqrt(merged / base)``: the share of the adapter's effect kept (None when there was none)."""
    if base_sq <= 0.0 or not math.isfinite(base_sq):
        return None
    return 1.0 - math.sqrt(max(merged_sq, 0.0) / base_sq)


class FigureSums:
    """The four sums behind :func:`weight_figures`, added a block of rows at a time.

    ``precision="float64"``: each block in float64 (an in-memory merge). ``"float32"``: float32
    BLAS dot products (a float export, where the figures measure rounding to the target dtype and
    float64 passes over every weight took most of the export's time).
    """

    def __init__(self, precision: Precision = "float64") -> None:
        if precision not in ("float64", "float32"):
            raise ConfigError(f"precision must be 'float64' or 'float32', got {precision!r}")
        self.precision = precision
        self.sums = [0.0, 0.0, 0.0, 0.0]  # ||W'||^2, ||S - W'||^2, <S - W, W' - W>, ||W' - W||^2

    def add(self, before: torch.Tensor, target: torch.Tensor, stored: torch.Tensor) -> None:
        """Add one block ``[rows, in]`` of ``W`` (before), ``W'`` (target) and what is stored."""
        if self.precision == "float64":
            b, t, s = before.double(), target.double(), stored.double()
            intended = t - b
            block = torch.stack(
                [t.square().sum(), (s - t).square().sum(), ((s - b) * intended).sum(), intended.square().sum()]
            ).tolist()
        else:
            intended = (target.float() - before.float()).reshape(-1)
            error = (stored.float() - target.float()).reshape(-1)
            flat = target.float().reshape(-1)
            intended_sq = float(torch.dot(intended, intended))
            # stored - before = error + intended
            block = [
                float(torch.dot(flat, flat)),
                float(torch.dot(error, error)),
                float(torch.dot(error, intended)) + intended_sq,
                intended_sq,
            ]
        self.sums = [a + b for a, b in zip(self.sums, block, strict=True)]

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in self.sums)

    def finish(self) -> tuple[float, float | None]:
        """``(error, delta_retained)`` of :class:`~qadapt.merging.result.MergeResult` (NaN error when a sum
        is not finite: the caller's safe check says where)."""
        if not self.finite:
            return math.nan, None
        target_sq, error_sq, overlap, intended_sq = self.sums
        error = math.sqrt(error_sq / target_sq) if target_sq > 0 else 0.0
        return error, (overlap / intended_sq if intended_sq > 0 else None)


@dataclass(frozen=True)
class MergeSums:
    """The weight-space sums of one merge, each over the whole ``[out, in]`` weight (float64 totals).

    ``target_sq = ||W'||^2``, ``base_sq = ||W - W'||^2``; per candidate storage ``S`` (in the order
    given to :func:`merge_sums`): ``error_sq = ||S - W'||^2`` and ``overlap = <S - W', W' - W>``.
    """

    target_sq: float
    base_sq: float
    error_sq: tuple[float, ...]
    overlap: tuple[float, ...]

    def finite(self, index: int) -> bool:
        """Whether the sums of candidate ``index`` (and the shared ones) are finite."""
        return all(math.isfinite(x) for x in (self.target_sq, self.base_sq, self.error_sq[index], self.overlap[index]))

    def figures(self, index: int | None) -> tuple[float, float | None]:
        """``(error, delta_retained)`` of :class:`~qadapt.merging.result.MergeResult` for candidate ``index``
        (None: the unmerged ``W`` kept; NaN error when a sum is not finite: the caller's safe check says where)."""
        intended_sq = self.base_sq
        if index is None:
            error_sq, overlap = intended_sq, -intended_sq  # S = W: S - W' = -(W' - W)
        elif not self.finite(index):
            return math.nan, None
        else:
            error_sq, overlap = self.error_sq[index], self.overlap[index]
        if not (math.isfinite(self.target_sq) and math.isfinite(intended_sq)):
            return math.nan, None
        error = math.sqrt(error_sq / self.target_sq) if self.target_sq > 0 else 0.0
        # S - W = (S - W') + (W' - W)
        return error, ((overlap + intended_sq) / intended_sq if intended_sq > 0 else None)


def _block_sums(before: torch.Tensor, target: torch.Tensor, stored: list[torch.Tensor], dtype: torch.dtype) -> list:
    """One block's ``[||W'||^2, ||W - W'||^2, (||S - W'||^2, <S - W', W' - W>) per candidate]``: BLAS dot
    products in ``dtype`` over the block (a few thousand elements)."""

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.dot(a.reshape(-1), b.reshape(-1)))

    t = target.to(dtype).contiguous()
    intended = t - before.to(dtype)
    out = [dot(t, t), dot(intended, intended)]
    for s in stored:
        error = s.to(dtype) - t
        out += [dot(error, error), dot(error, intended)]
    return out


def merge_sums(before: torch.Tensor, target: torch.Tensor, stored: list[torch.Tensor]) -> MergeSums:
    """The :class:`MergeSums` of ``W = before``, ``W' = target`` and candidate storages ``stored``
    (each dequantized, ``[out, in]``), in one pass over blocks of rows.

    Products and sums run in float32 within a block of about :data:`_BLOCK_ELEMENTS` elements (BLAS
    dot products: on a loaded 2-core machine elementwise reductions were 10-100x slower), and the
    blocks add up in float64; a block whose float32 sums overflow (weights near 1e19 and up) is
    summed again in float64. The figures of a merge then cost a fraction of its requantize.
    """
    rows = max(1, _BLOCK_ELEMENTS // max(1, before.shape[-1])) if before.dim() == 2 else before.shape[0]
    totals = [0.0] * (2 + 2 * len(stored))
    for start in range(0, before.shape[0], rows):
        part = slice(start, start + rows)
        block = _block_sums(before[part], target[part], [s[part] for s in stored], torch.float32)
        if not all(math.isfinite(x) for x in block):
            block = _block_sums(before[part], target[part], [s[part] for s in stored], torch.float64)
        totals = [a + b for a, b in zip(totals, block, strict=True)]
    return MergeSums(totals[0], totals[1], tuple(totals[2::2]), tuple(totals[3::2]))


def weight_figures(
    before: torch.Tensor, target: torch.Tensor, stored: torch.Tensor, precision: Precision = "float64"
) -> tuple[float, float | None]:
    """``(error, delta_retained)`` of :class:`~qadapt.merging.result.MergeResult` from ``[out, in]`` weights,
    a block of rows at a time (see :class:`FigureSums` for ``precision``)."""
    sums = FigureSums(precision)
    for b, t, s in zip(before.split(ROWS), target.split(ROWS), stored.split(ROWS), strict=True):
        sums.add(b, t, s)
    return sums.finish()
