"""A calibrated export: the plan's steps run block by block, each adapted layer merged against its inputs.

:func:`resolve_batches` turns ``export(calibration=...)`` (a text or JSON Lines file, tokenized with
BASE's tokenizer; or batches of token ids) into fit and held-out batches, split as the in-memory
merge splits them. :class:`CalibratedRun` then writes the steps outside the decoder blocks as the
plain export does, and for each block: builds its linear layers from the checkpoint and the
adapter (the model as trained: adapter on, unmerged), runs the calibration hidden states through
the block (:class:`~qadapt.exporting.blockwise.DecoderRunner`), merges each adapted layer with its
statistics (``requantize="calibrated"`` by default), writes the block, and feeds the block's
outputs (unmerged, or merged with ``sequential``) to the next block.

Given the same batches and the same base, every layer's statistics are those the in-memory
``merge(model, calibration=batches)`` gathers (the same blocks on the same inputs, the same
statistics code), so the written codes are the in-memory merge's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from qadapt.errors import CheckpointError, ConfigError, shorten, warn
from qadapt.exporting.blockwise import DecoderRunner, parameters_on_meta
from qadapt.exporting.plan import Plan, Step, build_model
from qadapt.exporting.steps import Prepared, StepWriter, Written, prepare_layer
from qadapt.formats.calibration_text import DEFAULT_CALIBRATION_TOKENS, calibration_batches
from qadapt.formats.hf_checkpoint import read_tensors
from qadapt.formats.local_files import InputDirectory
from qadapt.model.calibration import MIN_ROWS_PER_FEATURE, Batches, LayerStats, split_batches
from qadapt.protocols import Backend, BaseLayer, Method, QuantizedWeight

#: BASE files a transformers tokenizer is read from (at least one must be there).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(base: InputDirectory) -> Any:
    """BASE's own tokenizer (local files only, no remote code).

    Raises:
        ConfigError: BASE has no tokenizer files.
        CheckpointError: transformers cannot load them.
    """
    if not any(base.is_file(name) for name in TOKENIZER_FILES):
        raise ConfigError(
            f"calibration: BASE {base} has no tokenizer ({', '.join(TOKENIZER_FILES)}); a calibration file is "
            "tokenized with BASE's own tokenizer. Put it there, or pass batches of token ids "
            "(export(calibration=[...]))"
        )
    for name in TOKENIZER_FILES:  # refuse a tokenizer file that is a symlink out of BASE, a FIFO, ...
        if base.lexists(name):
            base.open(name, f"BASE tokenizer file {name}")[0].close()
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(base.real), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a bad tokenizer
        raise CheckpointError(f"calibration: BASE {base}'s tokenizer cannot be loaded: {shorten(exc, 300)}") from exc


def resolve_batches(
    calibration: str | os.PathLike[str] | Iterable[Any], base: InputDirectory, tokens: int, max_batches: int
) -> Batches:
    """Fit and held-out batches from a calibration file (tokenized with BASE's tokenizer) or from batches."""
    if isinstance(calibration, (str, os.PathLike)):
        batches: Iterable[Any] = calibration_batches(calibration, load_tokenizer(base), tokens)
    else:
        if tokens != DEFAULT_CALIBRATION_TOKENS:
            raise ConfigError(
                "calibration_tokens applies to a calibration file; the batches given are used as they are"
            )
        batches = calibration
    found = split_batches(batches, max_batches)
    if found.limited:
        warn(f"calibration: used the first {found.count} batches (max_calibration_batches={found.limit})")
    return found


class _Adapted(nn.Module):
    """A layer as trained: the method's forward over the base module, in the input's dtype."""

    def __init__(self, backend: Backend, base: nn.Module, method: Method, adapter: nn.Module, in_features: int) -> None:
        super().__init__()
        self.backend, self.method, self.in_features = backend, method, in_features
        self.base, self.adapter = base, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.forward(self.adapter, x, BaseLayer(self.backend, module=self.base)).to(x.dtype)


class _Merged(nn.Module):
    """A merged layer: the backend's forward over the new storage (as a merged layer runs in memory)."""

    def __init__(self, backend: Backend, base: nn.Module) -> None:
        super().__init__()
        self.backend, self.base = backend, base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(self.base, x).to(x.dtype)


def module_of(
    backend: Backend, storage: QuantizedWeight, bias: torch.Tensor | None, shape: tuple[int, int]
) -> nn.Module:
    """``backend``'s module ``[in] -> [out]`` (``shape = (in, out)``) holding ``storage`` and ``bias``."""
    in_f, out_f = shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    module = backend.quantize(linear)
    backend.set_storage(module, storage)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    return module.eval()


class CalibratedRun:
    """The plan's steps, block by block with calibration (see the module docstring)."""

    def __init__(self, plan: Plan, base: InputDirectory, batches: Batches, sequential: bool) -> None:
        if plan.target_backend is None:
            raise ConfigError("calibration applies to quantized targets; a float target merges every layer exactly")
        self.plan, self.batches, self.sequential = plan, batches, sequential
        self._entries = {
            e.key: e for s in plan.steps for e in [*s.group.entries.values(), s.group.bias] if e is not None
        }
        self.model = build_model(base, plan.base_config, parameters_on_meta())
        self.runner = DecoderRunner(self.model, self._tensor, batches)
        #: layers that merged with too few rows / only zero inputs (warned once at the end).
        self.few: list[str] = []
        self.silent: list[str] = []
        self.uncalibrated: list[str] = []

    def _tensor(self, key: str) -> torch.Tensor | None:
        entry = self._entries.get(key)
        return None if entry is None else read_tensors([entry])[entry.key]

    def _block_steps(self) -> tuple[list[Step], list[list[Step]]]:
        """``(steps outside the blocks, each block's steps)`` in plan order."""
        names = [self.runner.block_name(i) for i in range(len(self.runner.blocks))]
        blocks: list[list[Step]] = [[] for _ in names]
        others: list[Step] = []
        for step in self.plan.steps:
            module = step.group.module
            index = next((i for i, n in enumerate(names) if module == n or module.startswith(n + ".")), None)
            (others if index is None else blocks[index]).append(step)
        return others, blocks

    def run(self, steps: StepWriter, requantize: str | None, bar: Any) -> None:
        others, blocks = self._block_steps()
        plain = {} if requantize is None else {"requantize_mode": requantize}
        for step in others:
            if step.adapted and step.action in ("merge", "quantize"):
                self.uncalibrated.append(step.group.module)
            steps.write(step, plain)
            steps.tick(bar)
        self.runner.start()
        for i, block in enumerate(blocks):
            self._block(i, block, steps, requantize, bar)
        self._warn()

    def _forward(self, step: Step, prepared: Prepared, shape: tuple[int, int]) -> nn.Module:
        """The layer as the model ran when the adapter was trained (adapter on, unmerged)."""
        backend, storage = prepared.backend, prepared.storage
        if prepared.start is not None:
            assert self.plan.target_backend is not None
            backend, storage = self.plan.target_backend, prepared.start
        module = module_of(backend, storage, self._bias(step), shape)
        if prepared.adapter is None:
            return module
        return _Adapted(backend, module, prepared.method, prepared.adapter, shape[0])

    def _bias(self, step: Step) -> torch.Tensor | None:
        bias = step.group.bias
        return None if bias is None else read_tensors([bias])[bias.key]

    def _shape(self, name: str) -> tuple[int, int]:
        linear = self.model.get_submodule(name)
        return linear.in_features, linear.out_features

    def _block(self, i: int, block: list[Step], steps: StepWriter, requantize: str | None, bar: Any) -> None:
        by_name = {s.group.module: s for s in block}
        linears = self.runner.linears(i)
        missing = [n for n in linears if n not in by_name or "weight" not in by_name[n].group.entries]
        if missing:
            raise CheckpointError(f"calibrated export: the base checkpoint has no weight for {missing[0]}")
        prepared = {n: prepare_layer(by_name[n], self.plan, steps.source, steps.shared) for n in linears}
        modules = {n: self._forward(by_name[n], prepared[n], self._shape(n)) for n in linears}
        gathered = [
            n for n in linears if prepared[n].adapter is not None and by_name[n].action in ("merge", "quantize")
        ]
        self.uncalibrated += [n for n in linears if prepared[n].adapter is not None and n not in gathered]
        stats = self.runner.gather(i, modules, gathered)
        merged: dict[str, nn.Module] = {}
        for step in block:
            name = step.group.module
            kwargs = self._merge_kwargs(name, stats.pop(name, None), requantize)
            written = steps.write(step, kwargs, prepared.pop(name, None))
            if self.sequential and name in modules:
                merged[name] = self._merged(step, written, modules[name], self._shape(name))
            steps.tick(bar)
        del modules
        if self.sequential:
            self.runner.feed(i, merged)
        self.runner.advance()

    def _merged(self, step: Step, written: Written | None, unmerged: nn.Module, shape: tuple[int, int]) -> nn.Module:
        """The layer as written: the merged storage (and bias), or the unmerged one for a copied layer."""
        if written is None or written.storage is None or not step.adapted:
            return unmerged
        tb = self.plan.target_backend
        assert tb is not None
        bias = written.bias if written.bias is not None else self._bias(step)
        return _Merged(tb, module_of(tb, written.storage, bias, shape))

    def _merge_kwargs(self, name: str, stats: LayerStats | None, requantize: str | None) -> dict[str, Any]:
        """The merge's arguments for one layer, as the in-memory calibrated merge chooses them."""
        mode = requantize or "calibrated"
        if stats is None:
            return {} if requantize is None else {"requantize_mode": requantize}
        in_f = stats.fit.shape[0]
        if mode == "calibrated" and stats.fit_rows < MIN_ROWS_PER_FEATURE * in_f:
            self.few.append(f"{name} ({stats.fit_rows} rows, in_features={in_f})")
            mode = "keep"
        elif mode == "calibrated" and not float(torch.diagonal(stats.fit).sum()) > 0:
            self.silent.append(name)
            mode = "keep"
        return {"requantize_mode": mode, "stats": stats.fit_stats(), "heldout": stats.heldout}

    def _warn(self) -> None:
        if self.few:
            warn(
                f"calibration: {len(self.few)} layer(s) had fewer than {MIN_ROWS_PER_FEATURE} x in_features fit rows, "
                f"where a calibrated requantize was measured to hurt; they kept their scales (first: {self.few[0]}). "
                "Give more calibration text (--calibration-tokens)"
            )
        if self.silent:
            warn(f"calibration: {len(self.silent)} layer(s) saw only zero inputs; they kept their scales")
        if self.uncalibrated:
            warn(
                f"calibration: {len(self.uncalibrated)} adapted layer(s) were merged without calibration (outside "
                f"the decoder blocks, or converted from another format; first: {self.uncalibrated[0]})"
            )


def check_calibration_options(calibration: Any, target_dtype: Any, sequential: Any) -> None:
    if not isinstance(sequential, bool):
        raise ConfigError(f"sequential must be True or False, got {shorten(sequential)}")
    if calibration is None:
        if sequential:
            raise ConfigError("sequential=True needs calibration (a calibration file or batches)")
        return
    if target_dtype is not None:
        raise ConfigError(
            "calibration applies to quantized targets (nf4, int8, ...); a float target merges every layer exactly: "
            "leave calibration out"
        )
    if isinstance(calibration, (Mapping, torch.Tensor, bytes)):
        raise ConfigError(
            f"calibration must be a file path or a list of token-id batches, got a single {type(calibration).__name__}"
        )
    if not isinstance(calibration, (str, os.PathLike)) and not isinstance(calibration, Iterable):
        raise ConfigError(f"calibration must be a file path or batches, got {type(calibration).__name__}")
