"""``qadapt.merged_weights``: the model's weights with the adapters folded in, without merging anything.

For inference engines that take weights (an RL trainer syncing its policy into vLLM every step):
every tensor of the model as the unwrapped float model would hold it, one at a time, under the
unwrapped model's state-dict names. A wrapped layer's ``weight`` is the weight it computes with
now: the exact float merge ``method.merge_weight(adapter, dequantize(storage))`` (no requantize),
for a merge-aware layer the dequantized storage its merge would write, for a merged layer or one
with adapters disabled its dequantized storage. Nothing in the model changes, and only one layer's
float weight is alive at a time (plus the tensor handed out).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from qadapt.errors import CapabilityError, ConfigError
from qadapt.merging.aware import aware_storage
from qadapt.merging.engine import float_merged_weight, merged_bias
from qadapt.model import distributed
from qadapt.model.layer import QuantAdapterLinear
from qadapt.model.targeting import canonical_names


def _layer_tensors(layer: QuantAdapterLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias [out] or None)`` float32 of what ``layer`` computes now."""
    backend, storage, bias = layer.backend, layer.backend.get_storage(layer.base), layer.bias_tensor
    name = layer.active_adapter
    if layer.merged or not layer.adapters_enabled or name is None:
        return backend.dequantize(storage).float(), None if bias is None else bias.detach().float()
    method, adapter = layer.methods[name], layer.adapters[name]
    if layer.merge_aware:
        weight = backend.dequantize(aware_storage(backend, method, adapter, storage)[0]).float()
    else:
        weight = float_merged_weight(backend, method, adapter, storage)[1]
    new_bias = merged_bias(method, adapter, bias, name=name, safe=False)
    if new_bias is None and bias is not None:
        new_bias = bias.detach().float()
    if new_bias is not None and layer.merge_aware:
        new_bias = new_bias.to(bias.dtype).float()  # the merged layer holds its bias in the base's dtype
    return weight, new_bias


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A detached ``tensor`` in ``dtype`` (floating tensors only; None keeps the dtype)."""
    tensor = tensor.detach()
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _check(model: nn.Module, dtype: torch.dtype | None) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    if distributed.any_sharded(model):
        raise CapabilityError(
            "merged_weights() needs whole layers, and this model holds sharded ones (FSDP2 / DTensor): "
            "gather the model first (docs/training.md)"
        )


def merged_weights(
    model: nn.Module, dtype: torch.dtype | None = torch.bfloat16, *, adapted_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the unwrapped float model, adapters folded in.

    Names are the model's state-dict names after ``unwrap(model, merge="float")``, wrapper segments
    (``_orig_mod``, DDP's ``module``) removed: what a transformers checkpoint and an inference
    engine's ``load_weights`` use. A wrapped layer gives ``<layer>.weight`` (``[out, in]``) and, when
    it has one, ``<layer>.bias`` (changed where the method merges into it); every other parameter and
    persistent buffer comes as it is. Floating tensors are cast to ``dtype`` (None: float32 for the
    wrapped layers' weights, the rest as they are). With ``adapted_only``, only the wrapped layers'
    tensors.

    A generator: each layer's float weight is computed when it is reached, so the caller holds one
    layer at a time. The model is read, never written.

    Raises:
        ConfigError: a bad ``dtype``. CapabilityError: sharded layers.
    """
    _check(model, dtype)
    return _sweep(model, dtype, adapted_only)


@torch.no_grad()
def _sweep(model: nn.Module, dtype: torch.dtype | None, adapted_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    canonical = canonical_names(model)
    skipped: list[str] = []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skipped):
            continue
        prefix = canonical.get(name, name)
        prefix = prefix + "." if prefix else ""
        if isinstance(module, QuantAdapterLinear):
            skipped.append(name)
            weight, bias = _layer_tensors(module)
            yield prefix + "weight", _cast(weight, dtype)
            del weight
            if bias is not None:
                yield prefix + "bias", _cast(bias, dtype)
            continue
        if adapted_only:
            continue
        for key, param in module._parameters.items():
            if param is not None:
                yield prefix + key, _cast(param, dtype)
        for key, buffer in module._buffers.items():
            if buffer is not None and key not in module._non_persistent_buffers_set:
                yield prefix + key, _cast(buffer, dtype)
