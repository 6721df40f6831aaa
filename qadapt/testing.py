"""The plugin contract suite: conformance checks a plugin author runs against their own plugin.

Each check is a plain function that takes the plugin (an instance, or a registered name) and
raises ``AssertionError`` with a message naming the contract rule it broke. Run them from pytest::

    import pytest
    from qadapt.testing import backend_checks, method_checks

    @pytest.mark.parametrize("check", backend_checks(), ids=lambda c: c.__name__)
    def test_my_backend(check):
        check(MyBackend())

    @pytest.mark.parametrize("check", method_checks(), ids=lambda c: c.__name__)
    def test_my_method(check):
        check(MyMethod())

or all at once with :func:`check_backend` / :func:`check_method`, which collect every failure.
Checks run on small CPU layers (``64 -> 48`` by default); pass ``in_features`` / ``out_features``
where a plugin needs other sizes (a block size that must divide them, say).
"""

from __future__ import annotations

import inspect
import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from qadapt import registry
from qadapt.errors import ConfigError
from qadapt.layer import QuantAdapterLinear
from qadapt.protocols import Backend, CalibrationStats, Method, QuantizedWeight
from qadapt.reference import float_base_layer

BackendCheck = Callable[..., None]
MethodCheck = Callable[..., None]


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
    """bfloat16 and float16 inputs give finite outputs close to the float32 one."""
    backend = _backend(backend, options)
    _, module = _quantized(backend, in_features, out_features, seed)
    x = _input(in_features, seed)
    with torch.no_grad():
        expected = backend.forward(module, x).float()
        for dtype in (torch.bfloat16, torch.float16):
            out = backend.forward(module, x.to(dtype)).float()
            assert bool(torch.isfinite(out).all()), f"{dtype} input gives non-finite output"
            error = _relative(out, expected)
            assert error < 0.05, f"{dtype} input differs from float32 by {error:.3f}"


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
    _, module = _quantized(backend, in_features, out_features, seed)
    storage = backend.get_storage(module)
    before = storage.clone()
    weight = backend.dequantize(storage)
    layout = backend.group_layout(storage)
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
    fixed = {name: t.detach().clone() for name, t in backend.dtype_fixed_tensors(layer.base).items()}
    for cast, apply in _CASTS.items():
        apply(layer)
        now = backend.dtype_fixed_tensors(layer.base)
        for name, before in fixed.items():
            after = now[name]
            same = after.dtype == before.dtype and torch.equal(
                after.detach().reshape(-1).view(torch.uint8), before.reshape(-1).view(torch.uint8)
            )
            assert same, f"{cast} changed the format tensor {name!r} ({before.dtype} -> {after.dtype})"
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


def backend_checks() -> list[BackendCheck]:
    """Every backend check, for ``pytest.mark.parametrize``."""
    return [
        check_quantize_gives_an_owned_module,
        check_check_layer_agrees_with_quantize,
        check_dequantize_shape_dtype_and_accuracy,
        check_forward_matches_dequantized_weight,
        check_forward_output_is_fresh_and_storage_untouched,
        check_requantize_round_trip,
        check_requantize_follows_like_not_options,
        check_set_storage_swaps_and_snapshot_restores_bits,
        check_state_dict_round_trip,
        check_gradient_reaches_input,
        check_low_precision_inputs,
        check_keep_state_requantize,
        check_group_scales,
        check_calibrated_requantize,
        check_casts_keep_the_format,
        check_checkpoint_round_trip,
    ]


# -------------------------------------------------------------------- method checks
# Every method check takes the method (instance, class or registered name) and, as keywords,
# ``options``, ``backend`` (default "none"), ``in_features``, ``out_features`` and ``seed``.


def _perturbed_layer(
    method: Method, backend: str | Backend, in_features: int, out_features: int, seed: int
) -> QuantAdapterLinear:
    layer = QuantAdapterLinear(_float_linear(in_features, out_features, seed), method, backend)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for param in layer.adapters.parameters():
            if param.dtype.is_floating_point:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return layer


