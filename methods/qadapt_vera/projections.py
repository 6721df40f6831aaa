"""VeRA's shared random projections: drawn once per model, sized for its largest adapted layer.

With ``(L_out, L_in)`` the element-wise largest ``(out, in)`` over all targets::

    vera_A  [r, L_in]    vera_B  [L_out, r]

The draw is PEFT 0.21.2's: one CPU ``torch.Generator`` seeded with ``projection_prng_key``; each
matrix uniform in ``±sqrt(6 / fan_in)`` (Kaiming-uniform, gain ``sqrt(2)``, ``fan_in`` its second
dimension), ``vera_A`` first, float32. A layer ``[out, in]`` uses ``vera_A[:, :in]`` and
``vera_B[:out]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from qadapt.errors import ConfigError
from qadapt_vera.options import VeraOptions


class VeraProjections(nn.Module):
    """The shared projections of one model (non-persistent buffers; see :meth:`projection_tensors`).

    Every adapter of a model holds this one instance as its ``projections`` submodule.
    ``save_projection`` tells checkpoint code whether to save the tensors or to draw them again.
    """

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor, *, save_projection: bool = True) -> None:
        super().__init__()
        if vera_a.dim() != 2 or vera_b.dim() != 2 or vera_a.shape[0] != vera_b.shape[1]:
            raise ConfigError(
                f"vera projections must be vera_A [r, in] and vera_B [out, r]; got {tuple(vera_a.shape)} and "
                f"{tuple(vera_b.shape)}"
            )
        self.register_buffer("vera_A", vera_a, persistent=False)
        self.register_buffer("vera_B", vera_b, persistent=False)
        self.save_projection = save_projection

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    def fits(self, in_features: int, out_features: int, r: int) -> bool:
        """True when a layer ``[out, in]`` of rank ``r`` can slice its projections from these."""
        return r == self.r and in_features <= self.vera_A.shape[1] and out_features <= self.vera_B.shape[0]

    def projection_tensors(self) -> dict[str, torch.Tensor]:
        """``{"vera_A": [r, L_in], "vera_B": [L_out, r]}``: PEFT's ``base_model.vera_{A,B}`` keys."""
        return {"vera_A": self.vera_A, "vera_B": self.vera_B}

    def load_projection_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the projections by saved ones (keys as :meth:`projection_tensors`; shapes must match)."""
        for key in ("vera_A", "vera_B"):
            if key not in tensors:
                raise ConfigError(f"vera projection tensors lack {key!r}; got {sorted(tensors)}")
            current = getattr(self, key)
            if tuple(tensors[key].shape) != tuple(current.shape):
                raise ConfigError(f"vera {key} has shape {tuple(tensors[key].shape)}, expected {tuple(current.shape)}")
        self.vera_A = tensors["vera_A"].to(self.vera_A.device)
        self.vera_B = tensors["vera_B"].to(self.vera_B.device)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, vera_A={list(self.vera_A.shape)}, vera_B={list(self.vera_B.shape)}, "
            f"save_projection={self.save_projection}"
        )


def generate_projections(options: VeraOptions, shapes: Sequence[tuple[int, int]]) -> VeraProjections:
    """Draw the projections for targets of ``(in_features, out_features)`` ``shapes`` (PEFT's draw, bit for bit)."""
    if not shapes:
        raise ConfigError("vera needs at least one target layer shape to size its shared projections")
    in_max, out_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    generator = torch.Generator(device="cpu").manual_seed(options.projection_prng_key)
    vera_a = _kaiming_uniform((options.r, in_max), generator)
    vera_b = _kaiming_uniform((out_max, options.r), generator)
    return VeraProjections(vera_a, vera_b, save_projection=options.save_projection)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``U(-sqrt(6 / shape[1]), sqrt(6 / shape[1]))`` drawn from ``generator``, float32."""
    std = math.sqrt(2.0) / math.sqrt(shape[1])  # gain sqrt(2) over sqrt(fan_in), rounded in this order as PEFT
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)
