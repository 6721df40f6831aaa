"""``hqq``: Half-Quadratic Quantization linear layers (``hqq.core.quantize.HQQLinear``).

hqq is imported on first use, not when the plugin loads: no layer can be an ``HQQLinear`` before
hqq was imported, so ``owns`` (asked of every installed backend by ``backend="auto"``) answers
False without importing it. Loading the plugin still fails at once, with the install hint, when
hqq is not installed.

The forward runs hqq's PyTorch backend (dequantize, then matmul; it runs on CPU and lets
gradients reach the input) whatever backend ``HQQLinear.set_backend`` chose globally, so that
adapters train the same way everywhere. The CUDA/ATen kernels are not used.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from qadapt.errors import CapabilityError, ConfigError
from qadapt.protocols import Backend, BackendCapabilities, GroupLayout, PluginOptions, QuantizedWeight

if importlib.util.find_spec("hqq") is None:
    raise ModuleNotFoundError("No module named 'hqq'", name="hqq")


def _hqq() -> ModuleType:
    """``hqq.core.quantize`` (HQQLinear, Quantizer, hqq_base_quant_config)."""
    from hqq.core import quantize

    return quantize


FloatName = Literal["float32", "bfloat16", "float16"]
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Plain values of an HQQLinear's ``meta`` that the storage carries (scale and zero are tensors).
_META_KEYS = ("nbits", "group_size", "shape", "axis", "packing", "unpack_view_dtype", "view_as_float", "compute_dtype")
#: Quantizer settings that live in ``quant_config`` rather than ``meta`` (needed to requantize alike).
_QUANT_KEYS = ("channel_wise", "optimize", "round_zero")
#: hqq packs this many groups' codes into one byte (3 bits pads to 10 per int32; 8 bits does not pack).
_CODES_PER_BYTE = {4: 2, 2: 4, 1: 8}


class HqqOptions(PluginOptions):
    """Options of the ``hqq`` backend (used when it quantizes a float layer)."""

    nbits: Literal[8, 4, 3, 2, 1] = Field(4, description="Bits per weight.")
    group_size: PositiveInt | None = Field(
        64,
        le=2**20,
        description=(
            "Weights per (scale, zero) group; a multiple of 8 that divides out_features * in_features, at most "
            "2^20 (None: whole rows for axis=1, whole columns for axis=0)."
        ),
    )
    axis: Literal[0, 1] = Field(
        1, description="1: groups run along in_features (the usual choice); 0: along out_features."
    )
    compute_dtype: FloatName = Field(
        "float32", description="dtype of the scales, zeros, bias and matmul (hqq's default, float16, is slow on CPU)."
    )
    optimize: bool = Field(True, description="Refine scales and zeros with HQQ's half-quadratic solver.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _outside_inference(meta: dict) -> dict:
    """``meta`` with its inference tensors copied to ordinary ones.

    hqq's half-quadratic solver runs under ``torch.inference_mode``, and when no dtype or device
    change follows, the zeros it returns stay inference tensors: ``load_state_dict`` (an in-place
    copy) cannot write into them, so a model holding them could not load a checkpoint.
    """
    return {k: v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v for k, v in meta.items()}


class HqqBackend(Backend):
    """Groupwise ``nbits`` weights with a float scale and zero per group: ``W ~ (W_q - zero) * scale``.

    Storage: ``W_q`` (packed codes), ``scale`` and ``zero`` (one per group, in the compute
    dtype); ``meta`` holds hqq's plain settings (nbits, group_size, axis, packing, ...).
    Layers with hqq's deprecated quantized or offloaded scales/zeros are not owned.
    """

    Options = HqqOptions
    capabilities = BackendCapabilities(keep_state=True, group_offsets=True)

    def owns(self, module: nn.Module) -> bool:
        if "hqq" not in sys.modules or not isinstance(module, _hqq().HQQLinear) or not module.is_initialized():
            return False
        meta = module.meta
        return not meta.get("quant_scale") and not meta.get("quant_zero") and "zero_scale" not in meta

    def check_layer(self, in_features: int, out_features: int) -> None:
        """Raise ConfigError when the options cannot quantize a layer of this size.

        hqq cuts the flattened weight into groups (``group_size`` along ``axis``) and packs codes
        across groups: 2, 4 or 8 groups share a byte at 4, 2 or 1 bits, so the group count
        (``axis=1``) or the group size (``axis=0``) must be a multiple of that.
        """
        opts = self.options
        numel = in_features * out_features
        where = f"backend hqq ({in_features} -> {out_features})"
        group = opts.group_size
        if group is not None and (group % 8 or numel % group):
            raise ConfigError(
                f"{where}: group_size={group} must be a multiple of 8 that divides out_features * in_features = {numel}"
            )
        if group is None:
            group = in_features if opts.axis == 1 else out_features
        packed = numel // group if opts.axis == 1 else group
        per_byte = _CODES_PER_BYTE.get(opts.nbits, 1)
        if packed % per_byte:
            what = f"the group size {group}"
            if opts.axis == 1:
                what = f"the number of groups ({numel} / {group} = {packed})"
            raise ConfigError(
                f"{where}: nbits={opts.nbits} packs {per_byte} groups per byte, so {what} must be a multiple "
                f"of {per_byte} (group_size={opts.group_size}, axis={opts.axis}); choose another group_size or axis"
            )

    def quantize(self, linear: nn.Linear) -> nn.Module:
        opts = self.options
        self.check_layer(linear.in_features, linear.out_features)
        hqq = _hqq()
        config = hqq.hqq_base_quant_config(nbits=opts.nbits, group_size=opts.group_size, axis=opts.axis)
        config["weight_quant_params"]["optimize"] = opts.optimize
        # HQQLinear deletes the parameters of the layer it is given: give it a holder, not the caller's layer.
        holder = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        holder.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            holder.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        device = linear.weight.device
        layer = hqq.HQQLinear(holder, config, compute_dtype=_FLOAT_DTYPES[opts.compute_dtype], device=str(device))
        layer.meta = _outside_inference(layer.meta)
        return layer

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        meta = module.meta
        plain = {key: meta[key] for key in _META_KEYS}
        plain["shape"] = tuple(plain["shape"])
        params = module.quant_config["weight_quant_params"]
        plain.update({key: params[key] for key in _QUANT_KEYS})
        return QuantizedWeight({"W_q": module.W_q.data, "scale": meta["scale"], "zero": meta["zero"]}, plain)

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        tensors, plain = storage.tensors, storage.meta
        meta = {key: plain[key] for key in _META_KEYS}
        meta.update(shape=torch.Size(plain["shape"]), scale=tensors["scale"], zero=tensors["zero"])
        meta.update(quant_scale=False, quant_zero=False)
        module.W_q = nn.Parameter(tensors["W_q"], requires_grad=False)
        module.meta = meta

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        meta = {**storage.meta, "scale": storage.tensors["scale"], "zero": storage.tensors["zero"]}
        meta["shape"] = torch.Size(meta["shape"])
        return _hqq().Quantizer.dequantize(storage.tensors["W_q"], meta).float()

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        m = like.meta
        device = like.tensors["W_q"].device
        quantizer = _hqq().Quantizer
        w_q, meta = quantizer.quantize(
            weight.detach().float().to(device),
            nbits=m["nbits"],
            channel_wise=m["channel_wise"],
            group_size=m["group_size"],
            optimize=m["optimize"],
            round_zero=m["round_zero"],
            axis=m["axis"],
            view_as_float=m["view_as_float"],
            compute_dtype=m["compute_dtype"],
            device=str(device),
        )
        # What HQQLinear does after quantizing: scales and zeros in the compute dtype, on the device.
        meta["compute_dtype"] = m["compute_dtype"]
        w_q, meta = quantizer.to_ooplace(w_q, meta, device=device)
        meta = _outside_inference(meta)
        plain = {key: meta[key] for key in _META_KEYS}
        plain["shape"] = tuple(plain["shape"])
        plain.update({key: m[key] for key in _QUANT_KEYS})
        return QuantizedWeight({"W_q": w_q, "scale": meta["scale"], "zero": meta["zero"]}, plain)

    # ------------------------------------------------------------ per-group zero points (group_offsets)

    def group_layout(self, storage: QuantizedWeight) -> GroupLayout:
        """``axis=1``: runs of ``group_size`` consecutive weights of a row (a whole row without a group size)."""
        m = storage.meta
        if m["axis"] != 1:
            raise CapabilityError(
                "hqq groups along axis=0 are runs down the columns, not runs of the row-major weight; per-group "
                "zero points are offered for axis=1"
            )
        out_f, in_f = m["shape"]
        size = m["group_size"] or in_f
        return GroupLayout(group_size=size, num_groups=out_f * in_f // size)

    def get_group_offsets(self, storage: QuantizedWeight) -> torch.Tensor:
        """``−zero · scale`` per group (``W = (q − zero) · scale = q · scale + offset``), float32 ``[num_groups]``."""
        self.group_layout(storage)
        t = storage.tensors
        return (-t["zero"].float() * t["scale"].float()).flatten()

    def with_group_offsets(self, storage: QuantizedWeight, offsets: torch.Tensor) -> QuantizedWeight:
        """New zeros ``−offset / scale`` in the zeros' dtype (their rounding is the format's); codes and scales kept."""
        self.group_layout(storage)
        t = storage.tensors
        zero = (-offsets.float().reshape(t["zero"].shape).to(t["scale"].device) / t["scale"].float()).to(
            t["zero"].dtype
        )
        return QuantizedWeight({**t, "zero": zero}, dict(storage.meta))

    def requantize_keep_state(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """Codes ``round(W / scale + zero)`` in ``like``'s groups, packed by hqq; scale and zero kept as they are."""
        m, t = like.meta, like.tensors
        w = weight.detach().float().to(t["W_q"].device)
        if m["channel_wise"] and m["group_size"] is not None:
            w = w.reshape(-1, m["group_size"]) if m["axis"] == 1 else w.reshape(m["group_size"], -1)
        codes = (w / t["scale"].float() + t["zero"].float()).round_().clamp_(0, round(2 ** m["nbits"] - 1))
        quantizer = _hqq().Quantizer
        if m["packing"] is None:  # stored unpacked
            return QuantizedWeight({"W_q": codes.to(t["W_q"].dtype), "scale": t["scale"], "zero": t["zero"]}, dict(m))
        w_q = quantizer.pack[m["packing"]](codes)
        if m["view_as_float"]:
            w_q = w_q.view(m["compute_dtype"])
        return QuantizedWeight({"W_q": w_q, "scale": t["scale"], "zero": t["zero"]}, dict(m))

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        compute = module.compute_dtype
        if x.is_meta:
            return module.forward_pytorch_backprop(x.to(compute))
        with torch.autocast(x.device.type, enabled=False):
            return module.forward_pytorch_backprop(x.to(compute))
