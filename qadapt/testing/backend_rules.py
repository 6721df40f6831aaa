"""The backend contract: one check per rule a backend plugin must keep."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.errors import CheckpointError, ConfigError
from qadapt.model.layer import QuantAdapterLinear
from qadapt.protocols import Backend, CalibrationStats, Method, QuantizedWeight
from qadapt.testing.fixtures import (
    _backend,
    _float_linear,
    _input,
    _plain_tensors,
    _quantized,
    _relative,
    _shares_memory,
)

BackendCheck = Callable[..., None]


def check_quantize_gives_an_owned_module(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """``quantize`` returns a module that ``owns`` accepts, with the right ``features``."""
    backend = _backend(backend, options)
    _, module = _quantized(backend, in_features, out_features, seed)
    assert backend.owns(module), "owns() must be True for a module returned by quantize()"
    assert not backend.owns(nn.Conv1d(4, 4, 1)), "owns() must be False for a non-linear module"
    features = backend.features(module)
    assert tuple(features) == (in_features, out_features), f"features() gave {features}"


def check_dequantize_shape_dtype_and_accuracy(
    backend: Backend | str,
    *,
    options: Any = None,
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    max_relative_error: float = 0.25,
) -> None:
    """``dequantize`` gives a finite float32 ``[out, in]`` weight close to the original."""
    backend = _backend(backend, options)
    reference, module = _quantized(backend, in_features, out_features, seed)
    weight = backend.dequantize(backend.get_storage(module))
    assert weight.shape == (out_features, in_features), f"dequantize() shape {tuple(weight.shape)}"
    assert weight.dtype == torch.float32, f"dequantize() must return float32, got {weight.dtype}"
    assert bool(torch.isfinite(weight).all()), "dequantize() returned non-finite values"
    error = _relative(weight, reference.weight.detach())
    assert error <= max_relative_error, f"quantization error {error:.4f} above {max_relative_error}"


def check_forward_matches_dequantized_weight(
    backend: Backend | str,
    *,
    options: Any = None,
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-3,
) -> None:
    """``forward`` equals a float linear on the dequantized weight (same bias), shape ``[..., out]``."""
    backend = _backend(backend, options)
    reference, module = _quantized(backend, in_features, out_features, seed)
    x = _input(in_features, seed)
    with torch.no_grad():
        out = backend.forward(module, x)
        expected = F.linear(x, backend.dequantize_module(module), reference.bias)
    assert out.shape == (*x.shape[:-1], out_features), f"forward() shape {tuple(out.shape)}"
    error = _relative(out, expected)
    assert error <= tolerance, f"forward() differs from the dequantized reference by {error:.2e}"


def check_forward_output_is_fresh_and_storage_untouched(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """The output shares no memory with the layer; writing into it does not change the next one;
    forward leaves storage as it was."""
    backend = _backend(backend, options)
    _, module = _quantized(backend, in_features, out_features, seed)
    before = backend.snapshot(module)
    x = _input(in_features, seed)
    with torch.no_grad():
        first = backend.forward(module, x)
        held = [*backend.get_storage(module).tensors.values(), *module.parameters(), *module.buffers(), x]
        assert not _shares_memory(first, held), (
            "forward() returned a tensor that shares memory with the layer's storage, parameters or input "
            "(a view or alias); it must return a fresh tensor the caller may modify"
        )
        expected = first.clone()
        first.add_(1.0)
        second = backend.forward(module, x)
    assert torch.equal(second, expected), "writing into a forward() output changed a later output"
    assert torch.equal(first, expected + 1.0), "a later forward() call overwrote an earlier output"
    assert backend.get_storage(module).equal(before), "forward() modified the quantized storage"


def check_forward_storage_matches_a_swap(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """``forward_storage(module, s, x)`` equals ``forward`` after ``set_storage(module, s)``, bit for bit,
    and leaves the module's storage as it was (merge-aware layers rely on both). Skipped without requantize."""
    backend = _backend(backend, options)
    if not backend.capabilities.requantize:
        return
    _, module = _quantized(backend, in_features, out_features, seed)
    before = backend.snapshot(module)
    other = backend.requantize(backend.dequantize(before) * 0.75 + 0.01, like=before)
    x = _input(in_features, seed)
    with torch.no_grad():
        through = backend.forward_storage(module, other, x)
        assert backend.get_storage(module).equal(before), "forward_storage() left the module holding other storage"
        backend.set_storage(module, other)
        swapped = backend.forward(module, x)
        backend.restore(module, before)
    assert torch.equal(through, swapped), (
        f"forward_storage() differs from forward() after set_storage() by {_relative(through, swapped):.3g} "
        "(relative); a merge-aware layer would not compute what its merge stores"
    )


