"""bitsandbytes layers in the transformers checkpoint layout, and the ``quantization_config`` it writes.

transformers (5.x) saves a ``Linear4bit`` as ``weight`` (packed codes) plus the entries of
bitsandbytes' ``QuantState.as_dict(packed=True)`` under ``weight.`` (``absmax``, ``quant_map``,
``nested_absmax``, ``nested_quant_map`` and ``quant_state.bitsandbytes__nf4|fp4``, a JSON blob of
the plain fields), and a ``Linear8bitLt`` as ``weight`` (int8 codes), ``SCB`` (row scales) and
``weight_format`` (0: row-major). Its ``config.json`` holds ``BitsAndBytesConfig.to_dict()``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from qadapt.errors import CheckpointError, shorten

#: ``BitsAndBytesConfig().to_dict()`` of transformers 5.x, field for field (its defaults).
_DEFAULTS: dict[str, Any] = {
    "_load_in_4bit": False,
    "_load_in_8bit": False,
    "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "fp4",
    "bnb_4bit_use_double_quant": False,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": False,
    "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}
#: Settings a layer's storage does not decide: kept from the base checkpoint's config.
_KEPT = ("bnb_4bit_compute_dtype", "llm_int8_enable_fp32_cpu_offload", "llm_int8_skip_modules", "llm_int8_threshold")
STATE_KEY_PREFIX = "weight.quant_state.bitsandbytes__"


def skip_modules_config(names: list[str]) -> dict[str, Any]:
    """transformers' ``llm_int8_skip_modules``: the modules a bitsandbytes load keeps in float (4 and 8 bit)."""
    return {"llm_int8_skip_modules": sorted(names)}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def bnb_config(bits: int, base_config: Mapping[str, Any] | None, **fields: Any) -> dict[str, Any]:
    """A ``quantization_config`` for ``bits`` (4 or 8): transformers' defaults, the base checkpoint's
    kept settings when it was a bitsandbytes one, then ``fields``."""
    config = dict(_DEFAULTS)
    if base_config is not None and base_config.get("quant_method") == "bitsandbytes":
        config.update({key: base_config[key] for key in _KEPT if key in base_config})
    four = bits == 4
    config.update(_load_in_4bit=four, load_in_4bit=four, _load_in_8bit=not four, load_in_8bit=not four)
    config.update(fields)
    return config


# ------------------------------------------------------------------------------ checked readers

#: 4-bit block sizes bitsandbytes quantizes with, and the nested (double quantization) block sizes.
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The JSON blob of a 4-bit layer's plain fields is small; a larger one is refused unparsed.
MAX_STATE_BYTES = 4096


def _refuse(key: str, what: str) -> CheckpointError:
    return CheckpointError(f"bitsandbytes 4-bit layer: {key} {what}")


