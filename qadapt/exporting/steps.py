"""One export step: read a layer (:func:`prepare_layer`), merge and write it (:func:`write_layer`).

:class:`StepWriter` runs steps against one shard writer, gathering the merge results and checking
that every quantized layer is written in one format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qadapt.errors import CheckpointError
from qadapt.exporting.adapter_source import AdapterSource
from qadapt.exporting.plan import Plan, Step, read_storage
from qadapt.formats.hf_checkpoint import ShardWriter, read_tensors
from qadapt.merging.engine import convert_weight, float_merged_weight, merge_storage, merged_bias
from qadapt.merging.figures import FigureSums, check_finite, weight_figures
from qadapt.merging.result import MergeResult
from qadapt.merging.rows import merge_rows_in_blocks
from qadapt.protocols import Backend, Method, QuantizedWeight
from qadapt.registry.reference import FloatBackend


def _quantize(backend: Backend, weight: torch.Tensor) -> QuantizedWeight:
    """``weight [out, in]`` in ``backend``'s format through its own ``quantize`` (as wrapping a float layer does)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return backend.get_storage(backend.quantize(linear))


@dataclass
class Prepared:
    """One layer read for its step: the reader's backend and storage, the layer's method and adapter,
    and for a quantized target the storage in the target's format the merge starts from (``start``)."""

    backend: Backend
    storage: QuantizedWeight
    method: Method
    adapter: nn.Module | None
    start: QuantizedWeight | None = None


@torch.no_grad()
def prepare_layer(step: Step, plan: Plan, source: AdapterSource, shared: nn.Module | None) -> Prepared:
    """Read ``step``'s layer from the checkpoint and its adapter (None when not adapted)."""
    group = step.group
    tensors = read_tensors(group.entries.values())
    if group.float_weight:
        backend: Backend = FloatBackend()
        storage = QuantizedWeight({"weight": tensors[group.entries["weight"].key]})
    else:
        backend, storage = read_storage(group, tensors, plan.readers, plan.base_qc)
    del tensors
    method = source.method.for_layer(group.module) if step.adapted else source.method
    adapter = None
    if step.adapted:
        assert step.shape is not None
        adapter = source.adapter_for(group.module, step.shape, shared, backend, storage, method)
    start = None
    if plan.target.dtype is None and step.action == "merge":
        start = storage
    elif plan.target.dtype is None and step.action == "quantize":
        assert plan.target_backend is not None
        start = _quantize(plan.target_backend, storage.tensors["weight"])
    return Prepared(backend, storage, method, adapter, start)


@dataclass
class Written:
    """What a step wrote for one layer: its quantization config (quantized targets), the storage in the
    target's format (None for float targets) and the bias written (None: the base's own)."""

    config: dict[str, Any] | None
    storage: QuantizedWeight | None = None
    bias: torch.Tensor | None = None


@torch.no_grad()
def write_layer(
    step: Step,
    plan: Plan,
    source: AdapterSource,
    prepared: Prepared,
    writer: ShardWriter,
    results: dict[str, MergeResult],
    merge_kwargs: dict[str, Any],
    quantized: dict[str, float],
) -> Written:
    group, target = step.group, plan.target
    backend, storage, method, adapter = prepared.backend, prepared.storage, prepared.method, prepared.adapter
    prepared.storage = prepared.adapter = None  # type: ignore[assignment]  # held here only, freed as they go
    start, prepared.start = prepared.start, None
    assert step.shape is not None
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
        if step.action in ("merge", "quantize"):
            assert start is not None
            new = start
        if step.action == "quantize":
            weight_in = storage.tensors["weight"]
            if adapter is None:  # a float linear quantized as it is: what that costs
                error, _ = weight_figures(weight_in.float(), weight_in.float(), tb.dequantize(new), precision="float32")
                quantized[group.module] = error
        elif step.action == "convert":  # from another format, through the float (merged) weight, guarded like a merge
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
    written = Written(qc, None if target.dtype is not None else new)
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
            written.bias = new_bias.to(cast or bias.dtype)
            writer.add(group.bias.key, written.bias)
    return written


@dataclass
class StepWriter:
    """Writes plan steps into ``writer``: merge results per layer, and the one quantization config."""

    plan: Plan
    source: AdapterSource
    shared: nn.Module | None
    writer: ShardWriter
    quantized: dict[str, float]
    results: dict[str, MergeResult] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    def copy(self, step: Step) -> None:
        """A step that copies (or casts) its tensors as they are, in chunks."""
        group = step.group
        for entry in [*group.entries.values(), *([group.bias] if group.bias else [])]:
            cast = self.plan.target.dtype if step.action == "cast" and entry.is_float else None
            self.writer.add_streamed(entry.key, entry, cast)

    def write(self, step: Step, merge_kwargs: dict[str, Any], prepared: Prepared | None = None) -> Written | None:
        """Run ``step`` (``prepared``: its layer already read); what it wrote, None for a copy."""
        if step.action in ("copy", "cast"):
            self.copy(step)
            return None
        if prepared is None:
            prepared = prepare_layer(step, self.plan, self.source, self.shared)
        written = write_layer(
            step, self.plan, self.source, prepared, self.writer, self.results, merge_kwargs, self.quantized
        )
        produced = written.config
        if produced is not None:
            if self.config is None:
                self.config = produced
            elif produced != self.config:
                raise CheckpointError(
                    f"{step.group.module} would be written with quantization_config {produced}, other layers with "
                    f"{self.config}; one checkpoint holds one format"
                )
        return written

    def tick(self, bar: Any) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{self.writer.bytes_written / 2**20:,.0f} MiB written", refresh=False)