def check_requantize_round_trip(
    backend: Backend | str,
    *,
    options: Any = None,
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    max_relative_error: float = 0.05,
) -> None:
    """Requantizing a dequantized weight reproduces it closely and never writes into ``like``."""
    backend = _backend(backend, options)
    _, module = _quantized(backend, in_features, out_features, seed)
    storage = backend.get_storage(module)
    before = storage.clone()
    weight = backend.dequantize(storage)
    backend.requantize(weight * 0.5 + 0.01, like=storage)
    assert storage.equal(before), "requantize() modified the storage passed as `like`"
    again = backend.requantize(weight, like=before)
    error = _relative(backend.dequantize(again), weight)
    assert error <= max_relative_error, f"dequantize -> requantize -> dequantize drifts by {error:.4f}"


def check_requantize_follows_like_not_options(
    backend: Backend | str,
    *,
    options: Any = None,
    other_options: Any = None,
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """``requantize`` takes its settings from ``like``: an instance with other options (``other_options``,
    default: the Options defaults) requantizes into exactly the same storage.

    Pass ``other_options`` that change the format (another bit width, block or group size) for this
    check to compare anything.
    """
    backend = _backend(backend, options)
    other = _backend(type(backend), other_options)
    _, module = _quantized(backend, in_features, out_features, seed)
    like = backend.get_storage(module)
    weight = backend.dequantize(like) * 0.9 + 0.01
    mine, theirs = backend.requantize(weight, like=like), other.requantize(weight, like=like)
    assert mine.equal(theirs), (
        f"requantize() depends on the instance's options, not only on `like`: options {backend.describe()} and "
        f"{other.describe()} gave different storage for the same weight and `like` (read the format from like.meta)"
    )


def check_set_storage_swaps_and_snapshot_restores_bits(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """``set_storage`` makes a new storage current without writing into the old one; ``restore(snapshot)``
    brings back identical bits."""
    backend = _backend(backend, options)
    _, module = _quantized(backend, in_features, out_features, seed)
    snapshot = backend.snapshot(module)
    storage = backend.get_storage(module)
    held = storage.clone()
    changed = backend.requantize(backend.dequantize(storage) * 1.5 + 0.01, like=storage)
    backend.set_storage(module, changed)
    assert storage.equal(held), (
        "set_storage() wrote into the storage it replaced (a reference to the old storage now holds the new "
        "bits); it must swap the tensors in, not copy into the old ones"
    )
    assert backend.get_storage(module).equal(changed), "get_storage() after set_storage() differs"
    assert snapshot.equal(backend.snapshot(module)) is False, "set_storage() had no effect"
    x = _input(in_features, seed)
    with torch.no_grad():
        out_changed = backend.forward(module, x)
    backend.restore(module, snapshot)
    assert backend.get_storage(module).equal(snapshot), "restore() is not bit-identical"
    with torch.no_grad():
        assert not torch.equal(backend.forward(module, x), out_changed), "forward() ignores restored storage"


def check_state_dict_round_trip(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """Storage from ``quantize`` and from ``requantize`` takes its own values back the way
    ``load_state_dict`` writes them (an in-place copy under no_grad), and the forward is unchanged:
    no inference tensors, no read-only or expanded storage.

    (Loading a state dict into a whole quantized module is the quantization library's business:
    bitsandbytes' int8 layer refuses it on CPU.)
    """
    backend = _backend(backend, options)
    _, fresh = _quantized(backend, in_features, out_features, seed)
    _, swapped = _quantized(backend, in_features, out_features, seed)
    storage = backend.get_storage(swapped)
    backend.set_storage(swapped, backend.requantize(backend.dequantize(storage) * 0.5, like=storage))
    x = _input(in_features, seed)
    for label, module in (("quantize()", fresh), ("requantize() + set_storage()", swapped)):
        tensors = backend.get_storage(module).tensors
        inference = [name for name, t in tensors.items() if t.is_inference()]
        assert not inference, (
            f"storage from {label} holds inference tensors {inference} (made under torch.inference_mode); "
            "load_state_dict cannot write into them: create storage outside inference mode"
        )
        with torch.no_grad():
            expected = backend.forward(module, x)
            for name, tensor in tensors.items():
                try:
                    tensor.copy_(tensor.clone())
                except RuntimeError as exc:
                    raise AssertionError(
                        f"storage tensor {name!r} from {label} cannot be written as load_state_dict does: {exc}"
                    ) from None
            error = _relative(backend.forward(module, x), expected)
        assert error <= 1e-6, f"after a state_dict round trip the forward (module from {label}) differs by {error:.2e}"


def check_gradient_reaches_input(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """When ``capabilities.train_forward``, gradients flow through forward to the input only."""
    backend = _backend(backend, options)
    if not backend.capabilities.train_forward:
        return
    _, module = _quantized(backend, in_features, out_features, seed)
    x = _input(in_features, seed).requires_grad_()
    out = backend.forward(module, x)
    grad = torch.autograd.grad(out.square().sum(), x, allow_unused=True)[0] if out.requires_grad else None
    assert grad is not None, (
        "forward() output does not depend on the input through autograd (input detached, or computed under "
        "no_grad) although capabilities.train_forward is True; adapters before this layer could not train"
    )
    assert bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0), (
        "no finite, non-zero gradient reached the input"
    )


def check_low_precision_inputs(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """bfloat16 and float16 inputs give finite outputs close to the float32 one, and leave every tensor
    of the module (storage, bias) as it was: a forward in another dtype must not cast them in place
    (bitsandbytes' int8 forward rounded a float32 bias to the input's float16 for good)."""
    backend = _backend(backend, options)
    _, module = _quantized(backend, in_features, out_features, seed)
    x = _input(in_features, seed)
    with torch.no_grad():
        expected = backend.forward(module, x).float()
        storage = backend.get_storage(module).clone()
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach().clone()
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            out = backend.forward(module, x.to(dtype)).float()
            assert bool(torch.isfinite(out).all()), f"{dtype} input gives non-finite output"
            if dtype != torch.float64:
                error = _relative(out, expected)
                assert error < 0.05, f"{dtype} input differs from float32 by {error:.3f}"
            assert backend.get_storage(module).equal(storage), f"a {dtype} forward changed the layer's storage"
            now = getattr(module, "bias", None)
            assert (bias is None) == (now is None), f"a {dtype} forward added or removed the bias"
            if bias is not None:
                assert now.dtype == bias.dtype and torch.equal(now, bias), (
                    f"a {dtype} forward changed the layer's bias in place ({bias.dtype} -> {now.dtype})"
                )


def _shapes(in_features: int, out_features: int) -> list[tuple[int, int]]:
    return list(dict.fromkeys([(in_features, out_features), (out_features, in_features), (24, 8), (7, 5)]))


def _check_layer_refusal(plugin: Any, in_f: int, out_f: int) -> bool:
    """True when ``check_layer`` refuses the shape with a ConfigError; other exceptions fail the rule."""
    try:
        plugin.check_layer(in_f, out_f)
    except ConfigError:
        return True
    except Exception as exc:
        raise AssertionError(
            f"check_layer({in_f}, {out_f}) raised {type(exc).__name__} ({exc}); it must raise "
            "qadapt.errors.ConfigError naming the option, its value and what would fit"
        ) from None
    return False


def check_check_layer_agrees_with_quantize(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """``check_layer`` refuses a shape only with a ConfigError, and every shape it accepts quantizes."""
    backend = _backend(backend, options)
    for in_f, out_f in _shapes(in_features, out_features):
        if _check_layer_refusal(backend, in_f, out_f):
            continue
        try:
            _quantized(backend, in_f, out_f, seed)
        except Exception as exc:
            raise AssertionError(
                f"check_layer({in_f}, {out_f}) accepted the shape but quantize() raised {type(exc).__name__}: {exc}"
            ) from None


def _nudged(weight: torch.Tensor, size: float, seed: int) -> torch.Tensor:
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed + 3))
    return weight + size * weight.std() * noise


def _group_values(backend: Backend, storage: QuantizedWeight) -> torch.Tensor:
    """The per-element group scale ``[out, in]`` of ``storage``."""
    weight_shape = tuple(backend.dequantize(storage).shape)
    return backend.group_layout(storage).expand(backend.get_group_scales(storage), weight_shape)


def check_keep_state_requantize(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """With ``capabilities.keep_state``: the scales stay bit for bit and each code is the nearest one.

    Generic form of "nearest": every requantized value is at least as close to the target as the
    old stored value (which is one of the candidates at the kept scale); a weight already on the
    grid comes back unchanged; with group scales, ``get_group_scales`` is bit-identical.
    """
    backend = _backend(backend, options)
    if not backend.capabilities.keep_state:
        return
    _, module = _quantized(backend, in_features, out_features, seed)
    storage = backend.get_storage(module)
    before = storage.clone()
    weight = backend.dequantize(storage)
    target = _nudged(weight, 0.05, seed)
    new = backend.requantize_keep_state(target, storage)
    assert storage.equal(before), "requantize_keep_state() modified the storage passed as `like`"
    assert new.tensors.keys() == storage.tensors.keys(), "requantize_keep_state() changed the storage's tensors"
    stored = backend.dequantize(new)
    slack = 1e-3 * (_group_values(backend, storage).abs() if backend.capabilities.group_scales else 0.0) + 1e-7
    closer = (stored - target).abs() <= (weight - target).abs() * (1 + 1e-6) + slack
    assert bool(closer.all()), f"{int((~closer).sum())} code(s) are farther from the target than the old ones"
    again = backend.dequantize(backend.requantize_keep_state(weight, storage))
    assert torch.equal(again, weight), "a weight already on the grid does not come back unchanged"
    if backend.capabilities.group_scales:
        kept = backend.get_group_scales(new)
        assert QuantizedWeight({"s": kept}).equal(QuantizedWeight({"s": backend.get_group_scales(storage)})), (
            "requantize_keep_state() changed the group scales"
        )


def _group_case(
    backend: Backend, in_features: int, out_features: int, seed: int
) -> tuple[QuantizedWeight, QuantizedWeight, torch.Tensor, Any]:
    """A quantized layer's storage, a copy of it (to check it is left alone), its weight
    ``[out, in]`` and its group layout: the start of the group-scale and group-offset checks."""
    _, module = _quantized(backend, in_features, out_features, seed)
    storage = backend.get_storage(module)
    return storage, storage.clone(), backend.dequantize(storage), backend.group_layout(storage)


def check_group_scales(
    backend: Backend | str,
    *,
    options: Any = None,
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-2,
) -> None:
    """With ``capabilities.group_scales``: layout and scales agree, the round trip keeps the weight,
    and rescaling one group changes that group (by the factor) and, up to ``tolerance`` (the
    format's rounding of scales, e.g. a nested state), nothing else."""
    backend = _backend(backend, options)
    if not backend.capabilities.group_scales:
        return
    storage, before, weight, layout = _group_case(backend, in_features, out_features, seed)
    scales = backend.get_group_scales(storage)
    assert scales.shape == (layout.num_groups,), f"get_group_scales() shape {tuple(scales.shape)}"
    assert scales.dtype == torch.float32, f"get_group_scales() must return float32, got {scales.dtype}"
    assert layout.group_size * layout.num_groups >= weight.numel() > layout.group_size * (layout.num_groups - 1), (
        f"group layout {layout} does not cover a {tuple(weight.shape)} weight"
    )
    error = _relative(backend.dequantize(backend.with_group_scales(storage, scales)), weight)
    assert error <= tolerance, f"with_group_scales(get_group_scales()) moves the weight by {error:.2e}"
    group = layout.num_groups // 2
    factor = torch.ones(layout.num_groups)
    factor[group] = 2.0
    changed = backend.dequantize(backend.with_group_scales(storage, scales * factor))
    assert storage.equal(before), "with_group_scales() modified its storage"
    inside = layout.expand(factor, tuple(weight.shape)) == 2.0
    error = _relative(changed[inside], 2.0 * weight[inside])
    assert error <= tolerance, f"the rescaled group is off by {error:.2e}"
    error = _relative(changed[~inside], weight[~inside])
    assert error <= tolerance, f"rescaling one group moved the others by {error:.2e}"


def check_group_offsets(
    backend: Backend | str,
    *,
    options: Any = None,
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-5,
) -> None:
    """With ``capabilities.group_offsets``: the offsets are float32 ``[num_groups]``, the round trip keeps the
    weight, and shifting one group's offset by ``δ`` adds ``δ`` to that group's weights and, up to
    ``tolerance`` (the format's rounding of zero points), changes nothing else."""
    backend = _backend(backend, options)
    if not backend.capabilities.group_offsets:
        return
    storage, before, weight, layout = _group_case(backend, in_features, out_features, seed)
    offsets = backend.get_group_offsets(storage)
    assert offsets.shape == (layout.num_groups,), f"get_group_offsets() shape {tuple(offsets.shape)}"
    assert offsets.dtype == torch.float32, f"get_group_offsets() must return float32, got {offsets.dtype}"
    error = _relative(backend.dequantize(backend.with_group_offsets(storage, offsets)), weight)
    assert error <= tolerance, f"with_group_offsets(get_group_offsets()) moves the weight by {error:.2e}"
    group = layout.num_groups // 2
    shift = torch.zeros(layout.num_groups)
    shift[group] = float(weight.abs().max()) * 0.25
    changed = backend.dequantize(backend.with_group_offsets(storage, offsets + shift))
    assert storage.equal(before), "with_group_offsets() modified its storage"
    inside = layout.expand(shift, tuple(weight.shape)) != 0
    error = _relative(changed[inside], weight[inside] + shift[group])
    assert error <= tolerance, f"the shifted group is off by {error:.2e} (a zero point in the wrong group, or scaled)"
    error = _relative(changed[~inside], weight[~inside])
    assert error <= tolerance, f"shifting one group's offset moved the others by {error:.2e}"


def check_calibrated_requantize(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """With ``capabilities.calibrated``: on a random ``H`` (correlated inputs, outlier channels),
    the output error ``tr(E H E^T)`` is not above keep-state's (or fresh's without keep-state),
    and the result has ``like``'s format (same tensors, dtypes, shapes, metadata)."""
    backend = _backend(backend, options)
    if not backend.capabilities.calibrated:
        return
    _, module = _quantized(backend, in_features, out_features, seed)
    storage = backend.get_storage(module)
    before = storage.clone()
    target = _nudged(backend.dequantize(storage), 0.05, seed)
    generator = torch.Generator().manual_seed(seed + 4)
    rows = 8 * in_features
    mix = torch.randn(max(1, in_features // 8), in_features, generator=generator)
    x = torch.randn(rows, mix.shape[0], generator=generator) @ mix
    x += 0.3 * torch.randn(rows, in_features, generator=generator)
    x[:, :2] *= 10
    hessian = x.T @ x
    new = backend.requantize_calibrated(target, storage, CalibrationStats(hessian, rows))
    assert storage.equal(before), "requantize_calibrated() modified the storage passed as `like`"
    assert dict(new.meta) == dict(storage.meta), "requantize_calibrated() changed the format's metadata"
    for key, old in storage.tensors.items():
        assert key in new.tensors, f"requantize_calibrated() dropped tensor {key!r}"
        t = new.tensors[key]
        assert (t.dtype, t.shape) == (old.dtype, old.shape), f"tensor {key!r} changed dtype or shape"
    if backend.capabilities.keep_state:
        reference = backend.requantize_keep_state(target, storage)
    else:
        reference = backend.requantize(target, storage)

    def objective(s: QuantizedWeight) -> float:
        error = (backend.dequantize(s) - target).double()
        return float(((error @ hessian.double()) * error).sum())

    got, baseline = objective(new), objective(reference)
    assert got <= baseline * (1 + 1e-5), f"calibrated objective {got:.4g} is above keep-state's {baseline:.4g}"


class _Passthrough(Method):
    """A method that adds nothing: lets a backend check drive a real :class:`QuantAdapterLinear`."""

    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> nn.Module:
        return nn.Module()

    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: Any) -> torch.Tensor:
        return base_forward(x)

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.clone()

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.clone()


#: The module-level conversions a user or a framework applies to a whole model.
_CASTS: dict[str, Callable[[nn.Module], Any]] = {
    "half()": lambda m: m.half(),
    "bfloat16()": lambda m: m.bfloat16(),
    "double()": lambda m: m.double(),
    "to(float16)": lambda m: m.to(torch.float16),
    "to('cpu', bfloat16)": lambda m: m.to("cpu", torch.bfloat16),
    "type(float16)": lambda m: m.type(torch.float16),
    "float()": lambda m: m.float(),
}


def _inner_copies(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Copies of the plain tensors a (possibly wrapper-subclass) tensor holds."""
    return [t.detach().clone() for t in _plain_tensors([tensor])]


def check_casts_keep_the_format(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """Module-level casts of a wrapped layer keep :meth:`Backend.dtype_fixed_tensors` bit for bit,
    and after casting through every dtype and back to float32 the layer computes what it did
    (up to the float parameters' rounding, e.g. the bias through float16)."""
    backend = _backend(backend, options)
    _, module = _quantized(backend, in_features, out_features, seed)
    layer = QuantAdapterLinear(module, _Passthrough(), backend)
    x = _input(in_features, seed)
    with torch.no_grad():
        expected = layer(x)
    # A tensor subclass (torchao's, optimum-quanto's) is compared by its inner tensors: an op on the
    # wrapper itself may dequantize it (quanto's would build its C++ extension).
    fixed = {name: _inner_copies(t) for name, t in backend.dtype_fixed_tensors(layer.base).items()}
    for cast, apply in _CASTS.items():
        apply(layer)
        now = backend.dtype_fixed_tensors(layer.base)
        for name, before in fixed.items():
            after = _inner_copies(now[name])
            same = len(after) == len(before) and all(
                a.dtype == b.dtype
                and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                for a, b in zip(after, before, strict=False)
            )
            dtypes = f"{[b.dtype for b in before]} -> {[a.dtype for a in after]}"
            assert same, f"{cast} changed the format tensor {name!r} ({dtypes})"
    with torch.no_grad():
        out = layer(x)
    error = _relative(out, expected)
    assert bool(torch.isfinite(out).all()) and error < 1e-2, (
        f"after casting through {', '.join(_CASTS)} the layer's output moved by {error:.2e}: a tensor of the "
        "quantized format was converted by value (declare it in dtype_fixed_tensors)"
    )


def check_checkpoint_round_trip(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """With ``capabilities.checkpoint``: ``from_checkpoint(to_checkpoint(s))`` gives ``s`` back bit for bit,
    ``checkpoint_config`` is JSON, ``storage_options`` re-create the format, ``export_targets`` validate."""
    backend = _backend(backend, options)
    if not backend.capabilities.checkpoint:
        assert not backend.export_targets, "export_targets need capabilities.checkpoint"
        return
    _, module = _quantized(backend, in_features, out_features, seed)
    storage = backend.get_storage(module)
    tensors = backend.to_checkpoint(storage)
    assert tensors and all(isinstance(t, torch.Tensor) for t in tensors.values()), "to_checkpoint() gave no tensors"
    assert "bias" not in tensors, "to_checkpoint() must leave the bias to the caller"
    config = backend.checkpoint_config(storage)
    json.dumps(config)  # raises when the config is not plain JSON
    again = backend.from_checkpoint(dict(tensors), config)
    assert again is not None, "from_checkpoint() does not read what to_checkpoint() wrote"
    assert again.equal(storage), "from_checkpoint(to_checkpoint(storage)) is not bit-identical"
    assert backend.checkpoint_config(again, config) == config, "checkpoint_config() changes when read back"
    options = backend.storage_options(storage)
    fresh = type(backend)(options).quantize(_float_linear(in_features, out_features, seed + 5))
    assert backend.storage_options(backend.get_storage(fresh)) == options, (
        f"quantize() under storage_options() {options} writes another format"
    )
    for target, target_options in backend.export_targets.items():
        type(backend)({**options, **target_options})  # raises when the target's options do not validate
        assert target.isidentifier() or target.replace("-", "_").isidentifier(), f"export target name {target!r}"
    foreign = {"weight": torch.zeros(3, 4, dtype=torch.int16), "unrelated.key": torch.zeros(1)}
    assert backend.from_checkpoint(foreign, None) is None, "from_checkpoint() must return None for a foreign layout"


def _damaged(tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``tensor`` one element short and one element long (flattened), as a damaged file would hold it."""
    flat = tensor.detach().reshape(-1)
    return [("one element short", flat[:-1].clone()), ("one element long", torch.cat([flat, flat[-1:]]))]


def check_checkpoint_refuses_damaged_tensors(
    backend: Backend | str, *, options: Any = None, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> None:
    """With ``capabilities.checkpoint``: ``from_checkpoint`` checks every tensor against the layer's declared
    shape and format before anything is dequantized. Each tensor of ``to_checkpoint`` cut one element short
    or made one longer is refused (a ``CheckpointError``) or left to other backends (None), never read: a
    short scale tensor would make the dequantize kernel read past its end."""
    backend = _backend(backend, options)
    if not backend.capabilities.checkpoint:
        return
    _, module = _quantized(backend, in_features, out_features, seed)
    tensors = backend.to_checkpoint(backend.get_storage(module))
    config = backend.checkpoint_config(backend.get_storage(module))
    for key, tensor in tensors.items():
        if tensor.numel() < 2:
            continue
        for what, damaged in _damaged(tensor):
            try:
                read = backend.from_checkpoint({**tensors, key: damaged}, config)
            except CheckpointError:
                continue
            assert read is None, f"from_checkpoint() read a layer whose {key!r} is {what} instead of refusing it"


def _overrides(backend: Backend, member: str) -> bool:
    return getattr(type(backend), member) is not getattr(Backend, member)


def check_model_files(backend: Backend | str, *, options: Any = None, model_file: Any = None) -> None:
    """With ``capabilities.model_files``: suffixes are declared (lower case, with the dot) and the three members
    implemented; given a ``model_file`` of that format, ``load_model_file`` makes exactly the layers
    ``model_file_layers`` lists into owned modules of those shapes, and ``write_model_file`` writes the file back
    byte for byte when nothing is rewritten and when every layer is rewritten with its own weight (keep-state
    where offered, else ``requantize``). Without the capability, no suffix may be declared."""
    import tempfile
    from pathlib import Path

    backend = _backend(backend, options)
    suffixes = tuple(type(backend).model_file_suffixes)
    if not backend.capabilities.model_files:
        assert not suffixes, "model_file_suffixes need capabilities.model_files"
        return
    assert suffixes, "capabilities.model_files is set but model_file_suffixes is empty"
    for suffix in suffixes:
        assert suffix.startswith(".") and suffix == suffix.lower() and len(suffix) > 1, f"model file suffix {suffix!r}"
    for member in ("load_model_file", "model_file_layers", "write_model_file"):
        assert _overrides(backend, member), f"capabilities.model_files is set but {member}() is not implemented"
    if model_file is None:
        return
    path = Path(model_file)
    original = path.read_bytes()
    layers = backend.model_file_layers(path)
    model = backend.load_model_file(path)
    owned = {name: m for name, m in model.named_modules() if backend.owns(m)}
    assert set(owned) == set(layers), (
        f"load_model_file() owns {sorted(owned)[:3]}..., model_file_layers() lists {sorted(layers)[:3]}..."
    )
    for name, module in owned.items():
        assert tuple(backend.features(module)) == tuple(layers[name]), (
            f"{name}: features differ from model_file_layers()"
        )
    seen: list[str] = []

    def same(name: str, storage: QuantizedWeight, bias: torch.Tensor | None) -> tuple[QuantizedWeight, None]:
        seen.append(name)
        weight = backend.dequantize(storage)
        if backend.capabilities.keep_state:
            return backend.requantize_keep_state(weight, storage), None
        return backend.requantize(weight, like=storage), None

    for label, rewrite in (("nothing rewritten", lambda name, storage, bias: None), ("own weights rewritten", same)):
        with tempfile.TemporaryFile() as handle:
            backend.write_model_file(path, handle, rewrite)
            handle.seek(0)
            written = handle.read()
        assert written == original, f"write_model_file() with {label} does not reproduce the file byte for byte"
    assert sorted(seen) == sorted(layers), "write_model_file() did not offer every layer of model_file_layers()"
    assert path.read_bytes() == original, "the model file changed while it was read"


def backend_checks() -> list[BackendCheck]:
    """Every backend check, for ``pytest.mark.parametrize``."""
    return [
        check_quantize_gives_an_owned_module,
        check_check_layer_agrees_with_quantize,
        check_dequantize_shape_dtype_and_accuracy,
        check_forward_matches_dequantized_weight,
        check_forward_output_is_fresh_and_storage_untouched,
        check_forward_storage_matches_a_swap,
        check_requantize_round_trip,
        check_requantize_follows_like_not_options,
        check_set_storage_swaps_and_snapshot_restores_bits,
        check_state_dict_round_trip,
        check_gradient_reaches_input,
        check_low_precision_inputs,
        check_keep_state_requantize,
        check_group_scales,
        check_group_offsets,
        check_calibrated_requantize,
        check_casts_keep_the_format,
        check_checkpoint_round_trip,
        check_checkpoint_refuses_damaged_tensors,
        check_model_files,
    ]
