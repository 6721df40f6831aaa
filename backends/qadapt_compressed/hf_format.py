"""The compressed-tensors ``pack-quantized`` checkpoint layout and its ``quantization_config``.

llm-compressor saves a linear layer quantized with its ``W4A16`` / ``W8A16`` scheme as
``weight_packed`` (int32 words, see :mod:`qadapt_compressed.packing`), ``weight_scale`` (one scale
per group of ``group_size`` inputs, ``[out, in / group_size]``, in the model's float dtype) and
``weight_shape`` (``[out, in]``, int64); symmetric schemes store no ``weight_zero_point``. Its
``config.json`` holds a ``quantization_config`` with ``quant_method: compressed-tensors``, format
``pack-quantized`` and one config group (targets ``Linear``) describing the weights; the modules it
leaves in float are listed in ``ignore``. vLLM and transformers (with compressed-tensors installed)
read exactly this. Nothing here imports compressed-tensors.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

import torch

from qadapt.errors import CheckpointError, shorten
from qadapt_compressed.packing import PACKABLE_BITS, packed_columns

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
#: The layer's tensors in this layout, keys relative to the layer.
KEYS = ("weight_packed", "weight_scale", "weight_shape")
#: Float dtypes a ``weight_scale`` may have.
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Largest dimension a ``weight_shape`` may declare (refused before anything is allocated).
MAX_DIM = 2**20
#: The compressed-tensors release whose layout this writes (written when compressed-tensors is not installed).
_FORMAT_VERSION = "0.20.1"


def _version() -> str:
    try:
        return importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        return _FORMAT_VERSION


def weights_args(num_bits: int, group_size: int) -> dict[str, Any]:
    """The ``weights`` entry of llm-compressor's ``W{num_bits}A16`` scheme (symmetric int, per group)."""
    return {
        "num_bits": num_bits,
        "type": "int",
        "symmetric": True,
        "group_size": group_size,
        "strategy": "group",
        "dynamic": False,
    }


def quantization_config(num_bits: int, group_size: int, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` compressed-tensors' ``ModelCompressor.update_config`` writes for one
    ``W{num_bits}A16`` group over every ``Linear``, the modules ``ignore`` left in float."""
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights_args(num_bits, group_size),
                "input_activations": None,
                "output_activations": None,
                "format": None,
            }
        },
        "format": FORMAT,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": _version(),
    }


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(f"compressed-tensors pack-quantized layer: {what}")


def scheme_of(config: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """``(num_bits, group_size)`` of a compressed-tensors ``pack-quantized`` config this backend reads,
    None for another quantization method; a pack-quantized config of another scheme is refused."""
    if not isinstance(config, Mapping) or config.get("quant_method") != QUANT_METHOD:
        return None
    groups = config.get("config_groups")
    if not isinstance(groups, Mapping) or len(groups) != 1:
        raise _refuse(f"quantization_config.config_groups must hold exactly one group, got {shorten(groups)}")
    ((name, group),) = groups.items()
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, Mapping):
        raise _refuse(f"{where} must be an object, got {shorten(group)}")
    form = group.get("format") or config.get("format")
    if form != FORMAT:
        raise _refuse(f"{where}: format must be {FORMAT!r}, got {shorten(form)}")
    if group.get("input_activations") is not None or group.get("output_activations") is not None:
        raise _refuse(f"{where}: activation quantization is not supported (weight-only W4A16 / W8A16 schemes)")
    weights = group.get("weights")
    if not isinstance(weights, Mapping):
        raise _refuse(f"{where}.weights must be an object, got {shorten(weights)}")
    bits, size = weights.get("num_bits"), weights.get("group_size")
    if bits not in PACKABLE_BITS or isinstance(bits, bool):
        raise _refuse(f"{where}.weights.num_bits must be one of {PACKABLE_BITS}, got {shorten(bits)}")
    if type(size) is not int or not 8 <= size <= MAX_DIM or size % 8:
        raise _refuse(f"{where}.weights.group_size must be a multiple of 8 in [8, {MAX_DIM}], got {shorten(size)}")
    expected = weights_args(bits, size)
    wrong = {k: weights.get(k) for k in ("type", "symmetric", "strategy", "dynamic") if weights.get(k) != expected[k]}
    if wrong:
        raise _refuse(f"{where}.weights must be symmetric static int per group ({expected}), got {shorten(wrong)}")
    return bits, size


def _shape(tensor: torch.Tensor) -> tuple[int, int]:
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.numel() != 2:
        raise _refuse(f"weight_shape must be 2 integers [out_features, in_features], got {shorten(tensor.tolist())}")
    out_f, in_f = (int(v) for v in tensor.reshape(-1).tolist())
    if not (0 < out_f <= MAX_DIM and 0 < in_f <= MAX_DIM):
        raise _refuse(f"weight_shape must be positive and at most {MAX_DIM}, got {[out_f, in_f]}")
    return out_f, in_f


def read_layer(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
    """``(weight_packed, weight_scale, meta)`` of a checkpoint layer in this layout, checked; None when
    the layer or the config is not this layout.

    Every tensor is checked against ``weight_shape`` and the scheme before anything is read:
    ``weight_packed`` int32 ``[out, in * bits / 32]``, ``weight_scale`` float ``[out, in / group_size]``,
    finite and positive. ``in_features`` must be a multiple of ``group_size``.

    Raises:
        CheckpointError: naming the tensor or field, its value and what is valid.
    """
    if "weight_packed" not in tensors:
        return None
    scheme = scheme_of(config)
    if scheme is None:
        return None
    bits, group_size = scheme
    if set(tensors) != set(KEYS):
        raise _refuse(f"tensors are {sorted(tensors)}; a symmetric layer has exactly {sorted(KEYS)}")
    out_f, in_f = _shape(tensors["weight_shape"])
    if in_f % group_size:
        raise _refuse(f"in_features {in_f} (weight_shape) is not a multiple of group_size {group_size}")
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    words = (out_f, packed_columns(in_f, bits))
    if packed.dtype != torch.int32 or tuple(packed.shape) != words:
        raise _refuse(f"weight_packed must be int32 {list(words)}, got {packed.dtype} {list(packed.shape)}")
    groups = (out_f, in_f // group_size)
    if scale.dtype not in SCALE_DTYPES.values() or tuple(scale.shape) != groups:
        raise _refuse(f"weight_scale must be float {list(groups)}, got {scale.dtype} {list(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise _refuse("weight_scale holds zero, negative, NaN or infinite scales")
    return packed, scale, {"num_bits": bits, "group_size": group_size, "shape": (out_f, in_f)}
