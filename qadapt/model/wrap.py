"""``qadapt.model.wrap``: replace a model's target layers by :class:`QuantAdapterLinear`, all or nothing.

Every target is checked first (which backend adapts it, its shape, ``method.check_layer``); only
then are layers quantized and swapped in. If anything fails on the way, the original modules and
``requires_grad`` flags are put back, so a failed wrap leaves the model as it was.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError
from torch import nn

from qadapt import registry
from qadapt.config import AUTO_BACKEND, REGEX_PREFIX, QAdaptConfig, load_config, validate_config
from qadapt.errors import ArgumentTypeError, ConfigError, LayerFitError, PluginError, TargetError
from qadapt.model import integrations
from qadapt.model.layer import QuantAdapterLinear
from qadapt.model.layers import adapter_layers, progress, shared_state
from qadapt.model.targeting import Targets, as_pattern_list, canonical_names, select_targets
from qadapt.model.transaction import Transaction, transaction
from qadapt.protocols import Backend, Method
from qadapt.registry.reference import FloatBackend

ModelT = TypeVar("ModelT", bound=nn.Module)
ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | QAdaptConfig


# ------------------------------------------------------------------------------------ backends


def _installed_backends() -> tuple[list[Backend], list[str]]:
    """One default instance of every installed backend (reference backends last), and load failures."""
    found, failures = [], []
    for name in registry.names("backends"):
        try:
            found.append(registry.backend_class(name)())
        except PluginError as exc:
            failures.append(str(exc))
        except ValidationError as exc:  # its options have no valid defaults: it cannot take part in "auto"
            failures.append(f"backend {name!r} has options without valid defaults ({exc.error_count()} problem(s))")
    found.sort(key=lambda backend: isinstance(backend, FloatBackend))
    return found, failures


@dataclass
class _BackendChoice:
    """How each target's backend is picked: one named backend, or per layer by ownership."""

    fixed: Backend | None
    candidates: list[Backend] = field(default_factory=list)
    load_failures: list[str] = field(default_factory=list)

    def is_linear(self, module: nn.Module) -> bool:
        if isinstance(module, nn.Linear):
            return True
        pool = [self.fixed] if self.fixed is not None else self.candidates
        return any(backend.owns(module) for backend in pool)

    def owner(self, module: nn.Module) -> Backend | None:
        return next((backend for backend in self.candidates if backend.owns(module)), None)

    def pick(self, name: str, module: nn.Module) -> Backend:
        """The backend that adapts ``module``; raises TargetError with the reason when none can."""
        if self.fixed is not None:
            if self.fixed.owns(module) or type(module) is nn.Linear:
                return self.fixed
            owner = self.owner(module) if self.candidates else None
            hint = f"; it belongs to backend {owner.name!r} (or use backend='auto')" if owner else ""
            raise TargetError(
                f"{name}: backend {self.fixed.name!r} cannot adapt a {type(module).__name__}: it takes a float "
                f"nn.Linear or a layer it quantized itself{hint}"
            )
        owner = self.owner(module)
        if owner is None:
            broken = f" (plugins that failed to load: {'; '.join(self.load_failures)})" if self.load_failures else ""
            raise TargetError(f"{name}: no installed backend owns a {type(module).__name__}{broken}")
        return owner


def _backend_choice(backend: Backend | str, options: Mapping[str, Any] | None) -> _BackendChoice:
    if isinstance(backend, Backend):
        return _BackendChoice(backend)
    if backend == AUTO_BACKEND:
        candidates, failures = _installed_backends()
        return _BackendChoice(None, candidates, failures)
    return _BackendChoice(registry.backend_class(backend)(options))


def _explain_with_owner(choice: _BackendChoice) -> _BackendChoice:
    # Only on the error path: which backend would have owned a rejected layer.
    if not choice.candidates:
        choice.candidates, choice.load_failures = _installed_backends()
    return choice


# ------------------------------------------------------------------------------------ the plan


@dataclass
class _Target:
    name: str
    module: nn.Module
    backend: Backend
    in_features: int
    out_features: int
    #: the method instance for this layer (:meth:`Method.for_layer` of its canonical name).
    method: Method


def _features(module: nn.Module, backend: Backend) -> tuple[int, int]:
    if backend.owns(module):
        return backend.features(module)
    return module.in_features, module.out_features


