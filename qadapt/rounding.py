"""Rounding a float weight onto a quantizer's grid: nearest, calibrated (GPTQ-style), scale refit.

Backend-neutral math for backends that store ``W_hat[i, j] = levels[codes[i, j]] * scale[group(i, j)]``:
a codebook of ``L`` levels, one scale per group of a :class:`~qadapt.protocols.GroupLayout` (runs of
``group_size`` elements of the row-major weight). A backend maps its format onto this (bitsandbytes
4-bit: the 16 NF4/FP4 levels and the per-block absmax; int8 row-wise: the integers -127..127 and
``SCB / 127``) and back; nothing here names a backend.

The calibrated objective is the output error on the calibration inputs: for ``E = W - W_hat [out, in]``
and ``H = sum x x^T [in, in]``, ``tr(E H E^T) = ||X E^T||^2``, a sum of independent per-row terms
``e_i H e_i^T``. :func:`calibrated_round` starts from the kept scales with nearest codes, refits the
scales by least squares in ``H``, chooses codes by error feedback (GPTQ: columns in turn, each rounding
error spread over the columns still to come through the inverse Cholesky factor of the damped ``H``),
and keeps each step only in the rows where it lowers the objective.

Shapes: ``weight [out, in]``, ``hessian [in, in]``, ``scales [num_groups]``, codes ``[out, in]`` integer
indices into ``levels`` (int32 from the lookups; int64 accepted wherever codes are read).
Everything runs in float32 on the weight's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qadapt.errors import ConfigError, InputError
from qadapt.protocols import GroupLayout

#: Columns per error-feedback block, outer and inner: updates inside a block are rank-1, between
#: blocks one matrix product (GPTQ's "lazy batch" updates, two levels deep).
_BLOCKS = (256, 32)


class Codebook:
    """Nearest-level lookup for a codebook ``levels [L]`` (any order; indices refer to that order).

    Consecutive integers (int8) round directly; other codebooks use a table of equal cells over the
    level range, each holding at most one midpoint, so a lookup is one table read and one compare.
    """

    def __init__(self, levels: torch.Tensor) -> None:
        levels = levels.detach().float().reshape(-1)
        if levels.numel() < 2 or not bool(torch.isfinite(levels).all()):
            raise ConfigError(f"a codebook needs at least 2 finite levels, got {levels.tolist()}")
        self.levels = levels
        order = torch.argsort(levels, stable=True)
        ordered = levels[order]
        self.order = order
        self.low, self.high = float(ordered[0]), float(ordered[-1])
        steps = ordered[1:] - ordered[:-1]
        self.integer = bool(torch.all(steps == 1)) and float(ordered[0]) == round(float(ordered[0]))
        midpoints = (ordered[:-1] + ordered[1:]) / 2
        positive = steps[steps > 0]
        gap = float(positive.min()) if positive.numel() else 1.0
        cells = 1 << max(6, math.ceil(math.log2(4 * (self.high - self.low) / gap)))
        cells = min(cells, 1 << 16)
        self.cells = cells
        self.width = (self.high - self.low) / cells
        starts = self.low + torch.arange(cells, dtype=torch.float32) * self.width
        self.base = torch.bucketize(starts, midpoints).to(torch.int64)
        ends = starts + self.width
        inside = torch.bucketize(ends, midpoints) > self.base
        self.bound = torch.where(inside, midpoints[self.base.clamp(max=midpoints.numel() - 1)], torch.inf)
        #: ``bound`` in cell units (for :meth:`nearest_cells`); ``identity``: sorted order is index order.
        self.bound_cells = (self.bound - self.low) / self.width
        self.identity = bool(torch.equal(order, torch.arange(order.numel())))
        self.base32, self.order32 = self.base.to(torch.int32), order.to(torch.int32)
        #: ``base + 1 - (bound - cell)`` per cell (``base`` where the cell holds no bound): see :meth:`nearest_cells`.
        within = (self.bound_cells - torch.arange(cells, dtype=torch.float32)).clamp(max=1.0)
        self.step = self.base.float() + 1.0 - within
        self.zero = int(self.nearest(torch.zeros(1)).item())

    def to(self, device: torch.device) -> Codebook:
        """Move the tables (in place) to ``device``; returns self."""
        for name in ("levels", "order", "base", "bound", "bound_cells", "base32", "order32", "step"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Indices into ``levels`` of the level nearest to each value of ``x`` (values clamp to the range)."""
        x = x.float().clamp(self.low, self.high)
        if self.integer:
            return self.order[(torch.round(x) - self.low).to(torch.int64)]
        cell = ((x - self.low) * (1.0 / self.width)).to(torch.int64).clamp_(0, self.cells - 1)
        rank = self.base[cell] + (x > self.bound[cell])
        return rank if self.identity else self.order[rank]

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """``levels[codes]`` float32 of ``codes``' shape (int32 or int64 codes)."""
        return self.levels.index_select(0, codes.reshape(-1).to(torch.int32)).reshape(codes.shape)

    def nearest_cells(self, u: torch.Tensor) -> torch.Tensor:
        """:meth:`nearest` for ``u = (x - low) / width`` (cell units), clamped in place: fewer passes.

        Returns int32 indices of ``u``'s shape. The error-feedback loop folds the scale and this
        affine map into one multiply-add. Table reads are ``index_select`` with int32 indices (on
        CPU several times faster than ``take`` or advanced indexing, which want int64).
        """
        shape = u.shape
        flat = u.reshape(-1)
        if self.integer:
            rank = torch.round(flat.clamp_(0, self.high - self.low)).to(torch.int32)
        else:
            # One table read: with f = u - cell in [0, 1) and the cell's bound b (1 when it has none),
            # rank = base + (f >= b) = floor(f + step[cell]) where step = base + 1 - b.
            flat.clamp_(0, self.cells - 1e-3)
            rank = self.step.index_select(0, flat.to(torch.int32)).add_(flat.frac_()).to(torch.int32)
        if not self.identity:
            rank = self.order32.index_select(0, rank)
        return rank.reshape(shape)


