"""The ``qalora`` method: QA-LoRA, LoRA on the input pooled per quantization group.

With ``g = group_size`` and ``n = in / g`` pooled features, PEFT 0.21.2's QA-LoRA (its
``QALoraLinearVariant``) computes::

    p = n · mean_g(x)                  [..., n]     (each run of g input features averaged)
    y = base(x) + s · B(A(p))          A [r, n], B [out, r], s = alpha / r (or / sqrt(r))

so ``ΔW [out, in]`` is ``s · (n / g) · (B A)`` repeated over each run of ``g`` inputs: constant
inside every group. On a backend with per-group zero points (``capabilities.group_offsets``)
whose groups lie inside the pooling runs, the merge adds that constant to each group's offset
and leaves every code and scale alone (:meth:`QALoraMethod.merge_storage`): exact up to the
format's rounding of zero points.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from qadapt.errors import CapabilityError, ConfigError, warn
from qadapt.protocols import Backend, QuantizedWeight, RowMerger
from qadapt_lora.method import LoraAdapter, LoraMethod, _as
from qadapt_lora.options import LoraOptions

#: No layer is wider than this many input features.
MAX_GROUP_SIZE = 2**16


class QALoraOptions(LoraOptions):
    """Options of the ``qalora`` method (LoRA on group-pooled inputs; merges exactly into zero points)."""

    group_size: int = Field(
        16,
        ge=1,
        le=MAX_GROUP_SIZE,
        description=(
            f"Input features averaged into one pooled feature, 1 to {MAX_GROUP_SIZE}; must divide each layer's "
            "in_features (PEFT: qalora_group_size, default 16). For an exact merge, a multiple of the backend's "
            "quantization group size."
        ),
    )


class QALoraAdapter(LoraAdapter):
    """LoRA factors on pooled inputs: ``lora_A [r, in / g]`` and ``lora_B [out, r]`` (PEFT's keys and shapes)."""

    def __init__(
        self, in_features: int, out_features: int, r: int, scaling: float, dropout: float, group_size: int
    ) -> None:
        super().__init__(in_features // group_size, out_features, r, scaling, dropout)
        self.in_features, self.group_size = in_features, group_size
        self.pooled = in_features // group_size

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``n · mean_g(x)``: ``[..., in] → [..., n]`` (PEFT's pooling, its factor ``n`` included)."""
        return x.reshape(*x.shape[:-1], self.pooled, self.group_size).mean(dim=-1) * self.pooled

    def pooled_delta(self) -> torch.Tensor:
        """``ΔW`` per (row, pooling run): ``s · (n / g) · B A``, float32 ``[out, n]``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * (
            self.scaling * self.pooled / self.group_size
        )

    def delta_weight(self) -> torch.Tensor:
        """``ΔW [out, in]``: :meth:`pooled_delta` repeated over each run of ``g`` inputs, float32."""
        return self.pooled_delta().repeat_interleave(self.group_size, dim=1)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B(A(pool(x)))`` for ``x [..., in]`` in the adapter's dtype (no dropout)."""
        return self.lora_B(self.lora_A(self.pool(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, group_size={self.group_size}, pooled={self.pooled}"


class QALoraMethod(LoraMethod):
    """QA-LoRA: ``y = base(x) + s · B(A(n · mean_g(dropout(x))))``; merged ``W + ΔW``, exactly into zero points
    where the backend has them."""

    Options = QALoraOptions
    options: QALoraOptions
    adapter_class = QALoraAdapter

    def check_layer(self, in_features: int, out_features: int) -> None:
        g = self.options.group_size
        if in_features % g:
            divisors = [d for d in range(1, min(in_features, 2 * g) + 1) if in_features % d == 0]
            lower = max(d for d in divisors if d <= g)
            higher = min((d for d in divisors if d >= g), default=None)
            valid = str(lower) if higher is None else f"{lower} or {higher}"
            raise ConfigError(
                f"method.options.group_size={g} does not divide the layer's in_features={in_features} (QA-LoRA pools "
                f"the input in equal runs); closest valid group_size: {valid}"
            )

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> QALoraAdapter:
        self.check_layer(in_features, out_features)
        lora = super().create_adapter(in_features, out_features, shared)
        assert isinstance(lora, QALoraAdapter)
        return lora

    def _new_adapter(self, in_features: int, out_features: int, scaling: float) -> QALoraAdapter:
        return QALoraAdapter(in_features, out_features, self.r, scaling, self.options.dropout, self.options.group_size)

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + _as(adapter, QALoraAdapter, self).delta_weight().detach().to(weight.device)

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() - _as(adapter, QALoraAdapter, self).delta_weight().detach().to(weight.device)

    def row_merger(self, adapter: nn.Module) -> RowMerger:
        qalora = _as(adapter, QALoraAdapter, self)
        pooled = qalora.pooled_delta().detach()
        g = qalora.group_size
        return lambda weight_rows, rows: weight_rows + pooled[rows].repeat_interleave(g, dim=1).to(weight_rows.device)

    def merge_storage(self, adapter: nn.Module, backend: Backend, storage: QuantizedWeight) -> QuantizedWeight | None:
        """Add each group's constant ``ΔW`` to its zero point (``with_group_offsets``): codes and scales stay.

        Needs ``capabilities.group_offsets`` and quantization groups inside the pooling runs (the
        backend's group size divides ``group_size`` and ``in_features``); otherwise the float path
        (dequantize, add, requantize), with a warning for a quantized format, since that is not exact.
        """
        qalora = _as(adapter, QALoraAdapter, self)
        name = backend.name or type(backend).__name__
        quantized = any(not t.dtype.is_floating_point for t in storage.tensors.values())
        if not backend.capabilities.group_offsets:
            if quantized:
                warn(
                    "qalora merges exactly only into per-group zero points (capabilities.group_offsets), which "
                    f"backend {name!r} does not declare (its format has none): this merge requantizes and is not exact"
                )
            return None
        try:
            layout = backend.group_layout(storage)
        except CapabilityError as exc:
            warn(f"qalora cannot merge into backend {name!r}'s zero points ({exc}); this merge requantizes")
            return None
        in_f, g, size = qalora.in_features, qalora.group_size, layout.group_size
        if in_f % size or g % size:
            warn(
                f"qalora's group_size={g} is not a multiple of backend {name!r}'s quantization group size {size} (or "
                f"that does not divide in_features={in_f}), so ΔW is not constant inside each quantization group: this "
                "merge requantizes; set group_size to a multiple of the backend's"
            )
            return None
        pooled = qalora.pooled_delta().detach()  # [out, in / g]
        run_of_group = torch.arange(in_f // size, device=pooled.device) * size // g  # each group's pooling run
        shift = pooled[:, run_of_group].reshape(-1)  # [out · in / size] = [num_groups], row-major like the groups
        offsets = backend.get_group_offsets(storage)
        return backend.with_group_offsets(storage, offsets + shift.to(offsets))
