"""``qadapt.export``: base checkpoint + adapter -> a model directory transformers loads, layer by layer.

Nothing builds the model. The base's safetensors headers are read first; every layer is then
read on its own (``safe_open``), merged with the same protocol as the in-memory merge
(:func:`qadapt.merging.merge_storage`, or :func:`~qadapt.merging.float_merged_weight` for float
targets), written into the current output shard, and dropped. Tensors that do not change are
copied (or cast) in chunks, never whole. Before anything is written, each layer's working memory
is estimated and checked against ``max_memory``.

Backends do all format work through the optional checkpoint members of the protocol
(``from_checkpoint`` / ``to_checkpoint`` / ``checkpoint_config`` / ``storage_options``); which
target names exist (``nf4``, ``int8``, ...) is declared by the backends (``export_targets``).
The output is written to a temporary directory beside ``out`` and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qadapt import registry
from qadapt.errors import CapabilityError, CheckpointError, ConfigError, PluginError
from qadapt.export_adapter import AdapterSource, read_adapter_source
from qadapt.export_io import CHUNK_BYTES, ShardWriter, TensorEntry, model_entries, parse_size, read_tensors
from qadapt.merging import (
    LayerFigures,
    MergeResult,
    check_finite,
    check_requantize_mode,
    float_merged_weight,
    merge_storage,
    weight_figures,
)
from qadapt.protocols import Backend, Method, QuantizedWeight, RowMerger
from qadapt.reference import FloatBackend

#: Float targets: name -> dtype. Every backend can be exported to these (dequantize + merge).
FLOAT_TARGETS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
#: The default memory cap: this many float32 copies of the base's largest tensor.
MEMORY_MULTIPLE = 8
#: ... and at least this much (below it, per-tensor overheads dominate any estimate).
MIN_DEFAULT_MEMORY = 256 * 2**20
_ROWS = 256
#: transformers' own default shard size (``save_pretrained``).
DEFAULT_SHARD_SIZE = "50GB"
REPORT_FILE = "qadapt_export_report.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_SKIPPED_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
# Float32 copies of a layer's weight an action holds at its peak (W, W', what was stored,
# quantizer temporaries); measured peaks stay below these (benchmarks/export_bench.py).
_F32_COPIES = {"merge": 7, "float_merge": 6, "convert": 6, "quantize": 5, "float": 3}


# ----------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """An export target: a float dtype, or a backend with options over the base's format."""

    name: str
    dtype: torch.dtype | None = None
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def export_targets() -> dict[str, Target]:
    """Every target name the installed plugins offer (``--to``), float ones included."""
    found: dict[str, Target] = {name: Target(name, dtype=dtype) for name, dtype in FLOAT_TARGETS.items()}
    owners: dict[str, str] = {}
    for backend in registry.names("backends"):
        try:
            cls = registry.backend_class(backend)
        except PluginError:
            continue
        for name, options in getattr(cls, "export_targets", {}).items():
            if name in found:
                other = owners.get(name, "qadapt (float)")
                raise ConfigError(f"export target {name!r} is declared by backend {backend!r} and by {other}")
            found[name] = Target(name, backend=backend, options=dict(options))
            owners[name] = f"backend {backend!r}"
    return found


def _resolve_target(to: str, backend_options: Mapping[str, Any] | None) -> Target:
    if to in FLOAT_TARGETS and not backend_options:
        return Target(to, dtype=FLOAT_TARGETS[to])  # no plugin is loaded for a float target
    targets = export_targets()
    if to not in targets:
        raise ConfigError(f"--to must be one of {', '.join(sorted(targets))}, got {to!r}")
    target = targets[to]
    if backend_options:
        if target.backend is None:
            raise ConfigError(f"backend options were given, but target {to!r} is a float dtype with no backend")
        target = Target(target.name, backend=target.backend, options={**target.options, **dict(backend_options)})
    return target


# ------------------------------------------------------------------------------------ layers


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


def _read_storage(
    group: _Group, tensors: Mapping[str, torch.Tensor], backends: _Readers, config: Mapping[str, Any] | None
) -> tuple[Backend, QuantizedWeight]:
    rel = {k: tensors[e.key] for k, e in group.entries.items()}
    for backend in backends:
        storage = backend.from_checkpoint(rel, config)
        if storage is not None:
            return backend, storage
    layout = ", ".join(f"{k} {e.code}{list(e.shape)}" for k, e in group.entries.items())
    raise CheckpointError(
        f"{group.module}: no installed backend reads this layer's tensors ({layout}); "
        f"backends that read checkpoints: {', '.join(b.name for b in backends) or '(none)'}"
    )


