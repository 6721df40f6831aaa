"""``gguf``: linear layers holding GGUF blocks as a GGUF file stores them (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
and Q4_K, Q5_K, Q6_K read from files).

A :class:`GgufLinear` keeps the tensor's bytes (``blocks [out, in // block * nbytes]`` uint8, the file's
rows) and dequantizes them in torch, bit-equal to ``gguf.quants.dequantize``. Storage is ``{"blocks"}``
with ``meta = {"type": "Q4_1", "shape": (out, in)}``.

Requantize: the legacy types have a fresh quantizer bit-equal to the ``gguf`` package's; every type has a
keep-state requantize (the block scales and mins kept byte for byte, nearest codes) and a calibrated one
(:func:`qadapt.rounding.calibrated_round`: scales refit for the legacy types, codes only for K-quants).
The K-quants' own quantizer (llama.cpp's scale search) is not reproduced: their fresh ``requantize`` keeps
the block scales too. Group scales are the legacy types' float16 ``d``; group offsets (zero points) the
float16 mins ``m`` of Q4_1 and Q5_1.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qadapt.errors import CapabilityError, ConfigError
from qadapt.protocols import Backend, BackendCapabilities, CalibrationStats, GroupLayout, PluginOptions, QuantizedWeight
from qadapt.rounding import Codebook, calibrated_round
from qadapt_gguf.quants import TYPES, BlockType

QuantizableType = Literal["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
_ALL = BackendCapabilities(keep_state=True, calibrated=True, group_scales=True, group_offsets=True, model_files=True)
_NO_OFFSETS = BackendCapabilities(keep_state=True, calibrated=True, group_scales=True, model_files=True)


class GgufOptions(PluginOptions):
    """Options of the ``gguf`` backend (used when it quantizes a float layer)."""

    type: QuantizableType = Field(
        "q4_1", description="GGUF block type for float layers it quantizes (K-quants are only read from files)."
    )


class GgufLinear(nn.Module):
    """A linear layer over GGUF blocks: ``blocks [out, in // block * nbytes]`` uint8, a float ``bias [out]``."""

    def __init__(
        self, blocks: torch.Tensor, gguf_type: str, in_features: int, out_features: int, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.gguf_type = gguf_type
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def weight_float(self) -> torch.Tensor:
        """The dequantized weight, float32 ``[out, in]``."""
        return dequantize_blocks(self.blocks, TYPES[self.gguf_type], (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight_float().to(x.dtype), bias)
        out = _BlocksMatmul.apply(x, self.blocks, self.gguf_type, (self.out_features, self.in_features))
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.gguf_type}"


class _BlocksMatmul(torch.autograd.Function):
    """``x @ W.T`` that keeps the blocks, not the float weight, for the backward (dequantized again there):
    training holds one layer's float weight at a time, not the whole model's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: torch.Tensor, kind: str, shape: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(blocks)
        ctx.kind, ctx.shape = kind, shape
        return F.linear(x, dequantize_blocks(blocks, TYPES[kind], shape).to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (blocks,) = ctx.saved_tensors
        weight = dequantize_blocks(blocks, TYPES[ctx.kind], ctx.shape).to(grad.dtype)
        return grad @ weight, None, None, None


def dequantize_blocks(blocks: torch.Tensor, t: BlockType, shape: tuple[int, int]) -> torch.Tensor:
    """Float32 ``[out, in]`` of a tensor's rows of blocks ``[out, in // block * nbytes]``."""
    return t.dequantize(blocks.reshape(-1, t.nbytes)).reshape(shape)


def check_shape(t: BlockType, in_features: int, where: str) -> None:
    if in_features % t.block:
        raise ConfigError(
            f"{where}: type {t.name.lower()} stores rows in blocks of {t.block} weights, so in_features "
            f"({in_features}) must be a multiple of {t.block}"
        )


class GgufBackend(Backend):
    """GGUF blocks in a :class:`GgufLinear` (see the module docstring)."""

    Options = GgufOptions
    capabilities: ClassVar[BackendCapabilities] = _ALL
    model_file_suffixes: ClassVar[tuple[str, ...]] = (".gguf",)

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        # Zero points exist only in the min formats; an instance answers for the type it quantizes to.
        self.capabilities = _ALL if TYPES[self.options.type.upper()].has_offset else _NO_OFFSETS

    # ------------------------------------------------------------------ modules

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, GgufLinear)

    def check_layer(self, in_features: int, out_features: int) -> None:
        check_shape(TYPES[self.options.type.upper()], in_features, f"backend gguf ({in_features} -> {out_features})")

    def quantize(self, linear: nn.Linear) -> nn.Module:
        t = TYPES[self.options.type.upper()]
        self.check_layer(linear.in_features, linear.out_features)
        weight = linear.weight.detach().float()
        blocks = t.quantize(weight.reshape(-1, t.block)).reshape(linear.out_features, -1)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return GgufLinear(blocks, t.name, linear.in_features, linear.out_features, bias)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        shape = (module.out_features, module.in_features)
        return QuantizedWeight({"blocks": module.blocks}, {"type": module.gguf_type, "shape": shape})

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        module.blocks = storage.tensors["blocks"]
        module.gguf_type = storage.meta["type"]

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return module(x)

    # ------------------------------------------------------------------ storage

    @staticmethod
    def _type(storage: QuantizedWeight) -> BlockType:
        return TYPES[storage.meta["type"]]

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        return dequantize_blocks(storage.tensors["blocks"], self._type(storage), tuple(storage.meta["shape"]))

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """Fresh blocks (the ``gguf`` package's quantizer) for the legacy types; K-quants keep their scales."""
        t = self._type(like)
        if not t.fresh:
            return self.requantize_keep_state(weight, like)
        blocks = like.tensors["blocks"]
        out = t.quantize(weight.detach().float().to(blocks.device).reshape(-1, t.block))
        return QuantizedWeight({"blocks": out.reshape(blocks.shape)}, dict(like.meta))

    def _grid(self, like: QuantizedWeight) -> tuple[BlockType, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(type, blocks [n, nbytes], scale [n, G], offset [n, G] or None)`` of ``like``."""
        t = self._type(like)
        blocks = like.tensors["blocks"].reshape(-1, t.nbytes)
        scale, offset = t.params(blocks)
        return t, blocks, scale, offset

    def _per_element(self, values: torch.Tensor, t: BlockType, shape: tuple[int, int]) -> torch.Tensor:
        """Per-group ``values [n, G]`` repeated to ``[out, in]``."""
        return values.repeat_interleave(t.group, dim=-1).reshape(shape)

    def requantize_keep_state(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """Nearest codes against ``like``'s block scales and mins, which are kept byte for byte."""
        t, blocks, scale, offset = self._grid(like)
        w = weight.detach().float().to(blocks.device).reshape(blocks.shape[0], -1, t.group)
        if offset is not None:
            w = w - offset.unsqueeze(-1)
        # Integer levels: the nearest is a rounding (ties to even); a zero scale gives the level nearest 0.
        inverse = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0).unsqueeze(-1)
        level = torch.round(w.mul_(inverse) if offset is not None else w * inverse).clamp_(t.low, t.high)
        new = t.with_index(blocks, level.sub_(t.low).reshape(-1, t.block))
        return QuantizedWeight({"blocks": new.reshape(like.tensors["blocks"].shape)}, dict(like.meta))

    def requantize_calibrated(
        self, weight: torch.Tensor, like: QuantizedWeight, stats: CalibrationStats
    ) -> QuantizedWeight:
        """Codes by error feedback in ``H`` (and, for the legacy types, float16 scales refit); mins kept."""
        t, blocks, scale, offset = self._grid(like)
        shape = tuple(like.meta["shape"])
        w = weight.detach().float().to(blocks.device)
        if offset is not None:
            w = w - self._per_element(offset, t, shape)
        layout = GroupLayout(t.group, shape[0] * shape[1] // t.group)
        result = calibrated_round(
            w,
            stats.hessian,
            Codebook(t.levels()),
            layout,
            scale.reshape(-1),
            damp=stats.damp,
            refit=t.fresh,
            project=lambda s: s.to(torch.float16).float(),
        )
        new = t.with_index(blocks, result.codes.reshape(-1, t.block))
        if result.scales_changed:
            m = None if offset is None else offset.reshape(-1)
            new = t.with_header(new, result.scales.reshape(-1), m)
        return QuantizedWeight({"blocks": new.reshape(like.tensors["blocks"].shape)}, dict(like.meta))

    # ------------------------------------------------------------------ group scales and zero points

    def group_layout(self, storage: QuantizedWeight) -> GroupLayout:
        """One group per block of 32 (legacy types); K-quants' integer sub-block scales are not offered."""
        t = self._type(storage)
        if not t.fresh:
            raise CapabilityError(
                f"{t.name} stores 6- or 8-bit integer sub-block scales under a float16 super-scale; per-group scales "
                "and zero points are offered for Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1"
            )
        out_f, in_f = storage.meta["shape"]
        return GroupLayout(group_size=t.block, num_groups=out_f * in_f // t.block)

    def get_group_scales(self, storage: QuantizedWeight) -> torch.Tensor:
        """Each block's float16 ``d`` as float32 ``[num_groups]`` (``W = d * level (+ m)``)."""
        self.group_layout(storage)
        return self._grid(storage)[2].reshape(-1)

    def with_group_scales(self, storage: QuantizedWeight, scales: torch.Tensor) -> QuantizedWeight:
        """New ``d = scales`` (float16); a min format's ``m`` scaled by the same factor, so each block scales whole."""
        self.group_layout(storage)
        t, blocks, d, m = self._grid(storage)
        new_d = scales.float().reshape(-1).to(blocks.device)
        if m is not None:
            old = d.reshape(-1)
            ratio = torch.where(old != 0, new_d / torch.where(old != 0, old, 1.0), 1.0)
            m = m.reshape(-1) * ratio
        out = t.with_header(blocks, new_d, m)
        return QuantizedWeight({"blocks": out.reshape(storage.tensors["blocks"].shape)}, dict(storage.meta))

    def _offset_type(self, storage: QuantizedWeight) -> BlockType:
        t = self._type(storage)
        self.group_layout(storage)
        if not t.has_offset:
            raise CapabilityError(f"{t.name} blocks have no zero point (no min); Q4_1 and Q5_1 have one per block")
        return t

    def get_group_offsets(self, storage: QuantizedWeight) -> torch.Tensor:
        """Each block's float16 min ``m`` as float32 ``[num_groups]`` (Q4_1, Q5_1)."""
        self._offset_type(storage)
        return self._grid(storage)[3].reshape(-1)

    def with_group_offsets(self, storage: QuantizedWeight, offsets: torch.Tensor) -> QuantizedWeight:
        """New mins ``m = offsets`` (float16: the format's rounding); codes and ``d`` kept."""
        t = self._offset_type(storage)
        _, blocks, d, _ = self._grid(storage)
        out = t.with_header(blocks, d.reshape(-1), offsets.float().reshape(-1).to(blocks.device))
        return QuantizedWeight({"blocks": out.reshape(storage.tensors["blocks"].shape)}, dict(storage.meta))

    # ------------------------------------------------------------------ model files (GGUF in, GGUF out)

    def load_model_file(self, path: Any, **options: Any) -> nn.Module:
        from qadapt_gguf.model_file import load_model

        return load_model(path, **options)

    def model_file_layers(self, path: Any) -> dict[str, tuple[int, int]]:
        from qadapt_gguf.model_file import linear_layers

        return linear_layers(path)

    def write_model_file(self, base: Any, out: Any, rewrite: Any) -> list[str]:
        from qadapt_gguf.model_file import write_model

        return write_model(base, out, rewrite)