def check_adapter_is_trainable_and_alone(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """The adapter has trainable parameters, they get gradients through autograd, and the base gets none."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed)
    params = [p for p in layer.adapters.parameters() if p.requires_grad]
    assert params, "the adapter has no trainable parameter"
    layer.train()
    out = layer(_input(in_features, seed))
    assert out.requires_grad, (
        "the adapted output does not require grad: the adapter's contribution is computed outside autograd "
        "(under torch.no_grad, or from detached tensors), so training cannot move it"
    )
    out.square().mean().backward()
    assert all(p.grad is not None for p in params), "an adapter parameter got no gradient"
    assert all(not p.requires_grad for p in layer.base.parameters()), "a base parameter is trainable"


def check_training_step_moves_the_output(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """Some adapter gradient is non-zero, and one gradient step on the trainable parameters moves the output
    (catches trainable state kept in buffers or plain attributes, which an optimizer never sees)."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed).train()
    params = [p for p in layer.adapters.parameters() if p.requires_grad]
    x = _input(in_features, seed)
    target = torch.randn(*x.shape[:-1], out_features, generator=torch.Generator().manual_seed(seed + 3))
    out = layer(x)
    if not out.requires_grad:
        raise AssertionError("the adapted output does not require grad (see check_adapter_is_trainable_and_alone)")
    (out - target).square().mean().backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert any(bool(g.abs().sum() > 0) for g in grads), (
        "every adapter gradient is zero: the output does not depend on the trainable parameters"
    )
    with torch.no_grad():
        before = layer.eval()(x)
        for p in params:
            if p.grad is not None:
                p.sub_(p.grad / p.grad.norm().clamp_min(1e-12) * (p.norm() + 1e-3) * 1e-2)
        after = layer(x)
    assert _relative(after, before) > 1e-7, (
        "a gradient step on the adapter's parameters does not move the output: the state the forward uses is "
        "not (only) in nn.Parameters (a buffer or plain tensor attribute is never updated by an optimizer)"
    )


def check_merge_weight_matches_forward(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-4,
) -> None:
    """``merge_weight(W)`` is float32 ``[out, in]``, and a plain linear on it gives the adapted forward (eval)."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed).eval()
    name = layer.active_adapter
    x = _input(in_features, seed)
    with torch.no_grad():
        weight = layer.backend.dequantize_module(layer.base)
        kept = weight.clone()
        merged = layer.methods[name].merge_weight(layer.adapters[name], weight)
        assert torch.equal(weight, kept), "merge_weight() modified its input"
        assert merged.shape == weight.shape, f"merge_weight() shape {tuple(merged.shape)}"
        assert merged.dtype == torch.float32, (
            f"merge_weight() returned {merged.dtype}; the contract is float32 [out, in] (compute the merged weight "
            "in float32, whatever the adapter's dtype)"
        )
        bias = layer.base.bias
        expected = layer.methods[name].forward(layer.adapters[name], x, float_base_layer(weight, bias))
        error = _relative(F.linear(x, merged, bias), expected)
    assert error <= tolerance, f"linear(merge_weight(W)) differs from the adapted forward by {error:.2e}"


def check_unmerge_weight_inverts_merge_weight(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-4,
) -> None:
    """``unmerge_weight(merge_weight(W)) ~ W``, float32, and neither writes into its input."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed)
    name = layer.active_adapter
    with torch.no_grad():
        weight = layer.backend.dequantize_module(layer.base)
        merged = layer.methods[name].merge_weight(layer.adapters[name], weight)
        kept = merged.clone()
        restored = layer.methods[name].unmerge_weight(layer.adapters[name], merged)
    assert torch.equal(merged, kept), "unmerge_weight() modified its input"
    assert restored.dtype == torch.float32, f"unmerge_weight() returned {restored.dtype}; the contract is float32"
    error = _relative(restored, weight)
    assert error <= tolerance, f"unmerge_weight(merge_weight(W)) differs from W by {error:.2e}"


def check_merge_protocol_through_layer(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """Through ``QuantAdapterLinear``: merge keeps the output, exact unmerge restores the bits."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed).eval()
    x = _input(in_features, seed)
    before = layer.backend.snapshot(layer.base)
    with torch.no_grad():
        unmerged = layer(x)
        result = layer.merge()
        merged = layer(x)
    error = _relative(merged, unmerged)
    assert error <= 3 * result.error + 1e-4, f"merged output differs by {error:.2e} (merge error {result.error:.2e})"
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before), "exact unmerge is not bit-identical"


def check_row_merger_matches_merge_weight(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
    tolerance: float = 1e-5,
) -> None:
    """A ``row_merger`` (optional) gives ``merge_weight``'s rows, block by uneven block, float32."""
    layer = _perturbed_layer(_method(method, options), backend, in_features, out_features, seed)
    name = layer.active_adapter
    method_obj, adapter = layer.methods[name], layer.adapters[name]
    with torch.no_grad():
        merge_rows = method_obj.row_merger(adapter)
        if merge_rows is None:
            return
        weight = layer.backend.dequantize_module(layer.base)
        expected = method_obj.merge_weight(adapter, weight)
        bounds = [0, 1, out_features // 3, out_features - 1, out_features]  # blocks of 1, a few, the rest
        parts = []
        for start, stop in itertools.pairwise(bounds):
            rows = weight[start:stop].clone()
            part = merge_rows(rows, slice(start, stop))
            assert torch.equal(rows, weight[start:stop]), "row_merger's function modified its input rows"
            assert part.dtype == torch.float32 and part.shape == rows.shape, (
                f"row_merger's function returned {part.dtype} {tuple(part.shape)} for rows {start}..{stop}; "
                f"the contract is float32 {tuple(rows.shape)}"
            )
            parts.append(part)
    error = _relative(torch.cat(parts), expected)
    assert error <= tolerance, f"row_merger's rows differ from merge_weight's by {error:.2e}"


def check_check_layer_agrees_with_create_adapter(
    method: Method | str,
    *,
    options: Any = None,
    backend: str | Backend = "none",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> None:
    """``check_layer`` refuses a shape only with a ConfigError, and every shape it accepts gets an adapter.

    Shapes the backend's own ``check_layer`` refuses (a group size that does not divide them, say)
    are skipped: the method is not at fault there.
    """
    method = _method(method, options)
    backend = _backend(backend)
    for in_f, out_f in _shapes(in_features, out_features):
        if _check_layer_refusal(method, in_f, out_f):
            continue
        try:
            backend.check_layer(in_f, out_f)
        except ConfigError:
            continue
        try:
            QuantAdapterLinear(_float_linear(in_f, out_f, seed), method, backend)
        except Exception as exc:
            raise AssertionError(
                f"check_layer({in_f}, {out_f}) accepted the shape but building the adapted layer raised "
                f"{type(exc).__name__}: {exc}"
            ) from None


def method_checks() -> list[MethodCheck]:
    """Every method check, for ``pytest.mark.parametrize``."""
    return [
        check_check_layer_agrees_with_create_adapter,
        check_adapter_is_trainable_and_alone,
        check_training_step_moves_the_output,
        check_merge_weight_matches_forward,
        check_unmerge_weight_inverts_merge_weight,
        check_merge_protocol_through_layer,
        check_row_merger_matches_merge_weight,
    ]


# -------------------------------------------------------------------------- runners


def _run(checks: list[Callable[..., None]], plugin: Any, **kwargs: Any) -> None:
    """Run ``checks``, each with the keywords it takes; collect every failure, naming its check.

    An exception other than ``AssertionError`` is reported as a failure of that check (with its
    type), so one broken rule never hides the others.
    """
    failures = []
    for check in checks:
        accepted = inspect.signature(check).parameters
        try:
            check(plugin, **{k: v for k, v in kwargs.items() if k in accepted})
        except AssertionError as exc:
            failures.append(f"{check.__name__}: {exc}")
        except Exception as exc:
            failures.append(f"{check.__name__}: raised {type(exc).__name__}: {exc}")
    if failures:
        raise AssertionError("plugin contract broken:\n  " + "\n  ".join(failures))


def check_backend(backend: Backend | str | type, **kwargs: Any) -> None:
    """Run every backend check; raise one ``AssertionError`` listing all failures.

    Keywords: ``options`` (for a name or class), ``other_options`` (a second, format-changing option
    set for :func:`check_requantize_follows_like_not_options`), ``in_features``, ``out_features``, ``seed``.
    """
    _run(backend_checks(), _backend(backend, kwargs.pop("options", None)), **kwargs)


def check_method(method: Method | str | type, **kwargs: Any) -> None:
    """Run every method check (on ``backend="none"`` unless given); one ``AssertionError`` lists all failures.

    Keywords: ``options`` (for a name or class), ``backend``, ``in_features``, ``out_features``, ``seed``.
    """
    _run(method_checks(), _method(method, kwargs.pop("options", None)), **kwargs)
