"""The export plan: the base's tensors grouped by module, one step per module, and the memory each needs.

Nothing is written while planning: headers are read, a quantized layer is read only when its shape
or format is needed, and every step's working memory is checked against the cap first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qadapt import registry
from qadapt.errors import CapabilityError, CheckpointError, ConfigError, PluginError, shorten
from qadapt.exporting.adapter_source import AdapterSource
from qadapt.exporting.targets import Target
from qadapt.formats.adapter_layout import planned_shape_problems
from qadapt.formats.checkpoint_files import MAX_CONFIG_BYTES, parse_json_object
from qadapt.formats.hf_checkpoint import CHUNK_BYTES, TensorEntry, model_entries, parse_size, read_tensors
from qadapt.formats.local_files import InputDirectory
from qadapt.protocols import Backend, Method, QuantizedWeight
from qadapt.registry.reference import FloatBackend

#: What a step does with one module's tensors: copy or cast them as they are; merge in float
#: (``float_merge``) or write in float (``float``); merge in the base's own format (``merge``);
#: move to another backend's format (``convert``); quantize a float layer (``quantize``).
StepAction = Literal["copy", "cast", "float", "float_merge", "merge", "convert", "quantize"]
#: The default memory cap: this many float32 copies of the base's largest tensor.
MEMORY_MULTIPLE = 8
#: ... and at least this much (below it, per-tensor overheads dominate any estimate).
MIN_DEFAULT_MEMORY = 256 * 2**20
# Float32 copies of a layer's weight an action holds at its peak (W, W', what was stored,
# quantizer temporaries); measured peaks stay below these (benchmarks/export_bench.py).
_F32_COPIES: dict[StepAction, int] = {"merge": 7, "float_merge": 6, "convert": 7, "quantize": 5, "float": 3}


@dataclass
class _Group:
    """A module's tensors in the base checkpoint: ``entries`` relative to it (``weight``, ``weight.absmax``, ...)."""

    module: str
    entries: dict[str, TensorEntry] = field(default_factory=dict)
    bias: TensorEntry | None = None

    @property
    def float_weight(self) -> bool:
        """Only a floating-point ``weight`` (a float layer, an embedding, a norm)."""
        weight = self.entries.get("weight")
        return set(self.entries) == {"weight"} and weight is not None and weight.is_float

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values()) + (self.bias.nbytes if self.bias else 0)


def _split_key(key: str) -> tuple[str, str]:
    """``(module, relative key)``: a key's module ends before its first ``weight`` component
    (``a.q_proj.weight.absmax`` -> ``a.q_proj``), else before its last component."""
    parts = key.split(".")
    cut = next((i for i in range(1, len(parts)) if parts[i] == "weight"), len(parts) - 1)
    return ".".join(parts[:cut]), ".".join(parts[cut:])


def _groups(entries: Mapping[str, TensorEntry]) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for key, entry in entries.items():
        module, rel = _split_key(key)
        group = groups.setdefault(module, _Group(module))
        if rel == "bias":
            group.bias = entry
        else:
            group.entries[rel] = entry
    return list(groups.values())


def _checkpoint_backends(first: str | None) -> list[Backend]:
    """Default instances of installed backends that read checkpoints: ``first``, quantizers, float last."""
    found = []
    for name in registry.names("backends"):
        try:
            backend = registry.backend_class(name)()
        except PluginError:
            continue
        if backend.capabilities.checkpoint:
            found.append(backend)
    found.sort(key=lambda b: (b.name != first, isinstance(b, FloatBackend)))
    return found


class _Readers:
    """The backends that read checkpoint layers, loaded on first need (a float export loads none)."""

    def __init__(self, first: str | None) -> None:
        self.first = first
        self._backends: list[Backend] | None = None

    def __iter__(self) -> Iterator[Backend]:
        if self._backends is None:
            self._backends = _checkpoint_backends(self.first)
        return iter(self._backends)


def read_storage(
    group: _Group, tensors: Mapping[str, torch.Tensor], backends: _Readers, config: Mapping[str, Any] | None
) -> tuple[Backend, QuantizedWeight]:
    """The layer's storage as the first backend that reads its layout gives it.

    Raises:
        CheckpointError: no backend reads the layout, or the one whose layout it is refuses it (its
            message prefixed with the file and layer).
    """
    rel = {k: tensors[e.key] for k, e in group.entries.items()}
    for backend in backends:
        try:
            storage = backend.from_checkpoint(rel, config)
        except CheckpointError as exc:
            files = sorted({str(e.file) for e in group.entries.values()})
            raise CheckpointError(f"{', '.join(files)}: layer {group.module} ({backend.name}): {exc}") from exc
        if storage is not None:
            return backend, storage
    layout = ", ".join(f"{k} {e.code}{list(e.shape)}" for k, e in group.entries.items())
    raise CheckpointError(
        f"{group.module}: no installed backend reads this layer's tensors ({layout}); "
        f"backends that read checkpoints: {', '.join(b.name for b in backends) or '(none)'}"
    )


