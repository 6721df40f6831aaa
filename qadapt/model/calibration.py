"""Calibration: each wrapped layer's input statistics, gathered from a few model inputs.

A calibration set is an iterable of model inputs (a tensor, a tuple of positional arguments, or a
mapping of keyword arguments, as the model takes them). Every fourth batch (or, with fewer than
four, the last one) is held out: the fit statistics choose codes, the held-out ones measure what
a merge kept, so the reported figure is not judged on the rows it was fit to.

For a layer with input rows ``x [in]``, the statistics are ``H = sum x x^T`` (float32 ``[in, in]``)
and the row count. ``||X E^T||^2 = tr(E H E^T)``, so H turns a weight error ``E [out, in]`` into
the output error on those rows.

At most ``limit`` batches are read from the iterable (:data:`DEFAULT_MAX_BATCHES`; an endless data
loader is never read to its end), and a batch that makes any layer's statistics non-finite (NaN
or infinite inputs, or inputs whose squares overflow float32) is refused with its index and the
layer's name.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qadapt.errors import ArgumentTypeError, ConfigError, InputError
from qadapt.protocols import CalibrationStats

#: Calibrated requantization hurt below this many fit rows per input feature (measured).
MIN_ROWS_PER_FEATURE = 4
#: Calibration batches read at most (``merge(max_calibration_batches=...)``).
DEFAULT_MAX_BATCHES = 256
#: One calibration batch and its position in the iterable (0-based), named in errors.
Indexed = tuple[int, Any]


@dataclass(frozen=True)
class Batches:
    """The calibration batches read: fit and held-out ones with their positions, and whether the
    iterable was cut at the limit (``limited``: it had more, or may have: a generator at the limit)."""

    fit: list[Indexed]
    heldout: list[Indexed]
    limited: bool
    limit: int

    @property
    def count(self) -> int:
        return len(self.fit) + len(self.heldout)


@dataclass
class LayerStats:
    """Fit and held-out input statistics of one layer (each ``H [in, in]`` float32 and a row count)."""

    fit: torch.Tensor
    fit_rows: int
    heldout: torch.Tensor
    heldout_rows: int

    def fit_stats(self, damp: float = 0.01) -> CalibrationStats:
        return CalibrationStats(self.fit, self.fit_rows, damp)


def check_limit(limit: object) -> int:
    """``limit`` if it is a whole number of batches >= 2."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
        raise ConfigError(f"max_calibration_batches must be a whole number of batches >= 2, got {limit!r}")
    return limit


