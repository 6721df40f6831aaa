"""RandLora's shared random bases: drawn once per model, sized for its largest adapted layer.

Shapes, with ``(L_out, L_in)`` the element-wise largest ``(out, in)`` over all targets,
``D = max(L_out, L_in)``, ``d = min(L_out, L_in)`` and ``N = ceil(d / r)``::

    basis_a  [r, 1, d]   scaled per layer by lambda and gamma (the small side)
    basis_b  [D, N, r]   used as drawn

The draw is PEFT 0.21.2's, bit for bit: one ``torch.Generator`` seeded with
``projection_prng_key``; dense bases are Kaiming-uniform (``a = sqrt(5)``) in ``projection_dtype``,
``basis_a`` first, then ``basis_b`` as ``N`` slices of ``[D, 1, r]``; sparse bases threshold
``torch.rand`` draws; each basis is then divided by its own standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from qadapt.errors import ConfigError
from qadapt_randlora.options import RandLoraOptions

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def num_bases(min_dim: int, r: int) -> int:
    """Bases needed for full rank: ``ceil(min_dim / r)``."""
    return -(-min_dim // r)


def largest_shape(shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Element-wise largest ``(in_features, out_features)`` over ``shapes``."""
    if not shapes:
        raise ConfigError("randlora needs at least one target layer shape to size its shared bases")
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


class RandLoraBases(nn.Module):
    """The shared bases of one model (non-persistent buffers; see :meth:`projection_tensors`).

    Adapters hold this module as their ``bases`` submodule; every adapter of a model holds the
    same instance. ``save_projection`` tells checkpoint code whether to save the tensors or to
    rebuild them with :func:`generate_bases` from the options and the target shapes.
    """

    def __init__(self, basis_a: torch.Tensor, basis_b: torch.Tensor, *, save_projection: bool = True) -> None:
        super().__init__()
        if basis_a.dim() != 3 or basis_a.shape[1] != 1 or basis_b.dim() != 3 or basis_b.shape[2] != basis_a.shape[0]:
            raise ConfigError(
                f"randlora bases must be basis_a [r, 1, d] and basis_b [D, N, r]; got {tuple(basis_a.shape)} "
                f"and {tuple(basis_b.shape)}"
            )
        self.register_buffer("basis_a", basis_a, persistent=False)
        self.register_buffer("basis_b", basis_b, persistent=False)
        self.save_projection = save_projection

    @property
    def r(self) -> int:
        return self.basis_a.shape[0]

    @property
    def min_dim(self) -> int:
        return self.basis_a.shape[2]

    @property
    def max_dim(self) -> int:
        return self.basis_b.shape[0]

    @property
    def num_bases(self) -> int:
        return self.basis_b.shape[1]

    def projection_tensors(self) -> dict[str, torch.Tensor]:
        """``{"randlora_A": basis_a, "randlora_B": basis_b}``: PEFT's ``base_model.randlora_{A,B}.<adapter>``."""
        return {"randlora_A": self.basis_a, "randlora_B": self.basis_b}

    def load_projection_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the bases by saved ones (keys as :meth:`projection_tensors`; shapes must match)."""
        for key, name in (("randlora_A", "basis_a"), ("randlora_B", "basis_b")):
            if key not in tensors:
                raise ConfigError(f"randlora projection tensors lack {key!r}; got {sorted(tensors)}")
            current = getattr(self, name)
            if tuple(tensors[key].shape) != tuple(current.shape):
                raise ConfigError(
                    f"randlora {key} has shape {tuple(tensors[key].shape)}, expected {tuple(current.shape)}"
                )
        self.basis_a = tensors["randlora_A"].to(self.basis_a.device)
        self.basis_b = tensors["randlora_B"].to(self.basis_b.device)

    def fits(self, in_features: int, out_features: int, r: int) -> bool:
        """True when a layer ``[out, in]`` with rank ``r`` can slice its bases from these."""
        small, large = min(in_features, out_features), max(in_features, out_features)
        return r == self.r and small <= self.min_dim and large <= self.max_dim

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, min_dim={self.min_dim}, max_dim={self.max_dim}, num_bases={self.num_bases}, "
            f"dtype={self.basis_a.dtype}, save_projection={self.save_projection}"
        )


def generate_bases(options: RandLoraOptions, shapes: Sequence[tuple[int, int]]) -> RandLoraBases:
    """Draw the bases for targets of ``(in_features, out_features)`` ``shapes`` (PEFT's draw, bit for bit)."""
    in_max, out_max = largest_shape(shapes)
    max_dim, min_dim = max(in_max, out_max), min(in_max, out_max)
    r = options.r
    n = num_bases(min_dim, r)
    generator = torch.Generator(device="cpu").manual_seed(options.projection_prng_key)
    if options.very_sparse or options.sparse:
        sparsity = math.sqrt(min_dim) if options.very_sparse else 3.0
        basis_a = _ternary(torch.rand((r, 1, min_dim), generator=generator), sparsity)
        basis_b = _ternary(torch.rand((max_dim, n, r), generator=generator), sparsity)
    else:
        dtype = _DTYPES[options.projection_dtype]
        basis_a = _kaiming_uniform((r, 1, min_dim), dtype, generator)
        basis_b = torch.cat([_kaiming_uniform((max_dim, 1, r), dtype, generator) for _ in range(n)], dim=1)
    return RandLoraBases(
        _normalised(basis_a, "A", r), _normalised(basis_b, "B", r), save_projection=options.save_projection
    )


def _normalised(basis: torch.Tensor, which: str, r: int) -> torch.Tensor:
    """``basis / basis.std()``, refusing a basis whose spread is not a positive number (PEFT gives NaN)."""
    spread = basis.std() if basis.numel() > 1 else torch.tensor(float("nan"))
    if not bool(torch.isfinite(spread)) or float(spread) == 0.0:
        raise ConfigError(
            f"randlora's random basis {which} of shape {list(basis.shape)} (r={r}) has no spread to normalise by: "
            "it needs at least two non-equal entries; use a larger r, or targets whose smaller side is above 1"
        )
    return basis / spread


def _kaiming_uniform(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    with torch.no_grad():
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    """-1 below ``1/(2s)``, +1 above ``1 - 1/(2s)``, 0 between (float32)."""
    tail = 1 / (2 * sparsity)
    out = torch.zeros(uniform.shape)
    out[uniform < tail] = -1
    out[uniform > 1 - tail] = 1
    return out