CONFIG_FILE = "config.json"


def read_base_config(base: InputDirectory) -> dict[str, Any]:
    """BASE's ``config.json``: a JSON object (at most 16 MiB) whose ``quantization_config`` is an object or absent.

    Raises:
        CheckpointError: naming the file and the field.
    """
    path = base.real / CONFIG_FILE
    try:
        data = base.read(CONFIG_FILE, MAX_CONFIG_BYTES)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{base} has no readable {CONFIG_FILE} (is it a transformers model directory?): {exc}"
        ) from exc
    config = parse_json_object(data, path)
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{path}: field 'quantization_config' must be an object, got {shorten(qc)}")
    skip = (qc or {}).get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise CheckpointError(
            f"{path}: field 'quantization_config.llm_int8_skip_modules' must be a list of module names, "
            f"got {shorten(skip)}"
        )
    return config


def _model_class(transformers: Any, config: Any, path: Path) -> Any:
    """The model class ``architectures[0]`` names, only if it is a transformers model class; else None
    (a name transformers does not have: the auto class for the config's ``model_type`` is used)."""
    architectures = getattr(config, "architectures", None) or []
    if not isinstance(architectures, list):
        raise CheckpointError(
            f"{path}: field 'architectures' must be a list of class names, got {shorten(architectures)}"
        )
    if not architectures:
        return None
    name = architectures[0]
    if not isinstance(name, str) or not name.isidentifier():
        raise CheckpointError(
            f"{path}: field 'architectures[0]' must name a model class such as 'LlamaForCausalLM', got {shorten(name)}"
        )
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # transformers' lazy module raises whatever the named module's import raises
        cls = None
    if cls is None:
        return None
    if (
        not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel))
        or cls is transformers.PreTrainedModel
    ):
        raise CheckpointError(
            f"{path}: field 'architectures[0]' is {name!r}, which is not a transformers model class "
            "(such as 'LlamaForCausalLM')"
        )
    return cls


def build_model(base: InputDirectory, base_config: Mapping[str, Any], context: Any = None) -> nn.Module:
    """The transformers model ``base``'s config describes, built inside ``context`` (default: on the meta
    device), from the config already read: no file is read again, no remote code is run, and
    ``architectures`` may only name a transformers model class.

    Raises:
        CapabilityError: transformers is not installed.
        CheckpointError: a config transformers cannot read or build (naming the file and field).
    """
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as exc:
        raise CapabilityError(
            f"this export needs transformers to read the model (pip install transformers): {exc}"
        ) from exc
    path = base.real / CONFIG_FILE
    model_type = base_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{path}: field 'model_type' must be a model type transformers {transformers.__version__} knows "
            f"(such as 'llama'), got {shorten(model_type)}; custom (remote) code is never run by the export"
        )
    fields = {k: v for k, v in base_config.items() if k not in ("quantization_config", "auto_map", "model_type")}
    try:
        config = CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as exc:  # a config class refuses bad fields with any exception type
        raise CheckpointError(
            f"{path}: transformers cannot read it as a {model_type!r} config: {shorten(exc, 300)}"
        ) from exc
    cls = _model_class(transformers, config, path)
    try:
        with context if context is not None else torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as exc:  # building from hostile fields: any exception type
        what = cls.__name__ if cls is not None else f"a {model_type!r} model"
        raise CheckpointError(f"{path}: transformers cannot build {what} from it: {shorten(exc, 300)}") from exc
    return model.eval()


def _linear_modules(base: InputDirectory, base_config: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """``(linears, kept)``: the modules transformers quantizes when it loads ``base`` with a quantization
    config (every ``nn.Linear`` except the ones it keeps in float), and the names it keeps in float
    (output embeddings, tied weights, the base's skip list). The model is built on the meta device.
    """
    model = build_model(base, base_config)
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(get_keys_to_not_convert(model)) | set(
        (base_config.get("quantization_config") or {}).get("llm_int8_skip_modules") or []
    )
    linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)
    }
    return linears, skip


