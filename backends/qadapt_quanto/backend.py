"""``quanto``: optimum-quanto ``QLinear`` layers with qint8, qint4 or qint2 weights.

Adopts layers a user quantized with ``optimum.quanto.quantize(model, weights=qint4)`` (frozen with
``freeze(model)`` or not) and quantizes float layers the same way. Everything qadapt does with such a
layer runs in plain torch (:mod:`qadapt_quanto.storage`): quanto's qint4/qint2 CPU kernel, which
builds a C++ extension on first use and hangs on a lock a killed build left
(:mod:`qadapt_quanto.extension`), is never run by qadapt.

optimum-quanto is imported on first use, not when the plugin loads: no layer can be a ``QLinear``
before it was imported, so ``owns`` answers False without importing it. Loading the plugin fails at
once, with the install hint, when optimum-quanto is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qadapt.errors import CapabilityError
from qadapt.protocols import Backend, BackendCapabilities, GroupLayout, PluginOptions, QuantizedWeight
from qadapt_quanto import storage as st
from qadapt_quanto.extension import warn_once_about_lock
from qadapt_quanto.hf_format import quanto_config, read_layer, write_layer

if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
    raise ModuleNotFoundError("No module named 'optimum.quanto'", name="optimum.quanto")


def _quanto() -> ModuleType:
    import optimum.quanto

    return optimum.quanto


class QuantoOptions(PluginOptions):
    """Options of the ``quanto`` backend (used when it quantizes a float layer)."""

    weights: Literal["qint8", "qint4", "qint2"] = Field(
        "qint4",
        description=(
            "Weight qtype: qint8 (per-row absmax scales) or qint4 / qint2 (per-group scale and shift; quanto picks "
            "the group size: 128, or 96/64/32 when that divides in_features, else whole rows)."
        ),
    )


def _qweight(module: nn.Module) -> Any:
    """The module's quantized weight as a standard quanto tensor (optimized subclasses converted back)."""
    q = _quanto()
    weight = module.weight
    if not isinstance(weight, q.QTensor):  # quantized on the fly (quantize() without freeze())
        with torch.no_grad():
            weight = _dynamic(module)
    if isinstance(weight, q.WeightQBitsTensor) and type(weight) is not q.WeightQBitsTensor:
        weight = weight.weight_qbits_tensor()  # quanto's CPU/GPU-optimized layouts (TinyGemm, AWQ, Marlin)
    return weight


def _dynamic(module: nn.Module) -> Any:
    """What an unfrozen QLinear's forward quantizes its float weight to (quanto's ``qweight``, kernel-agnostic)."""
    q = _quanto()
    weight, qtype, size = module.weight.detach(), module.weight_qtype, module.weight_group_size
    optimizer = module.optimizer  # the layer's own (quanto's default: absmax for 8 bits, min/max below)
    if isinstance(optimizer, q.SymmetricOptimizer):
        scale, shift = optimizer(weight, qtype=qtype, axis=0), None
    else:
        scale, shift = optimizer(weight, qtype=qtype, axis=0, group_size=size)
    return q.quantize_weight(weight, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=size, optimized=False)


def _quantize_codes(
    weight: torch.Tensor, meta: Mapping[str, Any], scale: torch.Tensor, shift: torch.Tensor | None
) -> torch.Tensor:
    """quanto's rounding of ``weight [out, in]`` under ``scale`` (and ``shift``): int8 ``[out, in]`` or packed uint8."""
    ops = torch.ops.quanto
    weight = weight.detach().to(scale.device, scale.dtype)
    if meta["qtype"] == "qint8":
        return ops.quantize_symmetric(weight, dtype=torch.int8, axis=0, scale=scale)
    bits = st.BITS[meta["qtype"]]
    codes = ops.quantize_affine(weight, bits=bits, axis=0, group_size=meta["group_size"], scale=scale, shift=shift)
    return st.pack(codes, bits)


