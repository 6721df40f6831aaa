"""``torchao``: ``nn.Linear`` layers whose weight is a torchao tensor subclass (int8 / intx weight-only, NF4).

torchao itself is imported on first use (``qadapt_torchao.formats``), not when the plugin loads:
``backend="auto"`` asks every installed backend whether it owns each layer, and no layer can hold
a torchao tensor before torchao was imported, so ``owns`` answers False without importing it.
Loading the plugin still fails at once, with the install hint, when torchao is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.errors import ConfigError
from qadapt.protocols import Backend, BackendCapabilities, QuantizedWeight
from qadapt_torchao.options import TorchaoOptions

if importlib.util.find_spec("torchao") is None:
    raise ModuleNotFoundError("No module named 'torchao'", name="torchao")


def _formats() -> ModuleType:
    from qadapt_torchao import formats

    return formats


class TorchaoBackend(Backend):
    """torchao keeps ``nn.Linear`` and swaps its weight for a tensor subclass; this backend owns such layers.

    Storage: the subclass' inner tensors by their torchao names (``qdata``, ``scale``,
    ``zero_point`` for int8/intx; ``quantized_data``, ``quantized_scalers``, ... for NF4), and in
    ``meta`` the subclass name, its non-tensor attributes, shape and stride. ``set_storage``
    rebuilds the subclass from them, so an exact unmerge gives back the same inner tensors bit for
    bit. ``requantize`` quantizes with torchao's own code and the settings read from ``like``.
    """

    Options = TorchaoOptions
    capabilities = BackendCapabilities(keep_state=True)

    # ------------------------------------------------------------------ modules

    def owns(self, module: nn.Module) -> bool:
        if not isinstance(module, nn.Linear) or "torchao" not in sys.modules:
            return False
        # A linear may have no weight at all (compressed-tensors' packed layers, as transformers loads them).
        weight = getattr(module, "weight", None)
        return weight is not None and _formats().format_of(weight) is not None

    def check_layer(self, in_features: int, out_features: int) -> None:
        """Raise ConfigError when the options cannot quantize a layer of this size."""
        opts = self.options
        if opts.config == "nf4":
            problem = _nf4_problem(in_features * out_features, opts.nf4_block_size, opts.nf4_scaler_block_size)
            if problem:
                raise ConfigError(f"backend torchao (config='nf4'): {problem} ({in_features} -> {out_features})")
        elif opts.group_size is not None and in_features % opts.group_size:
            raise ConfigError(
                f"backend torchao: group_size={opts.group_size} must divide in_features={in_features}; "
                "use a divisor of in_features, or None for one scale per output row"
            )
        elif (opts.group_size or in_features) == 1:
            # torchao 0.18's choose_qparams_affine fails on groups of one weight (a reshape error).
            raise ConfigError(
                f"backend torchao (config={opts.config!r}): groups of one weight are not supported by torchao "
                f"(group_size={opts.group_size}, in_features={in_features}); use groups of 2 or more weights"
            )

    def _settings(self, in_features: int) -> tuple[object, dict]:
        opts = self.options
        formats = _formats()
        if opts.config == "nf4":
            return formats.NF4, {"block_size": opts.nf4_block_size, "scaler_block_size": opts.nf4_scaler_block_size}
        block_size = [1, opts.group_size or in_features]
        if opts.config == "int8":
            return formats.INT8, {"block_size": block_size}
        settings = {"block_size": block_size, "weight_dtype": torch.int4, "mapping": opts.mapping, "scale_dtype": None}
        return formats.INTX, settings

    def quantize(self, linear: nn.Linear) -> nn.Module:
        self.check_layer(linear.in_features, linear.out_features)
        fmt, settings = self._settings(linear.in_features)
        weight = linear.weight.detach()
        layer = nn.Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", dtype=weight.dtype
        )
        layer.weight = nn.Parameter(fmt.quantize(weight, settings), requires_grad=False)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    # ------------------------------------------------------------------ storage

    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        return _storage(module.weight)

    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        module.weight = nn.Parameter(_rebuild(storage), requires_grad=False)

    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        tensor = _rebuild(storage)
        return _formats().FORMATS[type(tensor)].dequantize(tensor).float()

    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        old = _rebuild(like)
        fmt = _formats().FORMATS[type(old)]
        target = weight.detach().to(device=old.device, dtype=old.dtype).contiguous()
        return _storage(fmt.quantize(target, fmt.settings(old)))

    def requantize_keep_state(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """Codes nearest to ``weight`` against ``like``'s scales (and zero points / NF4 scaler state),
        which stay the same tensors; torchao's ``from_hp`` with given scales, or nearest NF4 codes."""
        old = _rebuild(like)
        target = weight.detach().to(device=old.device, dtype=old.dtype).contiguous()
        return _storage(_formats().FORMATS[type(old)].keep_state(target, old))

    # ------------------------------------------------------------------ forward

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, module.weight, module.bias)

    def forward_storage(self, module: nn.Module, storage: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
        # The weight is a tensor subclass rebuilt from the storage; the module is not touched.
        return _linear(x, _rebuild(storage), module.bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., in] @ weight [out, in]^T + bias`` in the weight's dtype (torchao's quantized linear)."""
    if x.is_meta:
        return F.linear(x.to(weight.dtype), weight, bias)
    # torchao's linear wants input and weight in one dtype; under autocast it would be asked to
    # cast its weight. Run in the weight's dtype; the layer casts the output back.
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))


def _nf4_problem(numel: int, block_size: int, scaler_block_size: int) -> str | None:
    """Why torchao's NF4 cannot hold a weight of ``numel`` elements with these block sizes, or None."""
    if numel % 2:
        return f"NF4 packs two weights per byte and needs an even number of weights, got {numel}"
    if numel % block_size:
        return f"nf4_block_size={block_size} must divide out_features * in_features = {numel}"
    blocks = numel // block_size
    if blocks % scaler_block_size:
        valid = [d for d in range(1, min(blocks, 512) + 1) if blocks % d == 0]
        return (
            f"nf4_scaler_block_size={scaler_block_size} must divide the number of blocks "
            f"({numel} / {block_size} = {blocks}); values that fit: {valid}"
        )
    return None


def _storage(tensor: torch.Tensor) -> QuantizedWeight:
    names, attributes = tensor.__tensor_flatten__()
    meta = {
        "subclass": type(tensor).__name__,
        "attributes": attributes,
        "shape": tuple(tensor.shape),
        "stride": tuple(tensor.stride()),
    }
    return QuantizedWeight({name: getattr(tensor, name) for name in names}, meta)


def _rebuild(storage: QuantizedWeight) -> torch.Tensor:
    meta = storage.meta
    fmt = _formats().BY_NAME[meta["subclass"]]
    return fmt.tensor_type.__tensor_unflatten__(
        dict(storage.tensors), meta["attributes"], torch.Size(meta["shape"]), meta["stride"]
    )
