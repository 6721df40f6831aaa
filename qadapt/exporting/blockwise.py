"""Calibration activations for a streamed export, one decoder block at a time (as GPTQ tools run them).

A calibrated merge needs each adapted layer's input statistics, which come from running the model.
The export never builds the model: :class:`DecoderRunner` builds a transformers decoder model's
skeleton from BASE's config (parameters on the meta device; buffers such as rotary frequencies
real), loads only what runs before the first block (the token embeddings), and catches the first
block's inputs for every calibration batch. Then, block by block, the caller hands it the block's
linear layers (built from the checkpoint and the adapter: the model as it was trained); the block's
other parameters are read from the checkpoint, the calibration hidden states run through it, and
each adapted layer's statistics are gathered with the same code as the in-memory merge
(:func:`qadapt.model.calibration.collect_stats`). The block's outputs, from the unmerged block (the
in-memory merge's statistics) or from the merged one (``sequential``), are the next block's inputs.

Memory: one block's weights, the embeddings, and the activations ``[batches, batch, seq, hidden]``
(twice: a block's inputs and outputs).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qadapt.errors import CapabilityError, CheckpointError, shorten
from qadapt.model.calibration import Batches, Indexed, LayerStats, collect_stats, eval_mode, run_model


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device and every buffer real (CPU).

    Non-persistent buffers (rotary frequencies) are computed at construction and are not in a
    checkpoint: they must be real; parameters come from the checkpoint, one block at a time.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class _Caught(Exception):
    """Raised by :class:`_Catcher` to stop the skeleton's forward at the first block."""


class _Catcher(nn.Module):
    """Stands in for the first decoder block: records its inputs and stops the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.caught: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise CapabilityError(
                "calibrated export: the decoder blocks take positional arguments besides the hidden states"
            )
        self.caught.append((hidden_states, kwargs))
        raise _Caught


def _set_tensor(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in as parameter or buffer ``key`` (dotted, relative to ``module``)."""
    owner_name, _, name = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[name] = tensor


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    owner_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(owner_name) if owner_name else module, child, new)


@dataclass
class _Input:
    """One calibration batch at a block: its position in the iterable, hidden states and block kwargs."""

    index: int
    hidden: torch.Tensor
    kwargs: dict[str, Any]

    def batch(self) -> dict[str, Any]:
        return {"hidden_states": self.hidden, **self.kwargs}