def _linear_modules(base: Path, base_config: Mapping[str, Any]) -> set[str]:
    """The modules transformers quantizes when it loads ``base`` with a quantization config:
    every ``nn.Linear`` except the ones it keeps in float (output embeddings, tied, skip list)."""
    try:
        import transformers
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError as exc:
        raise CapabilityError(
            "exporting a float base to a quantized target needs transformers to find the linear layers "
            f"(pip install transformers): {exc}"
        ) from exc
    config = transformers.AutoConfig.from_pretrained(base)
    config.__dict__.pop("quantization_config", None)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    with torch.device("meta"):
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    skip = set(get_keys_to_not_convert(model)) | set(
        (base_config.get("quantization_config") or {}).get("llm_int8_skip_modules") or []
    )
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)
    }


def _model_dtype(config: Mapping[str, Any], entries: Mapping[str, TensorEntry]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next((e.dtype for e in entries.values() if e.is_float), torch.float32)


def _float_figures(weight: torch.Tensor, merged: torch.Tensor, out: torch.Tensor) -> tuple[float, float | None]:
    """:func:`qadapt.merging.weight_figures` for a float target (``out`` is ``merged`` cast), in float32
    blocks of rows with BLAS dot products: the figures measure rounding here, and float64 passes
    over every weight took most of a float export's time."""
    sums = [0.0, 0.0, 0.0, 0.0]
    for b, t, s in zip(weight.split(_ROWS), merged.split(_ROWS), out.split(_ROWS), strict=True):
        _add_figure_sums(sums, b, t, s)
    return _finish_figures(sums)


def _add_figure_sums(sums: list[float], before: torch.Tensor, merged: torch.Tensor, out: torch.Tensor) -> None:
    """Add one block of rows (float32 ``before``/``merged``, ``out`` in the target dtype) to the four
    sums :func:`_finish_figures` turns into ``(error, delta_retained)``."""
    intended = (merged - before).reshape(-1)
    error = (out.float() - merged).reshape(-1)
    flat = merged.reshape(-1)
    intended_sq = float(torch.dot(intended, intended))
    sums[0] += float(torch.dot(flat, flat))
    sums[1] += float(torch.dot(error, error))
    # stored - before = error + intended
    sums[2] += float(torch.dot(error, intended)) + intended_sq
    sums[3] += intended_sq


def _finish_figures(sums: list[float]) -> tuple[float, float | None]:
    if not all(math.isfinite(x) for x in sums):
        return math.nan, None  # the caller's safe check says where
    target_sq, error_sq, overlap, intended_sq = sums
    return (
        (error_sq / target_sq) ** 0.5 if target_sq > 0 else 0.0,
        overlap / intended_sq if intended_sq > 0 else None,
    )


#: float32 bytes of one block of rows in a row-wise float merge (a few temporaries of this size live at once).
_ROW_BLOCK_BYTES = 2 * 2**20


def _float_merge_by_rows(
    source: torch.Tensor, merge_rows: RowMerger, dtype: torch.dtype, what: str, figures: list[float]
) -> Iterator[torch.Tensor]:
    """The merged rows of a float ``source [out, in]``, cast to ``dtype``, a block at a time (for
    :meth:`ShardWriter.add_blocks`): only one block is ever in float32. Adds each block to the
    four ``figures`` sums (see :func:`_finish_figures`)."""
    step = max(1, min(_ROWS, _ROW_BLOCK_BYTES // (4 * max(source.shape[1], 1))))
    for start in range(0, source.shape[0], step):
        rows = slice(start, min(start + step, source.shape[0]))
        before = source[rows].float()
        merged = merge_rows(before, rows)
        out = merged.to(dtype)
        _add_figure_sums(figures, before, merged, out)
        if not all(math.isfinite(x) for x in figures):
            # The safe check, where the figures show it is needed (as in the whole-layer path):
            # non-finite merged rows, or finite ones the target dtype cannot hold.
            where = f"{what}, rows {rows.start}..{rows.stop - 1}"
            check_finite(merged, where)
            check_finite(out, f"{where} (in {dtype})")
        yield out


def _quantize(backend: Backend, weight: torch.Tensor) -> QuantizedWeight:
    """``weight [out, in]`` in ``backend``'s format through its own ``quantize`` (as wrapping a float layer does)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return backend.get_storage(backend.quantize(linear))


# -------------------------------------------------------------------------------------- plan


@dataclass
class _Step:
    group: _Group
    #: copy | cast | float | float_merge | merge | convert | quantize
    action: str
    adapted: bool = False
    shape: tuple[int, int] | None = None
    estimate: int = 0


@dataclass
class _Plan:
    steps: list[_Step]
    target: Target
    target_backend: Backend | None
    base_config: dict[str, Any]
    base_qc: dict[str, Any] | None
    model_dtype: torch.dtype
    readers: _Readers
    largest: TensorEntry
    cap: int
    peak: _Step
    held: int

    @property
    def peak_estimate(self) -> int:
        return self.peak.estimate + self.held


def _estimate(step: _Step) -> int:
    group = step.group
    if step.action == "copy":
        return min(group.nbytes, CHUNK_BYTES)
    if step.action == "cast":
        return 3 * min(group.nbytes, CHUNK_BYTES)
    assert step.shape is not None
    f32 = step.shape[0] * step.shape[1] * 4
    copies = _F32_COPIES[step.action]
    return group.nbytes + copies * f32


def _plan(
    base: Path, adapter: AdapterSource, target: Target, max_memory: int | str | None
) -> tuple[_Plan, nn.Module | None]:
    try:
        base_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{base} has no readable config.json (is it a transformers model directory?): {exc}"
        ) from exc
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
        backend, storage = _read_storage(group, read_tensors(group.entries.values()), readers, base_qc)
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
    # A quantized base's float linears are the ones its quantizer kept in float: they stay so.
    if (
        target_backend is not None
        and base_qc is None
        and any(g.float_weight and g.module not in adapted for g in groups)
    ):
        linears = _linear_modules(base, base_config)
    shapes = dict(adapter.shapes)
    steps: list[_Step] = []
    for group in groups:
        is_adapted = group.module in adapted
        if "weight" not in group.entries:
            steps.append(_Step(group, "cast" if target.dtype else "copy"))
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
            if action != "copy" and group.module not in shapes:
                shape = layer_format(group, need_shape=True)[2]
        if shape is not None:
            shapes.setdefault(group.module, shape)
        step = _Step(group, action, is_adapted, shapes.get(group.module))
        step.estimate = _estimate(step)
        steps.append(step)
    if target_backend is None and target.dtype is None:
        raise ConfigError(f"target {target.name!r} has neither a dtype nor a backend")
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
    plan = _Plan(
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
    )
    if plan.peak_estimate > cap:
        raise ConfigError(
            f"max_memory={_mib(cap)} is too small: layer {peak.group.module} ({peak.action}, "
            f"{' -> '.join(map(str, peak.shape or ()))}) needs about {_mib(peak.estimate)} plus {_mib(held)} "
            f"of adapter state held throughout; pass max_memory of at least {_mib(plan.peak_estimate)} "
            "(nothing was written)"
        )
    return plan, shared


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -------------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class ExportReport(LayerFigures):
    """What :func:`export` wrote: the per-layer merge figures and the sizes involved."""

    out: str
    target: str
    adapter: str
    layers: dict[str, MergeResult]
    files: list[str]
    bytes_written: int
    seconds: float
    #: estimated working memory of the largest step (plus adapter state), the cap, and the base's largest tensor.
    peak_estimate: int
    max_memory: int
    largest_tensor_bytes: int

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(max_error=self.max_error, min_delta_retained=self.min_delta_retained)
        return data

    def __str__(self) -> str:
        reverted = sum(r.reverted for r in self.layers.values())
        kept = self.min_delta_retained
        paths = sorted({r.path for r in self.layers.values()})
        lines = [
            f"exported {self.out} ({self.target}): {len(self.layers)} layer(s) merged ({', '.join(paths)}), "
            f"{self.bytes_written / 2**20:.1f} MiB in {len(self.files)} file(s), {self.seconds:.1f} s",
            f"max relative error {self.max_error:.3g}"
            + (f", min change retained {kept:.3g}" if kept is not None else "")
            + (f", {reverted} layer(s) kept unmerged by the guard" if reverted else ""),
            f"memory: estimated peak {_mib(self.peak_estimate)} of max_memory {_mib(self.max_memory)} "
            f"(largest tensor {_mib(self.largest_tensor_bytes)})",
        ]
        return "\n".join(lines)


def export(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: str,
    max_memory: int | str | None = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    backend_options: Mapping[str, Any] | None = None,
    requantize: str | None = None,
    progress: bool = True,
) -> ExportReport:
    """Merge ``adapter`` into the model at ``base`` and write a model directory at ``out``.

    Args:
        base: a transformers model directory (safetensors; float, or quantized as transformers saves it).
        adapter: a qadapt checkpoint directory (``save_adapter``) or a PEFT adapter directory.
        out: the directory to write; ``AutoModelForCausalLM.from_pretrained(out)`` loads it as it is.
        to: a float dtype (``float32``, ``bf16``, ``fp16``) or a target a backend declares
            (``qadapt.export.export_targets()``: ``nf4``, ``fp4``, ``int8`` with bitsandbytes).
        max_memory: cap on working memory (bytes or ``"2GiB"``); default six float32 copies of the
            base's largest tensor. Checked for every layer before anything is written.
        max_shard_size: bytes of tensor data per output shard (transformers' default, ``"50GB"``).
        overwrite: replace an existing ``out``.
        backend_options: options for the target backend, over the target's and the base's own.
        requantize: the merge's requantize mode (``merge_storage``'s default when None).
        progress: show a progress bar (layers/s and bytes written).

    Raises:
        ConfigError: unknown target, bad options, ``out`` exists, or ``max_memory`` too small.
        CheckpointError: unreadable base or adapter, or an adapter that does not fit the base.
        CapabilityError: the target's backend cannot write checkpoints.
    """
    started = time.perf_counter()
    base, adapter_dir, out = Path(base), Path(adapter), Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"out={str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if requantize is not None:
        check_requantize_mode(requantize)
    shard_size = parse_size(max_shard_size, "max_shard_size")
    target = _resolve_target(to, backend_options)
    source = read_adapter_source(adapter_dir)
    plan, shared = _plan(base, source, target, max_memory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.qadapt-export-", dir=out.parent))
    writer = ShardWriter(tmp, shard_size)
    try:
        results, qc = _run(plan, source, shared, writer, requantize, progress)
        files = writer.finish()
        _write_config(tmp, plan, qc)
        _copy_side_files(base, tmp)
        report = ExportReport(
            str(out),
            target.name,
            str(adapter_dir),
            results,
            [f.name for f in files],
            writer.bytes_written,
            time.perf_counter() - started,
            plan.peak_estimate,
            plan.cap,
            plan.largest.nbytes,
        )
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise ConfigError(f"out={str(out)!r} appeared during the export; pass overwrite=True to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.qadapt-old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write_config(directory: Path, plan: _Plan, qc: dict[str, Any] | None) -> None:
    config = dict(plan.base_config)
    config.pop("quantization_config", None)
    if plan.target.dtype is not None:
        name = str(plan.target.dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    elif qc is not None:
        config["quantization_config"] = qc
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_side_files(base: Path, directory: Path) -> None:
    """Tokenizer, generation config and other small files; weights and config.json are written anew."""
    for path in sorted(base.iterdir()):
        if path.is_file() and path.name not in _SKIPPED_FILES and not path.name.startswith("."):
            if path.suffix not in _WEIGHT_SUFFIXES and path.name != REPORT_FILE:
                shutil.copy2(path, directory / path.name)


def _run(
    plan: _Plan,
    source: AdapterSource,
    shared: nn.Module | None,
    writer: ShardWriter,
    requantize: str | None,
    progress: bool,
) -> tuple[dict[str, MergeResult], dict[str, Any] | None]:
    results: dict[str, MergeResult] = {}
    config: dict[str, Any] | None = None
    merge_kwargs = {} if requantize is None else {"requantize_mode": requantize}
    bar = tqdm(plan.steps, desc="qadapt export", unit="layer", disable=not progress, dynamic_ncols=True)
    for step in bar:
        group = step.group
        if step.action in ("copy", "cast"):
            for entry in [*group.entries.values(), *([group.bias] if group.bias else [])]:
                cast = plan.target.dtype if step.action == "cast" and entry.is_float else None
                writer.add_streamed(entry.key, entry, cast)
        else:
            produced = _layer(step, plan, source, shared, writer, results, merge_kwargs)
            if produced is not None:
                if config is None:
                    config = produced
                elif produced != config:
                    raise CheckpointError(
                        f"{group.module} would be written with quantization_config {produced}, other layers with "
                        f"{config}; one checkpoint holds one format"
                    )
        bar.set_postfix_str(f"{writer.bytes_written / 2**20:,.0f} MiB written", refresh=False)
    if plan.target_backend is not None and config is None:
        # Every quantized layer was copied as it was: the base's own config describes them.
        config = plan.base_qc
    return results, config


@torch.no_grad()
def _layer(
    step: _Step,
    plan: _Plan,
    source: AdapterSource,
    shared: nn.Module | None,
    writer: ShardWriter,
    results: dict[str, MergeResult],
    merge_kwargs: dict[str, Any],
) -> dict[str, Any] | None:
    group, target = step.group, plan.target
    tensors = read_tensors(group.entries.values())
    if group.float_weight:
        backend: Backend = FloatBackend()
        storage = QuantizedWeight({"weight": tensors[group.entries["weight"].key]})
    else:
        backend, storage = _read_storage(group, tensors, plan.readers, plan.base_qc)
    del tensors
    assert step.shape is not None
    adapter = source.adapter_for(group.module, step.shape, shared, backend, storage) if step.adapted else None
    name = source.name
    qc = None
    if target.dtype is not None:  # float target: the exact float merged weight, cast
        if adapter is None:
            out = backend.dequantize(storage).to(target.dtype)
        elif group.float_weight and (merge_rows := source.method.row_merger(adapter)) is not None:
            weight_in = storage.tensors["weight"]
            figures = [0.0, 0.0, 0.0, 0.0]
            what = f"merging adapter {name!r} into {group.module}"
            blocks = _float_merge_by_rows(weight_in, merge_rows, target.dtype, what, figures)
            writer.add_blocks(f"{group.module}.weight", target.dtype, tuple(weight_in.shape), blocks)
            error, retained = _finish_figures(figures)
            results[group.module] = MergeResult(name, error, retained, path="float")
            del storage, adapter, weight_in
            out = None
        else:
            weight, merged = float_merged_weight(backend, source.method, adapter, storage)
            del storage, adapter  # the checkpoint tensors are no longer needed
            out = merged.to(target.dtype)
            error, retained = _float_figures(weight, merged, out)
            if not math.isfinite(error):
                # The safe check, where the figures show it is needed (no float64 copy of the layer):
                # non-finite merged weights, or finite ones the target dtype cannot hold.
                check_finite(merged, f"merging adapter {name!r} into {group.module}")
                check_finite(out, f"merging adapter {name!r} into {group.module} (in {target.dtype})")
            results[group.module] = MergeResult(name, error, retained, path="float")
            del weight, merged
        tensors_out = {} if out is None else {"weight": out}
    else:
        tb = plan.target_backend
        assert tb is not None
        if step.action == "merge":
            new = storage
        elif step.action == "quantize":
            new = _quantize(tb, storage.tensors["weight"])
        else:  # convert: from another format, through the float (merged) weight
            if adapter is None:
                weight = merged = backend.dequantize(storage)
            else:
                weight, merged = float_merged_weight(backend, source.method, adapter, storage)
                check_finite(merged, f"merging adapter {name!r} into {group.module}")
            new = _quantize(tb, merged.to(plan.model_dtype))
            if adapter is not None:
                error, retained = weight_figures(weight, merged, tb.dequantize(new))
                results[group.module] = MergeResult(name, error, retained, path="fresh")
            adapter = None  # merged already
            del weight, merged
        if adapter is not None:
            new, results[group.module] = merge_storage(tb, source.method, adapter, new, name=name, **merge_kwargs)
        kept_base = plan.base_qc if backend.name == tb.name else None
        qc = tb.checkpoint_config(new, kept_base)
        tensors_out = tb.to_checkpoint(new)
    for rel, tensor in tensors_out.items():
        writer.add(f"{group.module}.{rel}", tensor)
    if group.bias is not None:
        cast = target.dtype if target.dtype is not None and group.bias.is_float else None
        writer.add_streamed(group.bias.key, group.bias, cast)
    return qc