def _tensor_problem(
    tensors: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype | tuple[torch.dtype, ...], numel: int | None
) -> None:
    """Refuse ``tensors[key]`` unless it has ``dtype`` (one of), ``numel`` elements and finite values."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    tensor = tensors.get(key)
    if tensor is None:
        raise _refuse(key, f"is missing (has: {', '.join(sorted(tensors))})")
    if tensor.dtype not in dtypes:
        names = " or ".join(dtype_name(d) for d in dtypes)
        raise _refuse(key, f"must be {names}, got {dtype_name(tensor.dtype)}")
    if numel is not None and tensor.numel() != numel:
        raise _refuse(
            key, f"must hold {numel} values for this layer, got {tensor.numel()} (shape {list(tensor.shape)})"
        )
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise _refuse(key, "holds NaN or infinite values")


def _state_fields(blob: torch.Tensor, key: str) -> dict[str, Any]:
    """The plain fields of a 4-bit layer (the ``quant_state.bitsandbytes__*`` tensor: UTF-8 JSON bytes)."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() > MAX_STATE_BYTES:
        raise _refuse(
            key,
            f"must be at most {MAX_STATE_BYTES} uint8 bytes of JSON, got {dtype_name(blob.dtype)} {list(blob.shape)}",
        )
    try:
        fields = json.loads(bytes(blob.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _refuse(key, f"is not UTF-8 JSON: {shorten(exc, 160)}") from exc
    if not isinstance(fields, dict):
        raise _refuse(key, f"must hold a JSON object, got {type(fields).__name__}")
    return fields


def _field(fields: Mapping[str, Any], key: str, name: str, valid: tuple[Any, ...], hint: str) -> Any:
    """``fields[name]`` if it is one of ``valid`` (a bool never is), else refused naming ``hint``."""
    value = fields.get(name)
    if isinstance(value, bool) or value not in valid:
        raise _refuse(key, f"field {name!r} must be {hint}, got {shorten(value)}")
    return value


def read_4bit(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]] | None:
    """A transformers-saved ``Linear4bit`` weight, checked against its declared shape and format.

    ``tensors``: keys relative to the layer (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.quant_state.bitsandbytes__nf4``; with double quantization ``weight.nested_absmax`` and
    ``weight.nested_quant_map``). Returns ``(data, state tensors, meta)`` for the storage, or None when
    the layer is not in this layout. Every count is checked before anything is dequantized: the packed
    codes hold ``ceil(n / 2)`` bytes for ``n = out * in`` weights, ``absmax`` one value per block of
    ``blocksize``, ``nested_absmax`` one per block of ``nested_blocksize`` of those; the code books 16 and
    256 float32 values; every float finite.

    Raises:
        CheckpointError: naming the tensor or field, its value and what is valid.
    """
    states = [key for key in tensors if key.startswith(STATE_KEY_PREFIX)]
    if "weight" not in tensors or len(states) != 1 or any(not key.startswith("weight") for key in tensors):
        return None
    state_key = states[0]
    quant_type = state_key[len(STATE_KEY_PREFIX) :]
    if quant_type not in ("nf4", "fp4"):
        raise _refuse(state_key, "must end in bitsandbytes__nf4 or bitsandbytes__fp4")
    fields = _state_fields(tensors[state_key], state_key)
    if fields.get("quant_type") != quant_type:
        raise _refuse(
            state_key,
            f"field 'quant_type' must be {quant_type!r} (as its name says), got {shorten(fields.get('quant_type'))}",
        )
    blocksize = _field(fields, state_key, "blocksize", BLOCKSIZES_4BIT, f"one of {BLOCKSIZES_4BIT}")
    dtype = _FLOAT_NAMES[_field(fields, state_key, "dtype", tuple(_FLOAT_NAMES), f"one of {tuple(_FLOAT_NAMES)}")]
    shape = fields.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
        raise _refuse(state_key, f"field 'shape' must be [out_features, in_features] (positive), got {shorten(shape)}")
    nested = "weight.nested_absmax" in tensors or "nested_blocksize" in fields
    expected = {"weight", "weight.absmax", "weight.quant_map", state_key}
    if nested:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    if set(tensors) != expected:
        raise _refuse(
            "layer",
            f"tensors are {sorted(tensors)}; a {'double-quantized ' if nested else ''}4-bit layer has "
            f"{sorted(expected)}",
        )
    count = shape[0] * shape[1]
    data = tensors["weight"]
    if data.dtype not in (torch.uint8, *_FLOAT_NAMES.values()):
        raise _refuse("weight", f"(the packed codes) must be uint8 or a float container, got {dtype_name(data.dtype)}")
    packed = (count + 1) // (2 * data.element_size())
    if data.numel() != packed or data.dim() not in (1, 2):
        raise _refuse(
            "weight",
            f"(the packed codes) must hold {packed} {dtype_name(data.dtype)} values for shape "
            f"{shape}, got shape {list(data.shape)}",
        )
    blocks = -(-count // blocksize)
    _tensor_problem(tensors, "weight.absmax", torch.uint8 if nested else torch.float32, blocks)
    _tensor_problem(tensors, "weight.quant_map", torch.float32, 16)
    state = {"absmax": tensors["weight.absmax"], "code": tensors["weight.quant_map"]}
    meta: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "shape": tuple(shape),
        "dtype": dtype,
        "nested": nested,
    }
    if nested:
        nested_blocksize = _field(
            fields, state_key, "nested_blocksize", NESTED_BLOCKSIZES, f"one of {NESTED_BLOCKSIZES}"
        )
        if fields.get("nested_dtype") != "float32":
            raise _refuse(
                state_key, f"field 'nested_dtype' must be 'float32', got {shorten(fields.get('nested_dtype'))}"
            )
        offset = fields.get("nested_offset")
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
            raise _refuse(state_key, f"field 'nested_offset' must be a finite number, got {shorten(offset)}")
        _tensor_problem(tensors, "weight.nested_absmax", torch.float32, -(-blocks // nested_blocksize))
        _tensor_problem(tensors, "weight.nested_quant_map", torch.float32, 256)
        state.update(
            offset=torch.tensor(float(offset)),
            nested_absmax=tensors["weight.nested_absmax"],
            nested_code=tensors["weight.nested_quant_map"],
        )
        meta.update(nested_blocksize=nested_blocksize, nested_dtype=torch.float32)
    unknown = set(fields) - {
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    }
    if unknown:
        raise _refuse(state_key, f"has unknown fields {sorted(unknown)}")
    return data, state, meta


def read_8bit(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A transformers-saved ``Linear8bitLt`` weight ``(CB [out, in] int8, SCB [out] float32)``, checked.

    Returns None when the layer is not in this layout (no ``SCB``, or a float ``weight``).

    Raises:
        CheckpointError: ``SCB`` of another length than the weight's rows, not float32, negative or not
            finite; a ``weight`` that is not 2-D; a ``weight_format`` other than 0 (row-major); other keys.
    """
    cb, scb = tensors.get("weight"), tensors.get("SCB")
    if cb is None or scb is None or cb.dtype != torch.int8:
        return None
    where = "bitsandbytes int8 layer:"
    extra = set(tensors) - {"weight", "SCB", "weight_format"}
    if extra:
        raise CheckpointError(f"{where} unexpected tensors {sorted(extra)} beside weight, SCB and weight_format")
    if cb.dim() != 2 or 0 in cb.shape:
        raise CheckpointError(f"{where} weight must be int8 [out_features, in_features], got shape {list(cb.shape)}")
    if scb.dtype != torch.float32 or scb.dim() != 1 or scb.numel() != cb.shape[0]:
        raise CheckpointError(
            f"{where} SCB must be float32 [{cb.shape[0]}] (one scale per row of weight), got "
            f"{dtype_name(scb.dtype)} {list(scb.shape)}"
        )
    if not bool(torch.isfinite(scb).all()) or bool((scb < 0).any()):
        raise CheckpointError(f"{where} SCB holds negative, NaN or infinite row scales (each is a row's absmax)")
    if "weight_format" in tensors:
        form = tensors["weight_format"]
        if form.numel() != 1 or form.dtype.is_floating_point or int(form.reshape(-1)[0]) != 0:
            raise CheckpointError(
                f"{where} weight_format must be 0 (row-major, all bitsandbytes still reads), "
                f"got {shorten(form.tolist())}"
            )
    return cb, scb
