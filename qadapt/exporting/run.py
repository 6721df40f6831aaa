"""``qadapt.export``: base checkpoint + adapter -> a model directory transformers loads, layer by layer.

Nothing builds the model. The base's safetensors headers are read first (:mod:`.plan`); every
layer is then read on its own, merged with the same engine as the in-memory merge
(:mod:`qadapt.merging`), written into the current output shard, and dropped. Tensors that do not
change are copied (or cast) in chunks, never whole.

Backends do all format work through the optional checkpoint members of the protocol
(``from_checkpoint`` / ``to_checkpoint`` / ``checkpoint_config`` / ``storage_options``); which
target names exist (``nf4``, ``int8``, ...) is declared by the backends (``export_targets``).
Every file of BASE and ADAPTER is read inside its directory only (:mod:`qadapt.formats.local_files`);
OUT may not be, hold or lie inside either. The output is written to a temporary directory beside
``out`` and moved into place at the end (:mod:`.output`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from qadapt.errors import ConfigError, warn
from qadapt.exporting.adapter_source import AdapterSource, read_adapter_source
from qadapt.exporting.calibrated import CalibratedRun, check_calibration_options, resolve_batches
from qadapt.exporting.model_file import export_model_file
from qadapt.exporting.output import OutputSlot, check_out, recover_stale
from qadapt.exporting.plan import Plan, make_plan, mib
from qadapt.exporting.steps import StepWriter
from qadapt.exporting.targets import resolve_target
from qadapt.formats.calibration_text import DEFAULT_CALIBRATION_TOKENS
from qadapt.formats.hf_checkpoint import ShardWriter, parse_size
from qadapt.formats.local_files import InputDirectory
from qadapt.merging.engine import check_requantize_mode
from qadapt.merging.result import LayerFigures, MergeResult
from qadapt.model.calibration import DEFAULT_MAX_BATCHES, check_limit
from qadapt.registry.model_files import is_model_file

#: transformers' own default shard size (``save_pretrained``).
DEFAULT_SHARD_SIZE = "50GB"
REPORT_FILE = "qadapt_export_report.json"
#: The files of BASE copied into OUT beside the weights and config.json (tokenizer, processor,
#: generation settings, model card, licence); any other file is left out and listed in the report.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "README.md",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "NOTICE",
)
#: BASE files the export writes anew or never needs (not reported as left out).
_REWRITTEN = {"config.json", "model.safetensors", "model.safetensors.index.json", REPORT_FILE}


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
    #: BASE's side files copied into OUT (:data:`SIDE_FILES`), and the other files of BASE left out.
    copied_files: list[str] = field(default_factory=list)
    left_out_files: list[str] = field(default_factory=list)
    #: what was cleaned beside OUT first: leftovers of exports that were killed.
    recovered: list[str] = field(default_factory=list)
    #: float linears of a float base kept in float for a quantized target, as they were when the adapter
    #: was trained; and the float linears (not adapted) quantized, each with its relative weight error.
    kept_float: list[str] = field(default_factory=list)
    quantized_float: dict[str, float] = field(default_factory=dict)
    #: whether the adapter recorded its model's float linears (qadapt checkpoints since they do; not PEFT).
    float_linears_recorded: bool = True
    #: calibration batches used (fit + held out; None: no calibration), and whether blocks were fed merged.
    calibration_batches: int | None = None
    sequential: bool = False
    #: without calibration, when the quantized merges kept little: the share kept and what keeps more.
    advice: str | None = None

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
        if self.calibration_batches is not None:
            fed = "merged (sequential)" if self.sequential else "adapted, unmerged"
            lines.append(f"calibrated on {self.calibration_batches} batch(es), block by block; fed {fed} outputs")
        if self.kept_float:
            lines.append(
                f"{len(self.kept_float)} float linear(s) kept in float, as they were when the adapter was trained "
                "(quantize_float_linears=True / --quantize-float-linears quantizes them)"
            )
        if self.quantized_float:
            worst = max(self.quantized_float.values())
            why = (
                "they were float when the adapter was trained"
                if self.float_linears_recorded
                else "the adapter does not record which linears were float when it was trained"
            )
            lines.append(
                f"{len(self.quantized_float)} float linear(s) not adapted were quantized, as transformers would "
                f"({why}): max relative weight error {worst:.3g}"
            )
        if self.left_out_files:
            shown = ", ".join(self.left_out_files[:8]) + (", ..." if len(self.left_out_files) > 8 else "")
            lines.append(f"not copied from BASE (not a known tokenizer/config file): {shown}")
        lines += self.recovered
        if self.advice:
            lines.append(self.advice)
        return "\n".join(lines)


def export(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: str | None = None,
    max_memory: int | str | None = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    backend_options: Mapping[str, Any] | None = None,
    requantize: str | None = None,
    progress: bool = True,
    quantize_float_linears: bool = False,
    calibration: str | os.PathLike[str] | Iterable[Any] | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    sequential: bool = False,
    max_calibration_batches: int = DEFAULT_MAX_BATCHES,
) -> ExportReport:
    """Merge ``adapter`` into the model at ``base`` and write a model directory at ``out``.

    Args:
        base: a transformers model directory (safetensors; float, or quantized as transformers saves it), or a
            model file an installed backend opens (a ``.gguf``; see
            :func:`qadapt.exporting.model_file.export_model_file`): OUT is then a file of the same format and
            ``to`` is left out.
        adapter: a qadapt checkpoint directory (``save_adapter``) or a PEFT adapter directory.
        out: the directory to write; ``AutoModelForCausalLM.from_pretrained(out)`` loads it as it is.
        to: (a model directory only) a float dtype (``float32``, ``bf16``, ``fp16``) or a target a backend declares
            (``qadapt.exporting.export_targets()``: ``nf4``, ``fp4``, ``int8`` with bitsandbytes).
        max_memory: cap on working memory (bytes or ``"2GiB"``); default ``MEMORY_MULTIPLE`` (8) float32 copies of the
            base's largest tensor. Checked for every layer before anything is written.
        max_shard_size: bytes of tensor data per output shard (transformers' default, ``"50GB"``).
        overwrite: replace an existing ``out`` directory (or symlink; never a file), in one atomic swap.
        backend_options: options for the target backend, over the target's and the base's own.
        requantize: the merge's requantize mode (``merge_storage``'s default when None).
        progress: show a progress bar (layers/s and bytes written).
        quantize_float_linears: for a float base and a quantized target, also quantize the float linears
            that were float when the adapter was trained (the checkpoint records them; by default they stay
            float, so the export is the model that was trained). The report gives each one's cost.
        calibration: a text or JSON Lines file (``{"text": ...}`` per line; tokenized with BASE's tokenizer),
            or batches of token ids (``[{"input_ids": [batch, seq]}, ...]``): merge each adapted layer
            against its inputs (``requantize="calibrated"`` by default), one decoder block at a time
            (transformers decoder models, quantized targets). The same batches give the codes
            ``merge(model, calibration=batches)`` gives in memory.
        calibration_tokens: tokens read from a calibration file at most (rows of 128, batches of 4 rows).
        sequential: feed each block's merged outputs to the next block (GPTQ's order), instead of the
            unmerged ones (what the in-memory merge gathers its statistics from).
        max_calibration_batches: batches used at most (as ``merge``).

    Every file is read inside ``base`` or ``adapter`` only (a symlink out of them, a FIFO or device,
    an index entry with ``..`` is refused); of BASE's other files only :data:`SIDE_FILES` are copied.
    On any failure nothing is written: ``out`` (absent, or the old one) is as it was.

    Raises:
        ConfigError: unknown target, bad options, ``out`` exists (without ``overwrite``), is not a directory,
            or is, holds or lies inside BASE or ADAPTER, or ``max_memory`` too small.
        CheckpointError: unreadable or hostile base or adapter files (naming the file and field), or an
            adapter that does not fit the base (every layer of another shape, with both shapes).
        CapabilityError: the target's backend cannot write checkpoints.
    """
    if is_model_file(base):  # a whole-model file (a .gguf): written back in its own format, layer by layer
        if calibration is not None:
            raise ConfigError(
                f"calibration= (--calibration) is not taken for a model file BASE ({str(base)!r}) yet: gather the "
                "statistics in memory and pass them to "
                "qadapt.exporting.model_file.export_model_file(calibration_stats=)"
            )
        if to is not None or backend_options or quantize_float_linears:
            raise ConfigError(
                f"BASE {str(base)!r} is a model file: OUT is written in BASE's own format, every layer in its own "
                "type; leave out to= (--to), backend options and quantize_float_linears"
            )
        return export_model_file(base, adapter, out, requantize=requantize, overwrite=overwrite, progress=progress)
    if to is None:
        raise ConfigError("to= (--to) is required for a model directory: a float dtype or a backend's export target")
    started = time.perf_counter()
    out = Path(out)
    # The arguments first (nothing is read), then the paths.
    if requantize is not None:
        check_requantize_mode(requantize)
    shard_size = parse_size(max_shard_size, "max_shard_size")
    if max_memory is not None:
        parse_size(max_memory, "max_memory")
    target = resolve_target(to, backend_options)
    if requantize is not None and target.dtype is not None:
        raise ConfigError(
            f"requantize={requantize!r} applies to quantized targets; target {to!r} is a float dtype (every layer is "
            "merged in float32 and cast, nothing is requantized): leave requantize out"
        )
    recovered = recover_stale(out)  # first: an OUT a killed overwrite left parked is back before it is checked
    base_dir, adapter_dir = InputDirectory(base, "BASE"), InputDirectory(adapter, "ADAPTER")
    check_out(out, {"BASE": base_dir.real, "ADAPTER": adapter_dir.real}, overwrite)
    source = read_adapter_source(adapter_dir)
    if not isinstance(quantize_float_linears, bool):
        raise ConfigError(f"quantize_float_linears must be True or False, got {quantize_float_linears!r}")
    check_calibration_options(calibration, target.dtype, sequential)
    check_limit(max_calibration_batches)
    plan, shared = make_plan(base_dir, source, target, max_memory, quantize_float_linears)
    side_files, left_out = _side_files(base_dir)
    calibrated = None
    if calibration is not None:
        batches = resolve_batches(calibration, base_dir, calibration_tokens, max_calibration_batches)
        calibrated = CalibratedRun(plan, base_dir, batches, sequential)
    with OutputSlot(out) as slot:
        writer = ShardWriter(slot.tmp, shard_size)
        try:
            quantized: dict[str, float] = {}
            results, qc = _run(plan, source, shared, writer, requantize, progress, quantized, calibrated)
            files = writer.finish()
        finally:
            writer.abort()
        _write_config(slot.tmp, plan, qc)
        for name in side_files:
            _copy_side_file(base_dir, name, slot.tmp)
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
            side_files,
            left_out,
            recovered,
            plan.kept_float,
            {name: quantized[name] for name in plan.quantized_float if name in quantized},
            source.float_linears is not None,
            None if calibrated is None else calibrated.batches.count,
            sequential,
            _no_data_advice(results) if calibrated is None and target.dtype is None else None,
        )
        (slot.tmp / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        slot.commit(overwrite)
    return report


#: An uncalibrated export to a quantized target that keeps less than this (median) says what keeps more.
ADVISE_BELOW = 0.5


def _no_data_advice(results: Mapping[str, MergeResult]) -> str | None:
    """The share an uncalibrated quantized export kept (weight space, median over merged layers) and what
    keeps more, when it is below :data:`ADVISE_BELOW` (also warned); else None."""
    kept = sorted(r.kept for r in results.values() if r.kept is not None and r.path != "storage")
    if not kept or kept[len(kept) // 2] >= ADVISE_BELOW:
        return None
    advice = (
        f"merged without calibration data: the layers kept {kept[len(kept) // 2]:.1%} of their adapter's effect "
        f"(weight space, median; lowest {kept[0]:.1%}): a fine-tune moves weights by less than a quantization step. "
        "To keep more: --calibration FILE (text like the fine-tune's, tokenized with BASE's tokenizer), a float "
        "target (--to bf16), or in memory merge(model, calibration=batches) / merge(model, calibration='self')"
    )
    warn(advice)
    return advice


def _side_files(base: InputDirectory) -> tuple[list[str], list[str]]:
    """``(side files to copy, other files of BASE left out)``; a listed file that is a symlink out of
    BASE, or not a regular file, is refused now, before anything is written."""
    present = sorted(p.name for p in base.real.iterdir() if not p.name.startswith("."))
    copy = [name for name in SIDE_FILES if name in present]
    for name in copy:
        base.open(name, f"BASE side file {name}")[0].close()
    weights = {name for name in present if name.endswith(".safetensors")}
    left_out = [name for name in present if name not in copy and name not in _REWRITTEN and name not in weights]
    return copy, left_out


def _copy_side_file(base: InputDirectory, name: str, directory: Path) -> None:
    """One side file copied by content, opened inside BASE only."""
    handle, _ = base.open(name, f"BASE side file {name}")
    with handle, open(directory / name, "xb") as target:
        shutil.copyfileobj(handle, target)


def _write_config(directory: Path, plan: Plan, qc: dict[str, Any] | None) -> None:
    config = dict(plan.base_config)
    config.pop("quantization_config", None)
    if plan.target.dtype is not None:
        name = str(plan.target.dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    elif qc is not None:
        if plan.float_skip:
            assert plan.target_backend is not None
            qc = {**qc, **plan.target_backend.float_modules_config(plan.float_skip)}
        config["quantization_config"] = qc
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _run(
    plan: Plan,
    source: AdapterSource,
    shared: nn.Module | None,
    writer: ShardWriter,
    requantize: str | None,
    progress: bool,
    quantized: dict[str, float],
    calibrated: CalibratedRun | None = None,
) -> tuple[dict[str, MergeResult], dict[str, Any] | None]:
    steps = StepWriter(plan, source, shared, writer, quantized)
    merge_kwargs = {} if requantize is None else {"requantize_mode": requantize}
    bar = tqdm(total=len(plan.steps), desc="qadapt export", unit="layer", disable=not progress, dynamic_ncols=True)
    try:
        if calibrated is not None:
            calibrated.run(steps, requantize, bar)
        else:
            for step in plan.steps:
                steps.write(step, merge_kwargs)
                steps.tick(bar)
    finally:
        bar.close()
    config = steps.config
    if plan.target_backend is not None and config is None:
        # Every quantized layer was copied as it was: the base's own config describes them.
        config = plan.base_qc
    return steps.results, config
