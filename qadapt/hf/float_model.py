"""After ``unwrap(model, merge="float", dtype=...)``: a model transformers loaded quantized becomes a plain
float model, which runs in ``dtype`` and round-trips through ``save_pretrained`` / ``from_pretrained``."""

from __future__ import annotations

import torch
from torch import nn

from qadapt.errors import warn


def quantized_leftovers(model: nn.Module) -> list[str]:
    """Names of tensors that are still in a quantized format: an integer dtype or a tensor subclass
    (bitsandbytes' ``Params4bit``/``Int8Params``, torchao's tensors), e.g. of layers no target reached."""
    found = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        plain = type(tensor) in (nn.Parameter, torch.Tensor)
        if not plain or (isinstance(tensor, nn.Parameter) and not tensor.dtype.is_floating_point):
            found.append(name)
    return found


def make_float(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter and buffer to ``dtype`` and clear the model's quantization state
    (``hf_quantizer``, ``config.quantization_config``, ``is_quantized``, ``quantization_method``).

    When some layers are still quantized (they were not targets), the quantization state is kept (a
    float config would describe them wrongly) and a warning names the first.
    """
    leftovers = quantized_leftovers(model)
    if leftovers:
        warn(
            f"unwrap(merge='float'): {len(leftovers)} tensor(s) are still quantized (first: {leftovers[0]}), so the "
            "model keeps its quantization config; wrap those layers too (targets=...) to get a plain float model"
        )
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        model.__dict__.pop(attr, None)
    config = getattr(model, "config", None)
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None:
            sub.__dict__.pop("quantization_config", None)
            sub.__dict__.pop("_is_quantized", None)
    model.__dict__["is_quantized"] = False
    # Parameters and saved buffers take ``dtype``; buffers a module recomputes (rotary frequencies) stay as
    # from_pretrained(..., dtype=dtype) builds them, so the saved model reloads to the same outputs.
    saved = [
        buffer
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and name not in module._non_persistent_buffers_set
    ]
    with torch.no_grad():
        for tensor in [*model.parameters(), *saved]:
            if tensor.dtype.is_floating_point and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)
    if config is not None:
        config.dtype = dtype