class DecoderRunner:
    """Runs calibration batches through a decoder model's blocks, one block in memory at a time.

    ``model``: the skeleton (parameters on meta, buffers real; :func:`parameters_on_meta`).
    ``tensor``: checkpoint key -> tensor (read on demand), None for a key the checkpoint lacks.
    """

    def __init__(self, model: nn.Module, tensor: Callable[[str], torch.Tensor | None], batches: Batches) -> None:
        self.model = model
        self.tensor = tensor
        self.batches = batches
        self.prefix, self.blocks = _decoder_blocks(model)
        _refuse_mixed_layer_types(model)
        self._inputs: list[_Input] = []
        self._outputs: list[torch.Tensor] = []

    def block_name(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def linears(self, i: int) -> list[str]:
        """The full names of block ``i``'s ``nn.Linear`` layers, in module order."""
        return [f"{self.block_name(i)}.{n}" for n, m in self.blocks[i].named_modules() if isinstance(m, nn.Linear)]

    @torch.no_grad()
    def start(self) -> None:
        """Load the modules before the first block and catch its inputs for every calibration batch."""
        output_embeddings = getattr(self.model, "get_output_embeddings", lambda: None)()
        skip = {id(m) for m in self.blocks.modules()} | ({id(output_embeddings)} if output_embeddings else set())
        for name, module in self.model.named_modules():
            if id(module) in skip:
                continue
            for pname, param in module.named_parameters(recurse=False):
                if param.device.type != "meta":
                    continue
                key = f"{name}.{pname}" if name else pname
                value = self.tensor(key)
                if value is None:
                    raise CheckpointError(f"the base checkpoint has no tensor {key}, which runs before the first block")
                _set_tensor(module, pname, value)
        catcher, first = _Catcher(), self.blocks[0]
        self.blocks[0] = catcher
        try:
            with eval_mode(self.model):
                for index, batch in [*self.batches.fit, *self.batches.heldout]:
                    try:
                        run_model(self.model, _no_cache(batch, index))
                    except _Caught:
                        pass
                    else:
                        raise CapabilityError("calibrated export: the model's forward never reached its first block")
        finally:
            self.blocks[0] = first
        order = [index for index, _ in [*self.batches.fit, *self.batches.heldout]]
        self._inputs = [_Input(i, h, kw) for i, (h, kw) in zip(order, catcher.caught, strict=True)]

    def _build(self, i: int, linears: Mapping[str, nn.Module]) -> nn.Module:
        """Block ``i`` with real tensors: ``linears`` (full name -> module) and the rest from the checkpoint."""
        block = copy.deepcopy(self.blocks[i])
        prefix = self.block_name(i)
        for rel in [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]:
            full = f"{prefix}.{rel}"
            if full not in linears:
                raise CheckpointError(f"calibrated export: no layer was built for {full}")
            _replace(block, rel, linears[full])
        for key, value in [*block.named_parameters(), *block.named_buffers()]:
            if value.device.type != "meta":
                continue
            found = self.tensor(f"{prefix}.{key}")
            if found is None:
                raise CheckpointError(f"the base checkpoint has no tensor {prefix}.{key}")
            _set_tensor(block, key, found)
        return block

    def _fit_and_heldout(self) -> tuple[list[Indexed], list[Indexed]]:
        n_fit = len(self.batches.fit)
        batches = [(x.index, x.batch()) for x in self._inputs]
        return batches[:n_fit], batches[n_fit:]

    @torch.no_grad()
    def gather(
        self, i: int, linears: Mapping[str, nn.Module], adapted: Sequence[str]
    ) -> dict[str, LayerStats]:
        """Run block ``i`` (built with ``linears``) on every batch; the statistics of the ``adapted`` layers.

        The block's outputs are kept as the next block's inputs (see :meth:`feed` to replace them).
        """
        block = self._build(i, linears)
        outputs: list[torch.Tensor] = []
        handle = block.register_forward_hook(lambda _m, _a, _k, out: outputs.append(_hidden(out)), with_kwargs=True)
        try:
            stats = collect_stats(
                block, [(n, linears[n]) for n in adapted], *self._fit_and_heldout(), stop_early=False
            )
        finally:
            handle.remove()
        if not adapted:  # collect_stats ran nothing: run the block for its outputs
            self.feed(i, linears, block)
        else:
            self._outputs = outputs
        return stats

    @torch.no_grad()
    def feed(self, i: int, linears: Mapping[str, nn.Module], block: nn.Module | None = None) -> None:
        """The next block's inputs: block ``i``'s outputs with ``linears`` (e.g. the merged layers)."""
        block = self._build(i, linears) if block is None else block
        with eval_mode(block):
            self._outputs = [_hidden(block(**x.batch())) for x in self._inputs]

    def advance(self) -> None:
        """Make the last block's outputs the inputs of the next one."""
        if len(self._outputs) != len(self._inputs):
            raise CapabilityError("calibrated export: a block did not give one output per calibration batch")
        self._inputs = [_Input(x.index, out, x.kwargs) for x, out in zip(self._inputs, self._outputs, strict=True)]
        self._outputs = []


def _no_cache(batch: Any, index: int) -> dict[str, Any]:
    """A keyword batch with ``use_cache=False`` (a cache would carry state from one block run to the next)."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch, "use_cache": False}
    if isinstance(batch, Mapping):
        return {**batch, "use_cache": False}
    raise CapabilityError(
        f"calibrated export takes batches of token ids (a tensor or a dict with 'input_ids'); batch {index} is a "
        f"{type(batch).__name__}"
    )


def _hidden(output: Any) -> torch.Tensor:
    """A decoder block's hidden states: the output itself or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CapabilityError(f"calibrated export: a decoder block returned a {type(output).__name__}, not hidden states")


def _decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, blocks)``: the ``nn.ModuleList`` of the model's ``config.num_hidden_layers`` decoder blocks."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and count and len(m) == count
    ]
    if len(found) != 1:
        raise CapabilityError(
            f"calibrated export runs transformers decoder models (one list of config.num_hidden_layers={count!r} "
            f"blocks); {type(model).__name__} has {len(found)} such lists. Merge in memory instead: "
            "qadapt.merge(model, calibration=batches)"
        )
    return found[0]


def _refuse_mixed_layer_types(model: nn.Module) -> None:
    """Blocks of several kinds (sliding and full attention) take different masks: the first block's
    inputs would be wrong for the others."""
    kinds = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(set(kinds)) > 1:
        raise CapabilityError(
            f"calibrated export: this model mixes decoder block kinds ({', '.join(sorted(map(str, set(kinds))))}), "
            f"which take different attention masks; calibrate in memory instead (qadapt.merge(model, "
            f"calibration=batches)). layer_types: {shorten(kinds)}"
        )