class QuantoBackend(Backend):
    """optimum-quanto weights: qint8 per-row absmax; qint4 / qint2 per-group affine (scale and shift).

    Storage: see :mod:`qadapt_quanto.storage`. Merges keep the scales (and shifts) and choose codes
    (:meth:`requantize_keep_state`); the per-group scales and shifts are readable and writable
    (``group_scales``, and ``group_offsets`` for 2/4 bits). The forward multiplies by the dequantized
    weight (float32 arithmetic, in the input's dtype): it equals quanto's own forward without running
    its kernels. Layers that also quantize activations are not adopted.
    """

    Options = QuantoOptions
    capabilities = BackendCapabilities(keep_state=True, group_scales=True, group_offsets=True, checkpoint=True)

    def __init__(self, options: PluginOptions | Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        if self.options.weights == "qint8":  # symmetric: no zero points (a qint8 layer adopted by another instance
            # still answers get_group_offsets with a CapabilityError)
            self.capabilities = BackendCapabilities(keep_state=True, group_scales=True, checkpoint=True)

    def owns(self, module: nn.Module) -> bool:
        if "optimum.quanto" not in sys.modules or not isinstance(module, _quanto().QLinear):
            return False
        qtype = getattr(module, "weight_qtype", None)
        owned = qtype is not None and qtype.name in st.BITS and module.activation_qtype is None
        if owned:
            warn_once_about_lock()
        return owned

    def quantize(self, linear: nn.Linear) -> nn.Module:
        q = _quanto()
        holder = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        holder.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        if linear.bias is not None:
            holder.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        layer = q.QLinear.from_module(holder, weights=q.qtypes[self.options.weights])
        self.set_storage(layer, self._from_qtensor(_dynamic(layer)))
        return layer

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @staticmethod
    def _from_qtensor(weight: Any) -> QuantizedWeight:
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        qtype = weight.qtype.name
        if qtype == "qint8":
            return QuantizedWeight(
                {"data": weight._data, "scale": weight._scale}, {"qtype": qtype, "group_size": None, "shape": shape}
            )
        meta = {"qtype": qtype, "group_size": weight._group_size, "shape": shape}
        return QuantizedWeight({"data": weight._data._data, "scale": weight._scale, "shift": weight._shift}, meta)

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        return self._from_qtensor(_qweight(module))

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        module.weight = nn.Parameter(self._to_qtensor(storage), requires_grad=False)

    def _to_qtensor(self, storage: QuantizedWeight) -> Any:
        q = _quanto()
        t, m = storage.tensors, storage.meta
        shape = torch.Size(m["shape"])
        stride = (shape[1], 1)
        qtype = q.qtypes[m["qtype"]]
        if m["qtype"] == "qint8":
            return q.WeightQBytesTensor(qtype, 0, shape, stride, t["data"], t["scale"], None)
        grouped = st.rows(m["shape"], m["group_size"])
        packed = q.tensor.packed.PackedTensor(t["data"], qtype.bits, torch.Size(grouped), (grouped[1], 1))
        return q.WeightQBitsTensor(qtype, 0, m["group_size"], shape, stride, packed, t["scale"], t["shift"])

    def dtype_fixed_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The weight (a quanto tensor, which refuses casts; or the float weight an unfrozen layer quantizes)."""
        return {"weight": module.weight}

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        return st.dequantize(dict(storage.tensors), dict(storage.meta))

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """quanto's own fresh quantization (absmax for qint8, min/max for qint4/qint2), ``like``'s qtype and groups."""
        q = _quanto()
        m = like.meta
        scale_like = like.tensors["scale"]
        w = weight.detach().to(scale_like.device, scale_like.dtype)
        qtype = q.qtypes[m["qtype"]]
        if m["qtype"] == "qint8":
            scale = q.AbsmaxOptimizer()(w, qtype=qtype, axis=0)
            return QuantizedWeight({"data": _quantize_codes(w, m, scale, None), "scale": scale}, dict(m))
        scale, shift = q.MaxOptimizer()(w, qtype=qtype, axis=0, group_size=m["group_size"])
        data = _quantize_codes(w, m, scale, shift)
        return QuantizedWeight({"data": data, "scale": scale, "shift": shift}, dict(m))

    def requantize_keep_state(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """Codes rounded by quanto under ``like``'s scales and shifts, which stay as they are."""
        t = like.tensors
        data = _quantize_codes(weight, like.meta, t["scale"], t.get("shift"))
        return QuantizedWeight({**t, "data": data}, dict(like.meta))

    # ------------------------------------------------------------ per-group scales and shifts

    def group_layout(self, storage: QuantizedWeight) -> GroupLayout:
        count, size = st.rows(storage.meta["shape"], storage.meta["group_size"])
        return GroupLayout(group_size=size, num_groups=count)

    def get_group_scales(self, storage: QuantizedWeight) -> torch.Tensor:
        return storage.tensors["scale"].float().reshape(-1)

    def with_group_scales(self, storage: QuantizedWeight, scales: torch.Tensor) -> QuantizedWeight:
        """New scales; a float shift is rescaled with its group (``W = q * scale - shift``), a zero point kept."""
        t = storage.tensors
        old = t["scale"]
        if scales.numel() != old.numel():
            raise ValueError(f"quanto group scales must have {old.numel()} values, got shape {tuple(scales.shape)}")
        new = scales.detach().float().reshape(old.shape).to(old.device)
        tensors = {**t, "scale": new.to(old.dtype).contiguous()}
        shift = t.get("shift")
        if shift is not None and shift.dtype.is_floating_point:
            ratio = torch.where(old.float() != 0, new / torch.where(old != 0, old.float(), 1.0), 0.0)
            tensors["shift"] = (shift.float() * ratio).to(shift.dtype)
        return QuantizedWeight(tensors, dict(storage.meta))

    def get_group_offsets(self, storage: QuantizedWeight) -> torch.Tensor:
        """``-shift`` per group (``-shift * scale`` for an integer zero point), float32 ``[num_groups]``."""
        t = storage.tensors
        if "shift" not in t:
            raise CapabilityError(
                "quanto qint8 weights are symmetric: they have no per-group offsets (qint4, qint2 do)"
            )
        shift = t["shift"]
        offsets = -shift.float() if shift.dtype.is_floating_point else -shift.float() * t["scale"].float()
        return offsets.reshape(-1)

    def with_group_offsets(self, storage: QuantizedWeight, offsets: torch.Tensor) -> QuantizedWeight:
        t = storage.tensors
        if "shift" not in t:
            raise CapabilityError(
                "quanto qint8 weights are symmetric: they have no per-group offsets (qint4, qint2 do)"
            )
        shift = t["shift"]
        values = offsets.detach().float().reshape(shift.shape).to(shift.device)
        if shift.dtype.is_floating_point:
            new = (-values).to(shift.dtype)
        else:
            top = 2 ** st.BITS[storage.meta["qtype"]] - 1
            new = torch.round(-values / t["scale"].float()).clamp(0, top).to(shift.dtype)
        return QuantizedWeight({**t, "shift": new.contiguous()}, dict(storage.meta))

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize(self.get_storage(module)).to(x.dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    # ------------------------------------------------------------ checkpoint layout (quanto's state dict)

    def from_checkpoint(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
    ) -> QuantizedWeight | None:
        read = read_layer(tensors, config)
        return None if read is None else QuantizedWeight(*read)

    def to_checkpoint(self, storage: QuantizedWeight) -> dict[str, torch.Tensor]:
        return write_layer(dict(storage.tensors), dict(storage.meta))

    def checkpoint_config(
        self, storage: QuantizedWeight, base_config: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        return quanto_config(storage.meta["qtype"], base_config)

    def storage_options(self, storage: QuantizedWeight) -> dict[str, Any]:
        return {"weights": storage.meta["qtype"]}
