"""optimum-quanto's state-dict layout of a ``QLinear`` weight, checked, and transformers' ``QuantoConfig``.

quanto saves a frozen layer's weight as its inner tensors: qint8 ``weight._data`` (int8 ``[out, in]``)
and ``weight._scale`` (``[out, 1]``); qint4 / qint2 ``weight._data._data`` (packed uint8),
``weight._scale`` and ``weight._shift`` (``[R, 1]``, see :mod:`qadapt_quanto.storage`), beside the
layer's ``input_scale`` and ``output_scale`` scalars. The packed codes do not say the weight's shape
(quanto's loader takes it from the module), so qadapt also writes ``weight._shape`` (int64
``[out, in]``) for 2/4 bits; quanto's own ``load_state_dict`` ignores that key. The group size is
quanto's rule for ``in_features`` (:func:`~qadapt_quanto.storage.group_size_for`), as its loader uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qadapt.errors import CheckpointError, shorten
from qadapt_quanto import storage as st

#: Largest dimension a checkpoint may declare (refused before anything is read).
MAX_DIM = 2**20
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SCALARS = ("input_scale", "output_scale")


def quanto_config(qtype: str, base_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """transformers' ``QuantoConfig(weights=...).to_dict()`` for ``qtype`` (``qint4`` -> ``int4``)."""
    kept = None
    if base_config is not None and base_config.get("quant_method") == "quanto":
        kept = base_config.get("modules_to_not_convert")
    return {
        "quant_method": "quanto",
        "weights": qtype.removeprefix("q"),
        "activations": None,
        "modules_to_not_convert": kept,
    }


def write_layer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The layer's checkpoint tensors (keys relative to the layer) for a storage's ``tensors`` and ``meta``."""
    scale = tensors["scale"]
    ones = {name: torch.ones((), dtype=scale.dtype) for name in _SCALARS}
    if meta["qtype"] == "qint8":
        return {"weight._data": tensors["data"], "weight._scale": scale, **ones}
    return {
        "weight._data._data": tensors["data"],
        "weight._scale": scale,
        "weight._shift": tensors["shift"],
        "weight._shape": torch.tensor(meta["shape"], dtype=torch.int64),
        **ones,
    }


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(f"optimum-quanto layer: {what}")


def _check(tensors: Mapping[str, torch.Tensor], key: str, dtypes: tuple[torch.dtype, ...], shape: tuple) -> None:
    tensor = tensors[key]
    if tensor.dtype not in dtypes or tuple(tensor.shape) != shape:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise _refuse(f"{key} must be {names} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise _refuse(f"{key} holds NaN or infinite values")


def _qtype(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None) -> str:
    if config is not None and config.get("quant_method") == "quanto":
        weights = config.get("weights")
        if f"q{weights}" not in st.BITS:
            raise _refuse(f"quantization_config.weights must be one of int8, int4, int2, got {shorten(weights)}")
        return f"q{weights}"
    if "weight._data" in tensors:
        return "qint8"
    raise _refuse("2/4-bit codes need quantization_config.weights (quant_method 'quanto') to say their bit width")


def _shape(tensor: torch.Tensor) -> tuple[int, int]:
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.numel() != 2:
        raise _refuse(f"weight._shape must be 2 integers [out_features, in_features], got {shorten(tensor.tolist())}")
    out_f, in_f = (int(v) for v in tensor.reshape(-1).tolist())
    if not (0 < out_f <= MAX_DIM and 0 < in_f <= MAX_DIM):
        raise _refuse(f"weight._shape must be positive and at most {MAX_DIM}, got {[out_f, in_f]}")
    return out_f, in_f


def read_layer(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(storage tensors, meta)`` of a layer in quanto's layout, every tensor checked against the declared
    shape before anything is read; None when the layer is not in this layout.

    Raises:
        CheckpointError: naming the tensor or field, its value and what is valid.
    """
    if "weight._data" not in tensors and "weight._data._data" not in tensors:
        return None
    qtype = _qtype(tensors, config)
    keys = (
        {"weight._data", "weight._scale"}
        if qtype == "qint8"
        else {"weight._data._data", "weight._scale", "weight._shift", "weight._shape"}
    )
    if not keys <= set(tensors) or set(tensors) - keys - set(_SCALARS):
        raise _refuse(f"tensors are {sorted(tensors)}; a {qtype} layer has {sorted(keys)} (and {', '.join(_SCALARS)})")
    for name in _SCALARS:
        if name in tensors:
            _check(tensors, name, _FLOATS, ())
    if qtype == "qint8":
        data = tensors["weight._data"]
        if data.dtype != torch.int8 or data.dim() != 2 or not all(0 < d <= MAX_DIM for d in data.shape):
            raise _refuse(f"weight._data must be int8 [out_features, in_features], got {data.dtype} {list(data.shape)}")
        _check(tensors, "weight._scale", _FLOATS, (data.shape[0], 1))
        meta = {"qtype": qtype, "group_size": None, "shape": (int(data.shape[0]), int(data.shape[1]))}
        return {"data": data, "scale": tensors["weight._scale"]}, meta
    shape = _shape(tensors["weight._shape"])
    size = st.group_size_for(shape[1])
    count, width = st.rows(shape, size)
    bits = st.BITS[qtype]
    _check(tensors, "weight._data._data", (torch.uint8,), (st.packed_rows(count, bits), width))
    _check(tensors, "weight._scale", _FLOATS, (count, 1))
    _check(tensors, "weight._shift", (*_FLOATS, torch.uint8), (count, 1))
    shift = tensors["weight._shift"]
    if not shift.dtype.is_floating_point and bool((shift >= 2**bits).any()):
        raise _refuse(f"weight._shift holds zero points above {2**bits - 1} ({qtype})")
    stored = {"data": tensors["weight._data._data"], "scale": tensors["weight._scale"], "shift": shift}
    return stored, {"qtype": qtype, "group_size": size, "shape": shape}