def split_batches(batches: Iterable[Any], limit: int = DEFAULT_MAX_BATCHES) -> Batches:
    """The first ``limit`` batches of ``batches``, every fourth held out (the last one when there are 2 or 3).

    Raises:
        ArgumentTypeError: not an iterable of model inputs.
        ConfigError: fewer than 2 batches, or a bad ``limit``.
    """
    check_limit(limit)
    if isinstance(batches, (torch.Tensor, Mapping, str, bytes)):
        raise ArgumentTypeError(
            "calibration must be an iterable of model inputs (e.g. a list of batches), "
            f"got a single {type(batches).__name__}; wrap it in a list of at least two batches"
        )
    try:
        iterator = iter(batches)
    except TypeError:
        raise ArgumentTypeError(
            f"calibration must be an iterable of model inputs, got {type(batches).__name__}"
        ) from None
    items = list(enumerate(itertools.islice(iterator, limit)))
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    limited = len(items) == limit and (total is None or total > limit)
    if len(items) < 2:
        raise ConfigError(
            f"calibration needs at least 2 batches (one is held out to measure what the merge kept), got {len(items)}"
        )
    if len(items) < 4:
        return Batches(items[:-1], items[-1:], limited, limit)
    fit = [b for b in items if b[0] % 4 != 3]
    heldout = [b for b in items if b[0] % 4 == 3]
    return Batches(fit, heldout, limited, limit)


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one calibration batch (tensor, positional tuple/list, or keyword mapping)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def output_tensor(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``.logits``, ``["logits"]``, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ArgumentTypeError(
        f"cannot find logits in the model's output of type {type(output).__name__}; "
        "the model must return a tensor, an object with .logits, or a tuple whose first element is a tensor"
    )


@contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode (no dropout) and give every module its own mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_finite(stats: Mapping[str, LayerStats], index: int, held: bool) -> None:
    """Refuse batch ``index`` when it made a layer's statistics non-finite (checked on H's diagonal,
    ``sum x_j^2``: a NaN, an infinity or an overflowing square of any input shows there)."""
    for name, s in stats.items():
        h = s.heldout if held else s.fit
        if not bool(torch.isfinite(torch.diagonal(h)).all()):
            raise InputError(
                f"calibration batch {index} makes the input statistics of layer {name} non-finite: its inputs "
                "there hold NaN or infinite values, or values whose squares overflow float32 (|x| > 1.8e19); "
                "check that batch (and the model's outputs on it). Nothing was changed"
            )


class _StopForward(Exception):
    """Raised by the last statistics hook of a fit batch: nothing after the layers is needed."""


class _Gatherer:
    """The forward pre-hooks of :func:`collect_stats` and what they share.

    Layers fed the same input tensor (q/k/v, gate/up) take ``X^T X`` from one product: the hook
    keeps the last input and its product (a reference, so its memory cannot be reused meanwhile).
    Once the first batch showed every layer called exactly once, a batch whose logits are not wanted
    stops as soon as every layer has seen its input (the model's head and the layers after the last
    one are not run).
    """

    def __init__(self, stats: dict[str, LayerStats]) -> None:
        self.stats = stats
        self.heldout = self.cut = False
        self.last: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self.calls: dict[str, int] = {}
        self.once = False  # every layer called exactly once per batch (known after the first batch)

    def start_batch(self, held: bool, cut: bool) -> None:
        """A new batch (``held``: a held-out one; ``cut``: its forward may stop after the last layer)."""
        self.heldout, self.cut, self.last, self.calls = held, cut, None, {}

    def end_batch(self) -> None:
        self.once = self.once or (
            len(self.calls) == len(self.stats) and all(count == 1 for count in self.calls.values())
        )
        self.last = None

    def product(self, x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int]:
        """``(x^T x [in, in], rows)`` of a layer input ``x [..., in]``, shared with the previous layer's."""
        if self.last is not None and self.last[0] is x and self.last[1] == x._version:
            return self.last[2], x.numel() // in_features
        rows = x.detach().reshape(-1, in_features).float()
        product = rows.T @ rows
        self.last = (x, x._version, product)
        return product, rows.shape[0]

    def hook_for(self, name: str, in_features: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            product, rows = self.product(args[0], in_features)
            s = self.stats[name]
            if self.heldout:
                s.heldout.add_(product)
                s.heldout_rows += rows
            else:
                s.fit.add_(product)
                s.fit_rows += rows
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.once and self.cut and len(self.calls) == len(self.stats):
                raise _StopForward

        return hook


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    fit: Sequence[Indexed],
    heldout: Sequence[Indexed],
    outputs: list[torch.Tensor] | None = None,
    *,
    stop_early: bool = True,
) -> dict[str, LayerStats]:
    """Run the calibration batches through ``model`` and accumulate each layer's input statistics.

    ``layers``: ``(name, module)`` pairs whose inputs ``[..., in]`` are gathered (with forward
    pre-hooks, removed afterwards). Memory: two ``[in, in]`` float32 matrices per layer.
    ``fit`` / ``heldout``: ``(position, batch)`` pairs (:class:`Batches`). ``outputs``: a list to
    append the model's logits on each held-out batch to (float32, CPU), as :func:`model_outputs`
    gives them: the held-out pass runs anyway. ``stop_early``: a fit batch's forward may stop once
    every layer saw its input (False: every forward runs to its end, for callers that keep the
    model's outputs with their own hooks, as the calibrated export does with each block's).

    Raises:
        InputError: a batch made a layer's statistics non-finite, naming the batch and the layer.
    """
    stats: dict[str, LayerStats] = {}
    gatherer = _Gatherer(stats)
    handles = []
    try:
        for name, module in layers:
            in_f = module.in_features
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            zeros = lambda in_f=in_f, device=device: torch.zeros(in_f, in_f, device=device)  # noqa: E731
            stats[name] = LayerStats(zeros(), 0, zeros(), 0)
            handles.append(module.register_forward_pre_hook(gatherer.hook_for(name, in_f)))
        with eval_mode(model):
            for held, batches in ((False, fit), (True, heldout)):
                for index, batch in batches:
                    gatherer.start_batch(held, cut=stop_early and (not held or outputs is None))
                    try:
                        out = run_model(model, batch)
                    except _StopForward:
                        out = None
                    gatherer.end_batch()
                    if held and outputs is not None:
                        outputs.append(output_tensor(out).detach().float().cpu())
                    _check_finite(stats, index, held)
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Sequence[Indexed]) -> list[torch.Tensor]:
    """The model's logits on each ``(position, batch)`` (eval mode), float32 on the CPU."""
    with eval_mode(model):
        return [output_tensor(run_model(model, batch)).detach().float().cpu() for _, batch in batches]


def squared_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """``sum ||a_i - b_i||^2`` over paired output tensors, in float64."""
    return float(sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b, strict=True)))
