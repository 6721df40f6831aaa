"""OFT's block rotations as plain tensor functions.

Shapes: ``n`` stored blocks (``n_blocks``, or 1 with block sharing), block side ``b``,
``e = b (b - 1) / 2`` free entries per block.

* ``vec [n, e]`` → :func:`skew_symmetric` → ``Q [n, b, b]`` with ``Q = -Qᵀ``;
* ``Q`` → :func:`cayley_neumann` or :func:`cayley_exact` → ``R [n, b, b]``;
* the input is rotated per block, ``x_j ↦ x_j R_j`` (:func:`rotate_input`), so the merged
  weight is ``W'_j = W_j R_jᵀ`` for each column block ``j`` of ``W [out, in]`` (:func:`rotate_weight`).
"""

from __future__ import annotations

import torch

#: Rows processed at once by the blockwise merge, so temporaries stay a slice of the weight.
_MERGE_ROW_CHUNK_ELEMENTS = 1 << 22


def skew_symmetric(vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_size: int) -> torch.Tensor:
    """``Q [n, b, b]`` from ``vec [n, e]``: ``vec`` fills the strict upper triangle, ``Q = U - Uᵀ``.

    ``rows``, ``cols``: the strict upper triangle's indices (``torch.triu_indices(b, b, 1)``).
    """
    upper = vec.new_zeros(vec.shape[0], block_size, block_size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def coft_project(
    vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_size: int, eps: float
) -> torch.Tensor:
    """Constrained OFT: rescale each block's ``Q`` onto the Frobenius ball of radius ``eps / sqrt(n)``.

    ``vec [n, e]`` → ``[n, e]``; blocks already inside the ball are returned unchanged.
    """
    q = skew_symmetric(vec, rows, cols, block_size)
    radius = eps / torch.sqrt(torch.tensor(float(vec.shape[0]), device=vec.device))
    norm = torch.linalg.vector_norm(q, dim=(-2, -1), keepdim=True)
    projected = torch.where(norm <= radius, q, radius * (q / norm))
    return projected[:, rows, cols]


def cayley_neumann(q: torch.Tensor, num_terms: int) -> torch.Tensor:
    """``R ≈ (I + Q)(I - Q)⁻¹`` by a truncated Neumann series, ``[n, b, b]`` → ``[n, b, b]``.

    PEFT 0.21.2's series, reproduced term for term: ``I + 2Q + 2Q² + … + 2Q^(m-1) + Q^m`` with
    ``m = max(num_terms - 1, 3)`` for ``num_terms >= 3`` (so 3 and 4 terms give the same
    matrix), ``I + 2Q`` for 2 terms and ``I`` for 1. The halved last term keeps ``R`` closer to
    orthogonal than a plain truncation.
    """
    n, b, _ = q.shape
    rot = torch.eye(b, dtype=q.dtype, device=q.device).expand(n, b, b)
    if num_terms < 2:
        return rot.clone()
    rot = torch.add(rot, q, alpha=2.0)
    if num_terms < 3:
        return rot
    power = torch.bmm(q, q)
    rot = torch.add(rot, power, alpha=2.0)
    for _ in range(3, max(num_terms - 1, 3)):
        power = torch.bmm(power, q)
        rot = torch.add(rot, power, alpha=2.0)
    return rot + torch.bmm(power, q)


def cayley_exact(q: torch.Tensor) -> torch.Tensor:
    """``R = (I - Q)(I + Q)⁻¹`` by a linear solve, ``[n, b, b]`` → ``[n, b, b]`` (exactly orthogonal).

    This is PEFT's exact branch; note it is the transpose of what the Neumann series approximates.
    """
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def drop_blocks(rot: torch.Tensor, n_blocks: int, p: float) -> torch.Tensor:
    """Multiplicative block dropout: ``int(p * n_blocks)`` random blocks become the identity.

    ``rot [n, b, b]`` (``n`` is 1 or ``n_blocks``) → ``[n_blocks, b, b]``.
    """
    n_drop = int(p * n_blocks)
    b = rot.shape[-1]
    rot = rot.expand(n_blocks, b, b)
    if n_drop == 0:
        return rot
    dropped = torch.zeros(n_blocks, dtype=torch.bool, device=rot.device)
    dropped[torch.randperm(n_blocks, device=rot.device)[:n_drop]] = True
    eye = torch.eye(b, dtype=rot.dtype, device=rot.device)
    return torch.where(dropped[:, None, None], eye, rot)


def rotate_input(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``x [..., n_blocks * b]`` → ``[..., n_blocks * b]`` with block ``j`` mapped to ``x_j @ R_j``.

    ``rot`` is ``[n_blocks, b, b]`` or ``[1, b, b]`` (shared by every block).
    """
    b = rot.shape[-1]
    n_blocks = x.shape[-1] // b
    blocks = x.reshape(*x.shape[:-1], n_blocks, b)
    rotated = torch.einsum("...nk,nkc->...nc", blocks, rot.expand(n_blocks, b, b))
    return rotated.reshape(x.shape)


def rotate_weight(weight: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Merged weight ``W' = W · blockdiag(R)ᵀ``, computed block by block.

    ``weight [out, n_blocks * b]``, ``rot [n_blocks or 1, b, b]`` → ``[out, n_blocks * b]``.
    The dense ``in x in`` block-diagonal matrix is never built (``out·in·b`` work, not ``out·in²``).
    """
    b = rot.shape[-1]
    n_blocks = weight.shape[1] // b
    rot_t = rot.expand(n_blocks, b, b).transpose(-2, -1)
    out = torch.empty_like(weight)
    for start, stop in _row_chunks(weight):
        blocks = weight[start:stop].reshape(stop - start, n_blocks, b)
        out[start:stop] = torch.einsum("onk,nkc->onc", blocks, rot_t).reshape(stop - start, -1)
    return out


def unrotate_weight(weight: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate_weight`: solves ``W_j R_jᵀ = W'_j`` per block (``R`` need not be orthogonal).

    ``weight [out, n_blocks * b]``, ``rot [n_blocks or 1, b, b]`` → ``[out, n_blocks * b]``.
    """
    b = rot.shape[-1]
    n_blocks = weight.shape[1] // b
    lu, pivots = torch.linalg.lu_factor(rot.transpose(-2, -1))
    lu, pivots = lu.expand(n_blocks, b, b), pivots.expand(n_blocks, b)
    out = torch.empty_like(weight)
    for start, stop in _row_chunks(weight):
        blocks = weight[start:stop].reshape(stop - start, n_blocks, b).transpose(0, 1)
        solved = torch.linalg.lu_solve(lu, pivots, blocks, left=False)
        out[start:stop] = solved.transpose(0, 1).reshape(stop - start, -1)
    return out


def _row_chunks(weight: torch.Tensor) -> list[tuple[int, int]]:
    rows = weight.shape[0]
    step = max(1, _MERGE_ROW_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]