def _model_dtype(config: Mapping[str, Any], entries: Mapping[str, TensorEntry]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next((e.dtype for e in entries.values() if e.is_float), torch.float32)


@dataclass
class Step:
    group: _Group
    action: StepAction
    adapted: bool = False
    shape: tuple[int, int] | None = None
    estimate: int = 0


@dataclass
class Plan:
    """Every step of an export, the target, and what the plan decided about float linears."""

    steps: list[Step]
    target: Target
    target_backend: Backend | None
    base_config: dict[str, Any]
    base_qc: dict[str, Any] | None
    model_dtype: torch.dtype
    readers: _Readers
    largest: TensorEntry
    cap: int
    peak: Step
    held: int
    #: float linears of a float base kept in float for a quantized target (they were float when the
    #: adapter was trained), and the names the written config must tell the loader to keep in float.
    kept_float: list[str] = field(default_factory=list)
    float_skip: list[str] = field(default_factory=list)
    #: float linears quantized that were float when the adapter was trained (or not recorded).
    quantized_float: list[str] = field(default_factory=list)

    @property
    def peak_estimate(self) -> int:
        return self.peak.estimate + self.held


def _estimate(step: Step) -> int:
    group = step.group
    if step.action == "copy":
        return min(group.nbytes, CHUNK_BYTES)
    if step.action == "cast":
        return 3 * min(group.nbytes, CHUNK_BYTES)
    assert step.shape is not None
    f32 = step.shape[0] * step.shape[1] * 4
    copies = _F32_COPIES[step.action]
    return group.nbytes + copies * f32


def _shape_problem(module: str, adapter: AdapterSource, shape: tuple[int, int]) -> str | None:
    recorded = adapter.shapes.get(module)
    if recorded is None or tuple(recorded) == tuple(shape):
        return None
    return (
        f"{module}: the adapter was trained on a layer with in_features={recorded[0]}, out_features={recorded[1]}; "
        f"the base's layer has in_features={shape[0]}, out_features={shape[1]}"
    )


def _check_target_fits(target: Target, backend: Backend | None, steps: list[Step]) -> None:
    """Every layer the export writes in ``backend``'s format fits its options (``Backend.check_layer``),
    checked before anything is written; every layer that does not is named."""
    if backend is None:
        return
    unfit = []
    for step in steps:
        if step.action in ("quantize", "convert") and step.shape is not None:
            try:
                backend.check_layer(*step.shape)
            except ConfigError as exc:
                unfit.append(f"{step.group.module}: {exc}")
    if unfit:
        raise ConfigError(
            f"target {target.name!r}: {len(unfit)} layer(s) do not fit backend {backend.name!r}'s options "
            "(nothing was written):\n  " + "\n  ".join(unfit)
        )


def make_plan(
    base: InputDirectory,
    adapter: AdapterSource,
    target: Target,
    max_memory: int | str | None,
    quantize_float_linears: bool = False,
) -> tuple[Plan, nn.Module | None]:
    """Every step of the export, sized and checked; nothing is written.

    Raises:
        CheckpointError: unreadable base files, an adapted layer missing from the base or of another
            shape than the adapter's (every such layer named with both shapes).
        ConfigError: target options that do not validate, or a step that does not fit ``max_memory``.
    """
    base_config = read_base_config(base)
    entries = model_entries(base)
    groups = _groups(entries)
    base_qc = base_config.get("quantization_config")
    by_module = {g.module: g for g in groups if "weight" in g.entries}
    missing = [name for name in adapter.layers if name not in by_module]
    if missing:
        raise CheckpointError(
            f"the adapter in {adapter.directory} adapts {len(missing)} layer(s) the base {base} does not have "
            f"(e.g. {missing[0]}); base layers look like {next(iter(by_module), '(none)')}"
        )
    target_backend = None
    if target.backend is not None:
        cls = registry.backend_class(target.backend)
        if not cls.capabilities.checkpoint:
            raise CapabilityError(
                f"target {target.name!r}: backend {target.backend!r} cannot write checkpoints (its capabilities do not "
                "include checkpoint); export to a float target (bf16, fp16, float32) instead"
            )
    readers = _Readers(target.backend)
    adapted = set(adapter.layers)
    # Quantized layers with the same key layout share a format (one quantization_config per checkpoint);
    # a layer is read here only when its shape is needed (it is processed, not copied).
    formats: dict[tuple, tuple[Backend, dict[str, Any]]] = {}

    def layer_format(group: _Group, need_shape: bool) -> tuple[Backend, dict[str, Any], tuple[int, int] | None]:
        signature = tuple(sorted((k, e.code) for k, e in group.entries.items()))
        if signature in formats and not need_shape:
            return (*formats[signature], None)
        backend, storage = read_storage(group, read_tensors(group.entries.values()), readers, base_qc)
        options = backend.storage_options(storage)
        formats.setdefault(signature, (backend, options))
        out_f, in_f = backend.dequantize(storage).shape
        return backend, options, (in_f, out_f)

    quantized = [g for g in groups if "weight" in g.entries and not g.float_weight]
    options = dict(target.options)
    if target.backend is not None:
        same = [f for f in (layer_format(g, False) for g in quantized[:1]) if f[0].name == target.backend]
        if same:  # the base is already in the target's backend: its own settings are the defaults
            options = {**same[0][1], **target.options}
        try:
            target_backend = registry.backend_class(target.backend)(options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"target {target.name!r}: options {options} do not validate for backend {target.backend!r}:\n{exc}"
            ) from exc
    linears: set[str] = set()
    kept_float: set[str] = set()
    skip: set[str] = set()
    # A quantized base's float linears are the ones its quantizer kept in float: they stay so. A float
    # base's are quantized as transformers would, except those that were float when the adapter was
    # trained (the checkpoint records them): the export is the model that was trained.
    if (
        target_backend is not None
        and base_qc is None
        and any(g.float_weight and g.module not in adapted for g in groups)
    ):
        linears, skip = _linear_modules(base, base_config)
        if adapter.float_linears is not None and not quantize_float_linears:
            kept_float = linears & adapter.float_linears
            linears -= kept_float
    # Every adapted layer's shape is the base's own, compared with the one the adapter records.
    shapes: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    steps: list[Step] = []
    for group in groups:
        is_adapted = group.module in adapted
        if "weight" not in group.entries:
            steps.append(Step(group, "cast" if target.dtype else "copy"))
            continue
        if group.float_weight:
            weight = group.entries["weight"]
            shape = (weight.shape[1], weight.shape[0]) if len(weight.shape) == 2 else None
            if is_adapted:
                if shape is None:
                    raise CheckpointError(f"{group.module}: adapted, but its weight has shape {list(weight.shape)}")
                action = "float_merge" if target.dtype else "quantize"
            elif target_backend is not None and group.module in linears and shape is not None:
                action = "quantize"
            else:
                action = "cast" if target.dtype else "copy"
        else:
            backend, layer_options, shape = layer_format(group, need_shape=False)
            if target.dtype is not None:
                action = "float_merge" if is_adapted else "float"
            elif backend.name == target.backend and layer_options == options:
                action = "merge" if is_adapted else "copy"
            else:
                action = "convert"
            if action != "copy":
                shape = layer_format(group, need_shape=True)[2]
        if shape is not None:
            shapes[group.module] = shape
            if is_adapted and (problem := _shape_problem(group.module, adapter, shape)) is not None:
                problems.append(problem)
            elif is_adapted and adapter.state_shapes is not None:
                found = adapter.state_shapes(group.module)
                problems += planned_shape_problems(adapter.method.for_layer(group.module), *shape, found, group.module)
        step = Step(group, action, is_adapted, shapes.get(group.module))
        step.estimate = _estimate(step)
        steps.append(step)
    if problems:
        raise CheckpointError(
            f"the adapter in {adapter.directory} does not fit the base {base} ({len(problems)} layer(s); "
            "nothing was written):\n  " + "\n  ".join(problems)
        )
    if target_backend is None and target.dtype is None:
        raise ConfigError(f"target {target.name!r} has neither a dtype nor a backend")
    _check_target_fits(target, target_backend, steps)
    shared = None
    if type(adapter.method).create_shared is not Method.create_shared:
        # Shared method state (RandLora's bases) is made once, from the checkpoint's seed or saved
        # tensors, and held: it is sized by the largest layer, and drawing it per layer costs a draw each.
        shared = adapter.create_shared([shapes[name] for name in adapter.layers])
    held = adapter.held_bytes
    if shared is not None:
        held += sum(t.numel() * t.element_size() for t in [*shared.parameters(), *shared.buffers()])
    largest = max(entries.values(), key=lambda e: e.numel)
    if max_memory is None:
        cap = max(MEMORY_MULTIPLE * largest.numel * 4, MIN_DEFAULT_MEMORY)
    else:
        cap = parse_size(max_memory, "max_memory")
    peak = max(steps, key=lambda s: s.estimate)
    plan = Plan(
        steps,
        target,
        target_backend,
        base_config,
        base_qc,
        _model_dtype(base_config, entries),
        readers,
        largest,
        cap,
        peak,
        held,
        sorted(kept_float),
        sorted(skip | kept_float) if kept_float else [],
        sorted(name for name in linears if name not in adapted and name in by_module and by_module[name].float_weight),
    )
    if plan.peak_estimate > cap:
        raise ConfigError(
            f"max_memory={mib(cap)} is too small: layer {peak.group.module} ({peak.action}, "
            f"{' -> '.join(map(str, peak.shape or ()))}) needs about {mib(peak.estimate)} plus {mib(held)} "
            f"of adapter state held throughout; pass max_memory of at least {mib(plan.peak_estimate)} "
            "(nothing was written)"
        )
    return plan, shared


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
