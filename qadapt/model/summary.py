"""``qadapt.summary``: layers, adapters, parameters and bytes of a wrapped model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from qadapt.model.layers import adapter_layers, list_adapters


@dataclass(frozen=True)
class WrapSummary:
    """Figures of a wrapped model, as returned by :func:`summary`.

    Counted the same whatever a backend stores its codes in (parameters, buffers, or plain
    attributes): each wrapped layer's weight counts as the ``out x in`` weights it represents
    (not as packed codes), and bytes count every tensor the model holds once. A base layer's
    ``bias`` counts even where the layer keeps it as a plain tensor attribute.
    """

    layers: int
    adapters: list[str]
    backends: dict[str, int]
    merged_layers: int
    #: parameters that train (the adapters').
    trainable_params: int
    #: every parameter outside the wrapped layers' quantized storage, plus ``out x in`` per wrapped layer.
    total_params: int
    #: bytes of the wrapped layers' quantized weight storage (codes, scales, ...).
    quantized_bytes: int
    #: bytes of every tensor the model holds (parameters, buffers, quantized storage), each once.
    total_bytes: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        backends = ", ".join(f"{name} x{count}" for name, count in sorted(self.backends.items()))
        return "\n".join(
            [
                f"layers wrapped:   {self.layers} ({backends})",
                f"adapters:         {', '.join(self.adapters) or '(none)'}",
                f"merged layers:    {self.merged_layers}",
                f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({share:.3f}%)",
                f"quantized weights: {self.quantized_bytes:,} bytes",
                f"model tensors:    {self.total_bytes:,} bytes",
            ]
        )


def _memory_key(tensor: torch.Tensor) -> tuple[str, int, int]:
    """Identifies the memory a tensor uses (views and aliases of one storage share the key)."""
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr(), storage.nbytes())


def _plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that hold ``tensor``'s memory: itself, or a wrapper subclass's inner tensors.

    A wrapper subclass (a quantized weight held as a parameter, say) has no storage of its own:
    asking for its data pointer raises.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    inner = (getattr(tensor, name) for name in names)
    return [t for part in inner if part is not None for t in _plain(part)]


def summary(model: nn.Module) -> WrapSummary:
    """Layers wrapped, adapters, trainable / total parameters, bytes of quantized weights and of the model.

    See :class:`WrapSummary` for how parameters and bytes are counted.
    """
    layers = list(adapter_layers(model))
    storage_tensors = [
        plain
        for _, layer in layers
        for t in layer.backend.get_storage(layer.base).tensors.values()
        for plain in _plain(t)
    ]
    in_storage = {_memory_key(t) for t in storage_tensors if not t.is_meta}
    params = list({id(p): p for p in model.parameters()}.values())
    outside = [p for p in params if p.is_meta or any(_memory_key(t) not in in_storage for t in _plain(p))]
    # A base layer may keep its bias as a plain tensor attribute, neither parameter nor buffer.
    held = {_memory_key(t) for p in [*params, *model.buffers()] if not p.is_meta for t in _plain(p)} | in_storage
    loose_biases = list(
        {
            id(bias): bias
            for _, layer in layers
            if isinstance(bias := getattr(layer.base, "bias", None), torch.Tensor)
            and not bias.is_meta
            and all(_memory_key(t) not in held for t in _plain(bias))
        }.values()
    )
    outside += loose_biases
    represented = sum(layer.in_features * layer.out_features for _, layer in layers)
    unique: dict[tuple[str, int, int], int] = {}
    for tensor in [*params, *model.buffers(), *storage_tensors, *loose_biases]:
        for plain in [] if tensor.is_meta else _plain(tensor):
            unique[_memory_key(plain)] = plain.untyped_storage().nbytes()
    backends = Counter(layer.backend.name or type(layer.backend).__name__ for _, layer in layers)
    return WrapSummary(
        layers=len(layers),
        adapters=list_adapters(model),
        backends=dict(backends),
        merged_layers=sum(layer.merged for _, layer in layers),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in outside) + represented,
        quantized_bytes=sum(layer.backend.get_storage(layer.base).nbytes for _, layer in layers),
        total_bytes=sum(unique.values()),
    )


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's familiar line (trainable / all parameters / share), counting each quantized layer as
    the ``out x in`` weights it represents (PEFT counts packed 4-bit codes, which halves the total)."""
    info = summary(model)
    share = 100.0 * info.trainable_params / max(info.total_params, 1)
    print(
        f"trainable params: {info.trainable_params:,} || all params: {info.total_params:,} || trainable%: {share:.4f}"
    )