def plan_targets(
    model: nn.Module, method: Method, choice: _BackendChoice, targets: Targets, exclude: Targets | None
) -> list[_Target]:
    """Every target with its backend and shape, checked against the method; nothing is modified.

    Raises:
        TargetError: listing every layer that cannot be adapted, not only the first; a
            :class:`LayerFitError` (also a ConfigError) when a ``check_layer`` refused any.
    """
    found = select_targets(model, targets, exclude, choice.is_linear, lambda m: isinstance(m, QuantAdapterLinear))
    canonical = canonical_names(model)
    plan, problems, config_problems = [], [], 0
    for name, module in found:
        layer_method = method.for_layer(canonical.get(name, name))
        try:
            backend = choice.pick(name, module)
        except TargetError:
            try:
                _explain_with_owner(choice).pick(name, module)
            except TargetError as exc:
                problems.append(str(exc))
            continue
        in_f, out_f = _features(module, backend)
        if in_f <= 0 or out_f <= 0:
            problems.append(f"{name} ({in_f} -> {out_f}): a zero-sized layer has nothing to adapt")
            continue
        # The backend's options matter only for the float layers it will quantize.
        checks = [layer_method.check_layer]
        if not backend.owns(module):
            checks.insert(0, backend.check_layer)
        misfits = []
        for check in checks:
            try:
                check(in_f, out_f)
            except ConfigError as exc:
                misfits.append(f"{name} ({in_f} -> {out_f}): {exc}")
        if misfits:
            problems += misfits
            config_problems += len(misfits)
            continue
        plan.append(_Target(name, module, backend, in_f, out_f, layer_method))
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        # An option that does not fit a layer is a config problem too: catchable as either.
        error = LayerFitError if config_problems else TargetError
        raise error(f"cannot wrap {len(problems)} of {len(found)} target layers:\n  " + "\n  ".join(shown))
    return plan


# ------------------------------------------------------------------------------------ surgery


