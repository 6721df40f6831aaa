"""Refitting a requantized layer's group scales towards the adapted layer (``tune_scales``)."""

from __future__ import annotations

import torch

from qadapt.merging.figures import output_sq_error
from qadapt.protocols import Backend, QuantizedWeight


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