def exact_levels(values: torch.Tensor, count: int) -> torch.Tensor | None:
    """A sorted codebook ``[count]`` float32 holding every one of ``values [n]`` exactly, when at most
    ``count`` are distinct (unused levels repeat the last one); None otherwise."""
    distinct = torch.unique(values.detach().float().reshape(-1))
    if distinct.numel() > count:
        return None
    return torch.cat([distinct, distinct[-1:].expand(count - distinct.numel())]).contiguous()


def nearest_sorted(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Indices ``[n]`` int64 of the nearest of the sorted ``levels [L]`` to each of ``values [n]``."""
    upper = torch.bucketize(values, levels).clamp_(1, levels.numel() - 1)
    lower = upper - 1
    below = (values - levels[lower]).abs() <= (levels[upper] - values).abs()
    return torch.where(below, lower, upper)


def element_scales(layout: GroupLayout, scales: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-element scale ``[out, in]`` float32 from per-group ``scales [num_groups]``."""
    return layout.expand(scales.float(), shape).contiguous()


def absmax_scales(weight: torch.Tensor, layout: GroupLayout, codebook: Codebook) -> torch.Tensor:
    """Per-group scales ``[num_groups]`` mapping each group's largest magnitude onto the widest level."""
    flat = weight.detach().float().reshape(-1).abs()
    padded = torch.nn.functional.pad(flat, (0, layout.num_groups * layout.group_size - flat.numel()))
    widest = max(abs(codebook.low), abs(codebook.high))
    return padded.reshape(layout.num_groups, layout.group_size).amax(1) / widest


def nearest_codes(weight: torch.Tensor, scales: torch.Tensor, codebook: Codebook) -> torch.Tensor:
    """Codes ``[out, in]`` of the level nearest to ``weight / scales`` (per-element ``scales [out, in]``).

    Where a scale is 0 every level gives 0, and the code of the level nearest 0 is chosen.
    """
    inverse = torch.where(scales != 0, 1.0 / torch.where(scales != 0, scales, 1.0), 0.0)
    if codebook.integer:
        return codebook.nearest_cells(torch.mul(weight, inverse).sub_(codebook.low))
    inverse.mul_(1.0 / codebook.width)
    return codebook.nearest_cells(torch.mul(weight, inverse).sub_(codebook.low / codebook.width))


#: Elements per chunk of :func:`group_codes` (temporaries stay in cache, and below the allocator's
#: mmap threshold, where every fresh multi-MiB tensor costs page faults).
_CHUNK = 1 << 22


def group_codes(
    weight: torch.Tensor, scales: torch.Tensor, group_size: int, codebook: Codebook, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Codes ``[n]`` (``dtype``) of the level nearest to each element of the row-major flattened
    ``weight`` (``n`` elements) divided by its group's scale, ``scales [ceil(n / group_size)]``.

    :func:`nearest_codes` without the per-element scale tensor: each chunk of whole groups is
    scaled by one multiply per group and looked up in place. Where a scale is 0 every level gives
    0 and the code of the level nearest 0 is chosen (as in :func:`nearest_codes`).
    """
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    scales = scales.detach().float().reshape(-1).to(flat.device)
    if scales.numel() != -(-n // group_size):
        raise ConfigError(f"{scales.numel()} group scales do not cover {n} weights in groups of {group_size}")
    width = 1.0 if codebook.integer else codebook.width
    inverse = torch.where(scales != 0, 1.0 / torch.where(scales != 0, scales, 1.0), 0.0).mul_(1.0 / width)
    shift = codebook.low / width
    out = torch.empty(n, dtype=dtype, device=flat.device)
    step = max(1, _CHUNK // group_size) * group_size
    for start in range(0, n, step):
        stop = min(start + step, n)
        first, last = start // group_size, -(-stop // group_size)
        chunk = flat[start:stop]
        if (stop - start) % group_size == 0:
            u = chunk.view(-1, group_size) * inverse[first:last].unsqueeze(1)
        else:  # the last, partial group
            u = chunk * inverse[first:last].repeat_interleave(group_size)[: stop - start]
        out[start:stop] = codebook.nearest_cells(u.sub_(shift)).reshape(-1)
    return out


def _row_sq(error: torch.Tensor) -> torch.Tensor:
    """``||e_i||^2`` per row, float64 ``[out]`` (float32 products, each row's sum widened)."""
    return error.square().sum(-1).double()


def row_objective(error: torch.Tensor, hessian: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``e_i H e_i^T`` per row, float64 ``[out]``, for ``error [out, in]`` and ``hessian [in, in]``."""
    parts = [(rows @ hessian).mul_(rows).sum(-1).double() for rows in error.float().split(chunk)]
    return torch.cat(parts)


def damped(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``(H + lam I, lam)`` with ``lam = damp * mean(diag H)``; raises InputError when H carries nothing."""
    hessian = hessian.float()
    lam = damp * float(torch.diagonal(hessian).mean())
    if not math.isfinite(lam) or lam <= 0:
        raise InputError(f"the input statistics H have no positive diagonal (damping {lam}); nothing to calibrate")
    out = hessian.clone()
    out.diagonal().add_(lam)
    return out, lam


def inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """Upper ``U [in, in]`` with ``H^-1 = U^T U`` (GPTQ's factor); more damping if H is not positive definite.

    ``U = R^-1`` for the upper factor ``H = R R^T`` (a Cholesky of the reversed matrix): one
    factorization and one triangular inverse.
    """
    flip = torch.arange(hessian.shape[0] - 1, -1, -1, device=hessian.device)
    h = hessian
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h[flip][:, flip])
        if int(info) == 0:
            upper_r = lower[flip][:, flip]
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            return torch.linalg.solve_triangular(upper_r, eye, upper=True)
        extra = 10.0 ** (attempt - 4) * float(torch.diagonal(hessian).mean())
        h = hessian.clone()
        h.diagonal().add_(extra)
    raise InputError("the damped input statistics H are not positive definite")


def gptq_codes(
    weight: torch.Tensor, scales: torch.Tensor, codebook: Codebook, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]`` by error feedback against fixed per-element ``scales [out, in]``.

    ``upper``: :func:`inverse_cholesky` of the damped ``H`` (columns in the order to process them).
    Returns ``(codes, objective)`` where ``objective [out]`` (float64) is the damped ``e_i H e_i^T``
    of each row, exact for a quadratic (the sum of the scaled rounding errors, as in GPTQ).
    """
    n = weight.shape[1]
    work = weight.t().contiguous().float()  # columns as rows: contiguous updates
    scale_t = scales.t().contiguous().float()
    inv_t = torch.where(scale_t != 0, 1.0 / torch.where(scale_t != 0, scale_t, 1.0), 0.0)
    # x -> cell units: u = w * inv_t / width - low / width (integers: width 1).
    width = 1.0 if codebook.integer else codebook.width
    inv_t.mul_(1.0 / width)
    shift = -codebook.low / width
    codes = torch.empty(n, weight.shape[0], dtype=torch.int64, device=weight.device)
    errors = torch.empty_like(work)
    inv_diag = (1.0 / torch.diagonal(upper)).tolist()
    levels = codebook.levels

    def columns(lo: int, hi: int) -> None:
        block = work[lo:hi]
        factor = upper[lo:hi, lo:hi]
        for j in range(hi - lo):
            col = lo + j
            w = block[j]
            idx = codebook.nearest_cells(torch.mul(w, inv_t[col]).add_(shift))
            codes[col].copy_(idx)
            err = errors[col]
            torch.addcmul(w, levels.index_select(0, idx), scale_t[col], value=-1.0, out=err)
            err.mul_(inv_diag[col])
            if j + 1 < hi - lo:
                block[j + 1 :].addr_(factor[j, j + 1 :], err, alpha=-1.0)

    def blocks(lo: int, hi: int, sizes: tuple[int, ...]) -> None:
        if not sizes:
            columns(lo, hi)
            return
        for a in range(lo, hi, sizes[0]):
            b = min(a + sizes[0], hi)
            blocks(a, b, sizes[1:])
            if b < hi:
                work[b:hi].addmm_(upper[a:b, b:hi].t(), errors[a:b], alpha=-1.0)

    blocks(0, n, _BLOCKS)
    objective = errors.square().sum(0).double()
    return codes.t().contiguous(), objective


def ordered_gptq_codes(
    weight: torch.Tensor, scales: torch.Tensor, codebook: Codebook, hessian: torch.Tensor, act_order: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gptq_codes` against the damped ``hessian [in, in]`` (one Cholesky), columns in order of
    decreasing ``diag(H)`` with ``act_order`` (inputs with the most energy first, so their rounding
    errors are spread over the most columns) or in index order. Codes come back in index order."""
    if not act_order:
        return gptq_codes(weight, scales, codebook, inverse_cholesky(hessian))
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    upper = inverse_cholesky(hessian[perm][:, perm])
    permuted, rows = gptq_codes(weight[:, perm], scales[:, perm], codebook, upper)
    codes = torch.empty_like(permuted)
    codes[:, perm] = permuted
    return codes, rows


def refit_row_aligned(
    weight: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, group_size: int, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares group scales in the metric ``H`` for fixed code values, groups within rows.

    ``values [out, in]``: the levels the codes stand for; ``scales [out, G]`` the current scales
    (``G = in / group_size``). Per row, minimises ``(w - v diag(s)) H (w - v diag(s))^T`` over the
    row's ``G`` scales (a ``G x G`` system). Returns ``(new_scales [out, G], change [out])`` where
    ``change`` (float64) is the new objective minus the old one (<= 0 up to rounding). Groups
    whose codes are all zero keep their scale. ``hessian`` must be symmetric (an ``X^T X``, damped).

    Cost: one ``[out, in] @ [in, in]`` product for the gradient, and one ``[out, g] @ [g, in]``
    product per group (``out * in^2`` multiply-adds in all), each followed by a reduction over
    ``[out, in]``.
    """
    out, n = weight.shape
    groups = n // group_size
    hessian = hessian.float()
    values = values.float()
    s = scales.float()
    err = weight.float() - (values.reshape(out, groups, group_size) * s.unsqueeze(-1)).reshape(out, n)
    m = torch.empty(out, groups, groups, dtype=torch.float32, device=weight.device)
    v3 = values.reshape(out, groups, group_size)
    # v_g^T (H e)_g for every group at once: one product, where a product per group took twice as long.
    grad = (err @ hessian).reshape(out, groups, group_size).mul_(v3).sum(-1)
    for g in range(groups):
        cols = slice(g * group_size, (g + 1) * group_size)
        t = values[:, cols] @ hessian[cols]  # [out, in]: the group's codes times its rows of H
        m[:, g] = t.reshape(out, groups, group_size).mul_(v3).sum(-1)
    diag = torch.diagonal(m, dim1=1, dim2=2)
    dead = diag <= 0
    ridge = 1e-7 * diag.abs().mean(-1, keepdim=True).clamp(min=1e-30)
    m = m + torch.diag_embed(torch.where(dead, 1.0, ridge))
    grad = torch.where(dead, 0.0, grad)
    step = torch.linalg.solve(m.double(), grad.double().unsqueeze(-1)).squeeze(-1)
    # f(s + d) - f(s) = -2 g^T d + d^T M d with d = M^-1 g: = -g^T d.
    change = -(grad.double() * step).sum(-1)
    return (s.double() + step).float(), change


@dataclass
class CalibratedResult:
    """What :func:`calibrated_round` chose: ``codes [out, in]``, ``scales [num_groups]`` (raw, before
    ``project``), whether anything beat the kept state, whether the scales may differ from the kept
    ones (False: keep the format's scale state as it is), and objectives (float, undamped ``H``)."""

    codes: torch.Tensor
    scales: torch.Tensor
    improved: bool
    scales_changed: bool
    objective: float
    keep_objective: float


def calibrated_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codebook: Codebook,
    layout: GroupLayout,
    scales: torch.Tensor,
    *,
    damp: float = 0.01,
    refit: bool = True,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    act_order: bool = True,
) -> CalibratedResult:
    """Codes and group scales for ``weight [out, in]`` that lower ``tr(E H E^T)`` below the kept state's.

    ``scales [num_groups]``: the kept (effective) scales. ``refit``: refit scales by least squares
    (only when groups lie within rows, ``in % group_size == 0``; otherwise codes alone are chosen
    against the kept scales). ``project``: maps raw scales to the scales the format will really hold
    (a nested, quantized scale state); the final codes are then chosen against the projected ones.
    ``act_order``: error feedback in order of decreasing ``diag(H)`` (GPTQ's act-order; the scales are
    fixed before the codes are chosen, so any column order fits every format).

    Steps: nearest codes on the kept scales (the baseline), or on the target's absmax scales where that
    is better (a fresh start: rows whose range grew); per-row least-squares scale refit; codes
    by error feedback against the refit scales; each step kept in the rows where it lowers the
    objective (with ``project``: the whole result is kept only if its total objective is lower).
    Returns the baseline (``improved=False``) when nothing helps.
    """
    weight = weight.float()
    out, n = weight.shape
    shape = (out, n)
    codebook.to(weight.device)
    hessian = hessian.to(weight.device).float()
    hd, lam = damped(hessian, damp)
    levels = codebook.levels
    scales = scales.float().to(weight.device)

    # Baseline: kept scales, nearest codes. Objectives are tracked damped (exact for GPTQ) and
    # compared undamped: f = f_damped - lam * ||e||^2.
    per_element = element_scales(layout, scales, shape)
    keep_codes = nearest_codes(weight, per_element, codebook)
    error = weight - levels[keep_codes] * per_element
    keep_rows = row_objective(error, hessian)
    best_rows = keep_rows.clone()
    codes, best_scales = keep_codes, scales.clone()

    aligned = refit and n % layout.group_size == 0
    groups = n // layout.group_size if aligned else 0
    if aligned:
        # A second start: the target's own absmax scales (what a fresh quantizer picks), per row.
        fresh = absmax_scales(weight, layout, codebook)
        fresh_element = element_scales(layout, fresh, shape)
        fresh_codes = nearest_codes(weight, fresh_element, codebook)
        fresh_error = weight - levels[fresh_codes] * fresh_element
        fresh_rows = row_objective(fresh_error, hessian)
        accept = fresh_rows < best_rows
        best_rows = torch.where(accept, fresh_rows, best_rows)
        codes = torch.where(accept.unsqueeze(1), fresh_codes, codes)
        error = torch.where(accept.unsqueeze(1), fresh_error, error)
        best_scales.reshape(out, groups)[accept] = fresh.reshape(out, groups)[accept]
        current = best_scales.reshape(out, groups)
        new, change = refit_row_aligned(weight, levels[codes], current, layout.group_size, hd)
        new_error = weight - levels[codes] * element_scales(layout, new.reshape(-1), shape)
        # The refit's change is in the damped metric; the undamped one drops lam * (change of ||e||^2).
        row_change = change - lam * (_row_sq(new_error) - _row_sq(error))
        accept = row_change < 0
        best_rows = torch.where(accept, best_rows + row_change, best_rows)
        best_scales.reshape(out, groups)[accept] = new[accept]
    projected = best_scales if project is None or not aligned else project(best_scales)
    final_scales = element_scales(layout, projected, shape)
    gptq, gptq_rows = ordered_gptq_codes(weight, final_scales, codebook, hd, act_order)
    gptq_rows = gptq_rows - lam * _row_sq(weight - levels[gptq] * final_scales)
    if project is None or not aligned:
        accept = gptq_rows < best_rows
        best_codes = torch.where(accept.unsqueeze(1), gptq, codes)
        best_rows = torch.where(accept, gptq_rows, best_rows)
    else:
        best_codes, best_rows = gptq, gptq_rows
    total, keep_total = float(best_rows.sum()), float(keep_rows.sum())
    if total >= keep_total:
        return CalibratedResult(keep_codes, scales, False, False, keep_total, keep_total)
    return CalibratedResult(best_codes, best_scales, True, aligned, total, keep_total)