def freeze_base(model: nn.Module) -> None:
    """Every parameter off except the adapters' (base, bias, embeddings, norms: all frozen)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in adapter_layers(model):
        layer.adapters.requires_grad_(True)


def _regex_text(pattern: Any) -> Any:
    return REGEX_PREFIX + pattern.pattern if isinstance(pattern, re.Pattern) else pattern


def _check_plugin_argument(label: str, value: Any, kind: type, allow_none: bool) -> None:
    if isinstance(value, (str, kind)) or (allow_none and value is None):
        return
    raise ArgumentTypeError(
        f"{label} must be a plugin name (str) or a {kind.__name__} instance, got {type(value).__name__}"
    )


def resolve_wrap_config(
    method: Method | str | None,
    backend: Backend | str,
    targets: Targets | None,
    exclude: Targets | None,
    method_options: Mapping[str, Any] | None,
    backend_options: Mapping[str, Any] | None,
    adapter_name: str,
    config: ConfigSource | None,
    merge_aware: bool = False,
) -> tuple[QAdaptConfig, Method, Backend | str, Targets, Targets | None]:
    """Turn ``wrap``'s arguments (or its ``config``) into a validated config plus ready plugin objects.

    Plugin instances given directly skip the option validation (they are validated already).
    """
    _check_plugin_argument("method", method, Method, allow_none=True)
    _check_plugin_argument("backend", backend, Backend, allow_none=False)
    for label, options in (("method_options", method_options), ("backend_options", backend_options)):
        if options is not None and not isinstance(options, Mapping):
            raise ArgumentTypeError(f"{label} must be a dict of option names to values, got {type(options).__name__}")
    if config is not None:
        given = (method, targets, exclude, method_options or None, backend_options or None)
        if any(value is not None for value in given) or backend != AUTO_BACKEND or merge_aware:
            raise ConfigError("pass either config= or method=/targets=/... to wrap(), not both")
        cfg = load_config(config)
        method_obj = registry.method_class(cfg.method.name)(cfg.method.options)
        backend_arg: Backend | str = cfg.backend.name
        if cfg.backend.name != AUTO_BACKEND:
            backend_arg = registry.backend_class(cfg.backend.name)(cfg.backend.options)
        return cfg, method_obj, backend_arg, cfg.targets, cfg.exclude
    if method is None:
        raise ConfigError("wrap() needs method= (a plugin name or a Method instance) or config=")
    if targets is None:
        targets = "all-linear"
    raw: dict[str, Any] = {
        "method": {"name": method, "options": dict(method_options or {})},
        "backend": {"name": backend, "options": dict(backend_options or {})},
        "targets": [_regex_text(p) for p in as_pattern_list(targets, "targets")],
        "exclude": [_regex_text(p) for p in as_pattern_list(exclude, "exclude")],
        "adapter_name": adapter_name,
        "merge_aware": merge_aware,
    }
    if isinstance(method, Method) and method_options:
        raise ConfigError("method_options given with a Method instance; put the options in the instance")
    if isinstance(backend, Backend) and backend_options:
        raise ConfigError("backend_options given with a Backend instance; put the options in the instance")
    instances = {key: obj for key, obj in (("method", method), ("backend", backend)) if not isinstance(obj, str)}
    for key, obj in instances.items():
        name = registry.registered_name(obj) or type(obj).__name__
        raw[key] = {"name": name, "options": obj.options.model_dump(mode="json")}
    cfg = validate_config(raw, prevalidated=tuple(instances))
    method_obj = method if isinstance(method, Method) else registry.method_class(method)(cfg.method.options)
    backend_arg = backend
    if isinstance(backend, str) and backend != AUTO_BACKEND:
        backend_arg = registry.backend_class(backend)(cfg.backend.options)
    return cfg, method_obj, backend_arg, targets, exclude


def wrap(
    model: ModelT,
    method: Method | str | None = None,
    backend: Backend | str = AUTO_BACKEND,
    targets: Targets | None = None,
    *,
    exclude: Targets | None = None,
    method_options: Mapping[str, Any] | None = None,
    backend_options: Mapping[str, Any] | None = None,
    adapter_name: str = "default",
    config: ConfigSource | None = None,
    merge_aware: bool = False,
) -> ModelT:
    """Put ``method`` adapters on ``model``'s target layers; returns the same model object.

    Args:
        model: any ``nn.Module`` (e.g. a transformers model, float or loaded quantized).
        method: method plugin name (``"oft"``, ``"randlora"``) or a :class:`Method` instance.
        backend: backend plugin name (``"bnb4"``), a :class:`Backend` instance, or ``"auto"``
            (default): each layer goes to the installed backend that owns it, float ``nn.Linear``
            layers to the float backend ``none``; a quantizing backend is preferred over ``none``.
            A named backend quantizes float ``nn.Linear`` targets and adopts layers it owns.
        targets: names, name suffixes, ``"re:<regex>"`` / ``re.Pattern``, or ``"all-linear"``
            (the default; leaves out the output head). See :mod:`qadapt.model.targeting`.
        exclude: patterns of modules to leave out.
        method_options / backend_options: options dicts, validated by the plugin's options model.
        adapter_name: name of the adapter created on every target.
        config: instead of the arguments above, a config file path, dict, or :class:`QAdaptConfig`.
        merge_aware: train through the quantizer: every layer computes with the storage its merge
            will write (straight-through gradient to the adapter), so after training ``merge()``
            gives a model that computes exactly what was trained (docs/training.md). Every backend
            must be able to requantize.

    Every parameter of the model except the adapters' is frozen.

    Raises:
        ConfigError: bad options (all problems at once, with locations such as ``method.options.r``).
        TargetError: no target matched (with the closest module names), or a target cannot be adapted.
    """
    cfg, method_obj, backend_arg, target_spec, exclude_spec = resolve_wrap_config(
        method, backend, targets, exclude, method_options, backend_options, adapter_name, config, merge_aware
    )
    return wrap_resolved(model, cfg, method_obj, backend_arg, target_spec, exclude_spec)


def wrap_resolved(
    model: ModelT,
    cfg: QAdaptConfig,
    method: Method,
    backend: Backend | str,
    targets: Targets,
    exclude: Targets | None,
    into: Transaction | None = None,
) -> ModelT:
    """The surgery behind :func:`wrap`, for already resolved plugins, in one transaction (``into``: the
    caller's, which the caller undoes on failure)."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    choice = _backend_choice(backend, None)
    try:
        plan = plan_targets(model, method, choice, targets, exclude)
    except TargetError as exc:
        wrapped = list(adapter_layers(model))
        if wrapped and "matched" in str(exc):
            adapters = sorted({name for _, layer in wrapped for name in layer.adapters})
            raise TargetError(
                f"this model is already wrapped ({len(wrapped)} qadapt layer(s), adapters: {', '.join(adapters)}), so "
                f"no unwrapped layer matched targets {targets!r}; add another adapter with "
                "qadapt.add_adapter(model, name, method), or qadapt.unwrap(model) first"
            ) from exc
        raise
    carriers = [name for name, layer in adapter_layers(model) if cfg.adapter_name in layer.adapters]
    if carriers:
        # A second wrap under the same name would split one adapter over two method instances
        # (and two shared states), which save_adapter cannot describe.
        raise TargetError(
            f"this model already has adapter {cfg.adapter_name!r} on {len(carriers)} layer(s) (e.g. {carriers[0]}); "
            "wrap every target in one call, or give this wrap another adapter_name, or use qadapt.add_adapter"
        )
    # Whatever stops the wrap (a quantizer error, Ctrl-C), the model goes back as it was.
    with transaction(model, into) as tx:
        shared = method.create_shared([(t.in_features, t.out_features) for t in plan])
        layers = []
        for target in progress(plan, "qadapt wrap"):
            layer = QuantAdapterLinear(
                target.module,
                target.method,
                target.backend,
                adapter_name=cfg.adapter_name,
                shared=shared,
                merge_aware=cfg.merge_aware,
            )
            # New modules start in training mode; keep the mode of the layer they replace (quantized
            # kernels such as bitsandbytes' int8 take a different path in eval mode).
            layer.train(target.module.training)
            layers.append((target.name, layer))
        for name, layer in layers:
            tx.replace(name, layer)
        if shared is not None:
            shared_state(model)[cfg.adapter_name] = shared
        freeze_base(model)
        for undo in integrations.after_wrap(model):
            tx.on_undo(undo)
    return model
