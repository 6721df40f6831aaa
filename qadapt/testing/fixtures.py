"""Small CPU layers, inputs and plugin builders the contract checks share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from qadapt import registry
from qadapt.protocols import Backend, Method


def _build(family: str, plugin: Any, options: Any) -> Any:
    """An instance from an instance, a class or a registered name; options invalid -> AssertionError."""
    base = Backend if family == "backends" else Method
    if isinstance(plugin, base):
        return plugin
    cls = plugin if isinstance(plugin, type) else registry.load(family, plugin)
    try:
        return cls(options)
    except ValidationError as exc:
        given = "the options passed to the suite" if options is not None else "its Options model's defaults"
        raise AssertionError(
            f"options: {cls.__name__} cannot be built from {given} ({exc.error_count()} problem(s): "
            f"{'; '.join(_issue(e) for e in exc.errors())}). Give every option a valid default (backend='auto' "
            "builds backends with their defaults) or pass options={...} to the suite"
        ) from None


def _issue(error: Mapping[str, Any]) -> str:
    location = ".".join(str(part) for part in error.get("loc", ())) or "(model)"
    return f"{location}: {error.get('msg', '')}"


def _backend(backend: Backend | str | type, options: Any = None) -> Backend:
    return _build("backends", backend, options)


def _method(method: Method | str | type, options: Any = None) -> Method:
    return _build("methods", method, options)


def _plain_tensors(tensors: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    """``tensors`` with wrapper subclasses (torchao's quantized tensors) replaced by their inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for tensor in tensors:
        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            yield from _plain_tensors(getattr(tensor, name) for name in names)
        else:
            yield tensor


def _shares_memory(out: torch.Tensor, tensors: Iterable[torch.Tensor]) -> bool:
    """True when ``out``'s memory overlaps any of ``tensors``' (views and aliases included)."""
    start = out.untyped_storage().data_ptr()
    stop = start + out.untyped_storage().nbytes()
    for tensor in _plain_tensors(tensors):
        other = tensor.untyped_storage()
        if other.nbytes() and start < other.data_ptr() + other.nbytes() and other.data_ptr() < stop:
            return True
    return False


def _float_linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.1)
    return linear


def _input(in_features: int, seed: int, batch: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    return torch.randn(*batch, in_features, generator=torch.Generator().manual_seed(seed + 1))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = torch.linalg.vector_norm(b.float())
    return float(torch.linalg.vector_norm((a - b).float()) / denominator) if denominator > 0 else float(a.abs().max())


def _quantized(backend: Backend, in_features: int, out_features: int, seed: int) -> tuple[nn.Linear, nn.Module]:
    linear = _float_linear(in_features, out_features, seed)
    reference = _float_linear(in_features, out_features, seed)  # quantize() may consume its input
    return reference, backend.quantize(linear)


# ------------------------------------------------------------------- backend checks
# Every backend check takes the backend (instance, class or registered name) and, as keywords,
# ``options`` (used when it is a name or class), ``in_features``, ``out_features`` and ``seed``.
