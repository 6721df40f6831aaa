"""``qadapt.export``: base checkpoint + adapter -> a model directory transformers loads, layer by layer.

Nothing builds the model. The base's safetensors headers are read first (:mod:`.plan`); every
layer is then read on its own, merged with the same engine as the in-memory merge
(:mod:`qadapt.merging`), written into the current output shard, and dropped. Tensors that do not
change are copied (or cast) in chunks, never whole.

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
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qadapt.errors import CheckpointError, ConfigError
from qadapt.exporting.adapter_source import AdapterSource, read_adapter_source
from qadapt.exporting.plan import Plan, Step, make_plan, mib, read_storage
from qadapt.exporting.targets import resolve_target
from qadapt.formats.hf_checkpoint import ShardWriter, parse_size, read_tensors
from qadapt.merging.engine import check_requantize_mode, convert_weight, float_merged_weight, merge_storage, merged_bias
from qadapt.merging.figures import FigureSums, check_finite, weight_figures
from qadapt.merging.result import LayerFigures, MergeResult
from qadapt.merging.rows import merge_rows_in_blocks
from qadapt.protocols import Backend, QuantizedWeight
from qadapt.registry.reference import FloatBackend

#: transformers' own default shard size (``save_pretrained``).
DEFAULT_SHARD_SIZE = "50GB"
REPORT_FILE = "qadapt_export_report.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_SKIPPED_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def _quantize(backend: Backend, weight: torch.Tensor) -> QuantizedWeight:
    """``weight [out, in]`` in ``backend``'s format through its own ``quantize`` (as wrapping a float layer does)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return backend.get_storage(backend.quantize(linear))


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
            f"memory: estimated peak {mib(self.peak_estimate)} of max_memory {mib(self.max_memory)} "
            f"(largest tensor {mib(self.largest_tensor_bytes)})",
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
            (``qadapt.exporting.export_targets()``: ``nf4``, ``fp4``, ``int8`` with bitsandbytes).
        max_memory: cap on working memory (bytes or ``"2GiB"``); default ``MEMORY_MULTIPLE`` (8) float32 copies of the
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
    target = resolve_target(to, backend_options)
    source = read_adapter_source(adapter_dir)
    plan, shared = make_plan(base, source, target, max_memory)
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


def _write_config(directory: Path, plan: Plan, qc: dict[str, Any] | None) -> None:
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
    plan: Plan,
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
    step: Step,
    plan: Plan,
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
        backend, storage = read_storage(group, tensors, plan.readers, plan.base_qc)
    del tensors
    assert step.shape is not None
    method = source.method.for_layer(group.module) if step.adapted else source.method
    adapter = source.adapter_for(group.module, step.shape, shared, backend, storage, method) if step.adapted else None
    bias_adapter = adapter  # the branches below drop ``adapter`` once merged
    name = source.name
    what = f"merging adapter {name!r} into {group.module}"
    qc = None
    if target.dtype is not None:  # float target: the exact float merged weight, cast
        dtype = target.dtype
        if adapter is None:
            out = backend.dequantize(storage).to(dtype)
        elif group.float_weight and (merge_rows := method.row_merger(adapter)) is not None:
            weight_in = storage.tensors["weight"]
            figures = FigureSums("float32")
            blocks = merge_rows_in_blocks(weight_in, merge_rows, dtype, what, figures)
            writer.add_blocks(f"{group.module}.weight", dtype, tuple(weight_in.shape), blocks)
            error, retained = figures.finish()
            results[group.module] = MergeResult(name, error, retained, path="float")
            del storage, adapter, weight_in
            out = None
        else:
            weight, merged = float_merged_weight(backend, method, adapter, storage)
            del storage, adapter  # the checkpoint tensors are no longer needed
            out = merged.to(dtype)
            error, retained = weight_figures(weight, merged, out, precision="float32")
            if math.isnan(error):
                # The safe check, where the figures show it is needed (no float64 copy of the layer):
                # non-finite merged weights, or finite ones the target dtype cannot hold.
                check_finite(merged, what)
                check_finite(out, f"{what} (in {dtype})")
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
        else:  # convert: from another format, through the float (merged) weight, guarded like a merge
            model_dtype = plan.model_dtype

            def write(weight: torch.Tensor) -> QuantizedWeight:
                return _quantize(tb, weight.to(model_dtype))

            if adapter is None:
                new = write(backend.dequantize(storage))
            else:
                weight, merged = float_merged_weight(backend, method, adapter, storage)
                new, results[group.module] = convert_weight(
                    weight, merged, write, tb.dequantize, name=name, path="fresh", what=what
                )
                del weight, merged
            adapter = None  # merged already
        if adapter is not None:
            new, results[group.module] = merge_storage(tb, method, adapter, new, name=name, **merge_kwargs)
        kept_base = plan.base_qc if backend.name == tb.name else None
        qc = tb.checkpoint_config(new, kept_base)
        tensors_out = tb.to_checkpoint(new)
    for rel, tensor in tensors_out.items():
        writer.add(f"{group.module}.{rel}", tensor)
    if group.bias is not None:
        cast = target.dtype if target.dtype is not None and group.bias.is_float else None
        new_bias = None
        result = results.get(group.module)
        if bias_adapter is not None and not (result is not None and result.reverted):
            bias = read_tensors([group.bias])[group.bias.key]
            new_bias = merged_bias(method, bias_adapter, bias, name=name)  # None: the method leaves the bias
        if new_bias is None:
            writer.add_streamed(group.bias.key, group.bias, cast)
        else:
            writer.add(group.bias.key, new_bias.to(cast or bias.dtype))
    return qc
