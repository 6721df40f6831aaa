"""The scaled small basis ``lambda[k, n] · A[k, j] · gamma[n, j]`` with a memory-light backward."""

from __future__ import annotations

from typing import Any

import torch


class ScaledBasis(torch.autograd.Function):
    """``out [r, N, d] = lam[:, :, None] * basis[r, 1, d] * gamma[None, :, :]``.

    Autograd would keep the ``[r, N, d]`` intermediate ``lam * basis`` for the backward; this
    keeps only the inputs (``r·d + r·N + N·d`` values) and contracts the gradient directly.
    ``basis`` is a fixed buffer and gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, basis: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(basis, lam, gamma)
        return lam[:, :, None] * basis * gamma[None, :, :]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None]:
        basis, lam, gamma = ctx.saved_tensors
        basis = basis[:, 0, :].to(grad.dtype)  # [r, d]
        grad_lam = grad_gamma = None
        if ctx.needs_input_grad[1]:
            # d out[k, n, j] / d lam[k, n] = basis[k, j] * gamma[n, j]
            grad_lam = torch.einsum("knj,kj,nj->kn", grad, basis, gamma.to(grad.dtype)).to(lam.dtype)
        if ctx.needs_input_grad[2]:
            # d out[k, n, j] / d gamma[n, j] = lam[k, n] * basis[k, j]
            grad_gamma = torch.einsum("knj,kj,kn->nj", grad, basis, lam.to(grad.dtype)).to(gamma.dtype)
        return None, grad_lam, grad_gamma


def scaled_basis(basis: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``[r, 1, d]``, ``[r, N]``, ``[N, d]`` → ``[r, N, d]`` (see :class:`ScaledBasis`)."""
    return ScaledBasis.apply(basis, lam, gamma)
