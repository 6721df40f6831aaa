"""Whole-model merges: :func:`merge`, :func:`unmerge`, :func:`unwrap` and the :class:`MergeReport`.

Each loops over the model's :class:`QuantAdapterLinear` layers. Preconditions are checked on every
layer before the first one is touched; a merge that fails at layer k puts layers 0..k-1 back, so
the model is as it was before the call.

With ``calibration`` (a few model inputs), :func:`merge` gathers each layer's input statistics,
lets backends that can choose codes against them (``requantize="calibrated"``), and reports the
share of the adapter's effect kept in output space: per layer on held-out rows, and for the whole
model on its outputs (logits).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from qadapt import registry
from qadapt.errors import AdapterStateError, ArgumentTypeError, CapabilityError, ConfigError, InputError, shorten, warn
from qadapt.merging.engine import check_requantize_mode, convert_weight, float_merged_weight, merged_bias
from qadapt.merging.figures import kept_share
from qadapt.merging.result import LayerFigures, MergeResult, RequantizeMode
from qadapt.model import integrations
from qadapt.model.calibration import (
    DEFAULT_MAX_BATCHES,
    MIN_ROWS_PER_FEATURE,
    LayerStats,
    check_limit,
    collect_stats,
    model_outputs,
    split_batches,
    squared_distance,
)
from qadapt.model.layer import DISABLED_MERGE, QuantAdapterLinear, UnmergeMode
from qadapt.model.layers import Layers, progress, refuse_merged, require_adapter, shared_state, wrapped_layers
from qadapt.model.self_calibration import self_calibration
from qadapt.model.transaction import Transaction, transaction
from qadapt.protocols import Backend

#: Layers whose merge keeps less than this share of their adapter's effect are warned about.
DEFAULT_WARN_BELOW = 0.5
#: Memory for calibration statistics (two ``[in, in]`` float32 matrices per layer) held at once.
DEFAULT_CALIBRATION_MEMORY = 2 * 1024**3


@dataclass(frozen=True)
class MergeReport(LayerFigures):
    """What a merge did: one :class:`MergeResult` per merged layer, and layers left unmerged.

    ``model_kept``: with calibration, the share of the adapters' effect on the model's outputs that
    the merged model keeps, ``1 - ||L_merged - L_adapted|| / ||L_adapted - L_base||`` over the
    held-out batches' logits (None without calibration).
    """

    adapter: str | None
    layers: dict[str, MergeResult]
    #: layer name -> why it was not merged (e.g. its backend cannot requantize).
    skipped: dict[str, str] = field(default_factory=dict)
    model_kept: float | None = None
    #: calibration batches used (fit + held out), and whether reading stopped at max_calibration_batches.
    calibration_batches: int | None = None
    calibration_limited: bool = False
    #: where the calibration came from: ``"batches"`` (given), ``"self"`` (the model's own text), None.
    calibration_source: str | None = None
    #: without calibration, when the merge kept little: the share it kept and what keeps more.
    advice: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every figure."""
        return {
            "adapter": self.adapter,
            "model_kept": self.model_kept,
            "max_error": self.max_error,
            "min_kept": self.min_kept,
            "layers": {name: dict(vars(r)) for name, r in self.layers.items()},
            "skipped": dict(self.skipped),
            "calibration_batches": self.calibration_batches,
            "calibration_limited": self.calibration_limited,
            "calibration_source": self.calibration_source,
            "advice": self.advice,
        }

    def __str__(self) -> str:
        text = f"merged {len(self.layers)} layer(s), max relative error {self.max_error:.3g}"
        metric = next((r.metric for r in self.layers.values()), "weight")
        if self.min_kept is not None:
            text += f", kept ({metric} space) min {self.min_kept:.3g} / median {self.median_kept:.3g}"
        if self.model_kept is not None:
            text += f", model outputs kept {self.model_kept:.3g}"
        if self.calibration_batches is not None:
            limit = " (stopped at max_calibration_batches)" if self.calibration_limited else ""
            own = " of its own text (self-calibrated)" if self.calibration_source == "self" else ""
            text += f"; calibrated on {self.calibration_batches} batch(es){own}{limit}"
        aware = sum(r.merge_aware for r in self.layers.values())
        if aware:
            text += f"; {aware} merge-aware layer(s) stored exactly as trained"
        if self.reverted:
            text += f"; {len(self.reverted)} layer(s) kept their old weights (the merge was worse than no adapter)"
        if self.skipped:
            text += f"; {len(self.skipped)} left unmerged"
        if self.advice:
            text += f"\n{self.advice}"
        return text


def _merge_plan(model: nn.Module, adapter_name: str | None, pending_only: bool) -> tuple[list, dict[str, str]]:
    """``(plan, skipped)``: the ``(name, layer, adapter)`` to merge; ``pending_only`` passes over merged layers
    (``unwrap``) instead of refusing them."""
    layers = wrapped_layers(model)
    if not pending_only:
        refuse_merged(layers, "merge")
    plan, skipped = [], {}
    for name, layer in layers:
        if layer.merged:
            continue
        adapter = adapter_name or layer.active_adapter
        if adapter is None or adapter not in layer.adapters:
            continue
        if not layer.backend.capabilities.requantize:
            skipped[name] = f"backend {layer.backend.name!r} cannot requantize; the adapter stays unmerged"
            continue
        plan.append((name, layer, adapter))
    if adapter_name is not None and not plan and not skipped:
        require_adapter(model, adapter_name)
    return plan, skipped


def _check_merge_arguments(
    requantize: Any, tune_scales: Any, warn_below: Any, calibration_memory: Any, max_batches: Any
) -> None:
    check_limit(max_batches)
    if requantize is not None:
        check_requantize_mode(requantize)
    if isinstance(tune_scales, bool) or not isinstance(tune_scales, int) or tune_scales < 0:
        raise ConfigError(f"tune_scales must be a whole number of steps >= 0, got {tune_scales!r}")
    if warn_below is not None and (
        isinstance(warn_below, bool) or not isinstance(warn_below, (int, float)) or not math.isfinite(warn_below)
    ):
        raise ConfigError(f"warn_below must be a finite number (a kept share, e.g. 0.5) or None, got {warn_below!r}")
    if isinstance(calibration_memory, bool) or not isinstance(calibration_memory, int) or calibration_memory <= 0:
        raise ConfigError(f"calibration_memory must be a positive number of bytes, got {calibration_memory!r}")


def _check_sequential(sequential: Any, calibration: Any) -> None:
    if isinstance(sequential, bool):
        if sequential and calibration is None:
            raise ConfigError("sequential needs calibration data: merge(model, calibration=batches, sequential=True)")
        return
    if not isinstance(sequential, int) or sequential < 1:
        raise ConfigError(f"sequential must be True, False or a number of runs >= 1, got {sequential!r}")
    if calibration is None:
        raise ConfigError("sequential needs calibration data: merge(model, calibration=batches, sequential=n)")


def _stat_groups(plan: list, budget: int, sequential: bool | int = False) -> list[list]:
    """Consecutive runs of the plan whose statistics (``2 * in^2 * 4`` bytes a layer) fit ``budget``;
    with ``sequential``, at least that many runs (``True``: one per layer)."""
    runs = len(plan) if sequential is True else max(1, int(sequential))
    per_run = -(-len(plan) // runs) if plan else 1
    groups: list[list] = [[]]
    used = 0
    for item in plan:
        need = 8 * item[1].in_features ** 2
        if groups[-1] and (used + need > budget or len(groups[-1]) >= per_run):
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += need
    return groups


@torch.no_grad()
def merge(
    model: nn.Module,
    safe: bool = True,
    adapter_name: str | None = None,
    keep_snapshot: bool = True,
    *,
    requantize: RequantizeMode | None = None,
    calibration: Iterable[Any] | Literal["self"] | None = None,
    tune_scales: int = 0,
    warn_below: float | None = DEFAULT_WARN_BELOW,
    calibration_memory: int = DEFAULT_CALIBRATION_MEMORY,
    max_calibration_batches: int = DEFAULT_MAX_BATCHES,
    sequential: bool | int = False,
) -> MergeReport:
    """Merge an adapter into every layer's quantized weight (each layer's active one by default).

    Args:
        safe: refuse non-finite merged weights (checked as stored).
        adapter_name: merge this adapter instead of each layer's active one.
        keep_snapshot: keep each layer's old storage for a bit-identical :func:`unmerge`; without,
            copies are still held until the whole merge succeeded (so a failure can be rolled back).
        requantize: ``"keep"`` (default without calibration: the layer's scales are kept bit for bit,
            only codes chosen, where the backend can; others requantize fresh), ``"calibrated"``
            (default with calibration: codes and scales chosen against each layer's inputs, where the
            backend can; others keep state), or ``"fresh"`` (the backend's plain quantizer, new scales:
            what bitsandbytes and PEFT do).
        calibration: an iterable of at least 2 model inputs (tensors, tuples of arguments, or keyword
            dicts). Every fourth batch (the last one when fewer than 4) is held out to measure. Read
            once, at most ``max_calibration_batches`` of it (an endless data loader is fine); the report
            says how many were used. A batch with NaN, infinite or overflowing inputs is refused, named.
            ``"self"``: text the adapted model writes itself (:func:`~qadapt.self_calibration`, seeded;
            16 batches of 4 x 128 tokens), for when you have no data.
        tune_scales: with calibration, refit each requantized layer's group scales towards the
            adapted layer with this many conjugate-gradient steps (backends with group scales).
        warn_below: warn when a layer keeps less than this share of its adapter's effect (None: never).
        calibration_memory: bytes of layer statistics held at once; layers are calibrated in runs
            that fit (later runs see the earlier layers already merged).
        max_calibration_batches: batches read from ``calibration`` at most (default 256; >= 2).
        sequential: with calibration, take each layer's inputs from the model with the layers before
            it already merged (GPTQ's order): ``True`` gathers statistics again before every layer,
            a number ``n`` in ``n`` runs of consecutive layers. Each run is one more pass over the
            calibration batches, cut after its last layer (``n`` runs cost about ``n / 2`` passes).

    Layers whose backend cannot requantize keep their adapter unmerged; the report lists them, with
    the reason. A layer whose requantized merge would be worse than no adapter keeps its old
    storage (``MergeResult.reverted``).

    Raises:
        AdapterStateError: an adapter is already merged somewhere, or adapters are disabled
            (nothing was changed).
        UnsafeMergeError / other: a layer failed; the layers merged before it were put back.
    """
    return _merge(
        model,
        safe=safe,
        adapter_name=adapter_name,
        keep_snapshot=keep_snapshot,
        requantize=requantize,
        calibration=calibration,
        tune_scales=tune_scales,
        warn_below=warn_below,
        calibration_memory=calibration_memory,
        max_calibration_batches=max_calibration_batches,
        sequential=sequential,
    )


def _merge(
    model: nn.Module,
    *,
    pending_only: bool = False,
    safe: bool = True,
    adapter_name: str | None = None,
    keep_snapshot: bool = True,
    requantize: RequantizeMode | None = None,
    calibration: Iterable[Any] | None = None,
    tune_scales: int = 0,
    warn_below: float | None = DEFAULT_WARN_BELOW,
    calibration_memory: int = DEFAULT_CALIBRATION_MEMORY,
    max_calibration_batches: int = DEFAULT_MAX_BATCHES,
    sequential: bool | int = False,
    into: Transaction | None = None,
) -> MergeReport:
    """:func:`merge`; with ``pending_only``, layers already merged are left as they are; ``into``: the
    caller's transaction."""
    _check_merge_arguments(requantize, tune_scales, warn_below, calibration_memory, max_calibration_batches)
    _check_sequential(sequential, calibration)
    if tune_scales and calibration is None:
        raise ConfigError("tune_scales needs calibration data: merge(model, calibration=batches, tune_scales=N)")
    plan, skipped = _merge_plan(model, adapter_name, pending_only)
    disabled = [name for name, layer, _ in plan if not layer.adapters_enabled]
    if disabled:
        raise AdapterStateError(f"cannot merge into {disabled[0]} (and {len(disabled) - 1} more): {DISABLED_MERGE}")
    if keep_snapshot:
        cannot = [n for n, layer, _ in plan if not layer.backend.capabilities.snapshot]
        if cannot:
            raise CapabilityError(f"backend of {cannot[0]} cannot snapshot its storage; merge with keep_snapshot=False")
    if skipped:
        warn(f"{len(skipped)} layer(s) left unmerged: {next(iter(skipped.values()))}")
    source = _calibration_source(calibration)
    if source == "self":
        calibration = self_calibration(model)
    mode: RequantizeMode = requantize or ("keep" if calibration is None else "calibrated")
    with transaction(model, into) as tx:
        batches = None
        if calibration is None:
            results = _merge_runs(model, [plan], mode, safe, keep_snapshot, None, 0, tx)
            model_kept = None
        else:
            batches = split_batches(calibration, max_calibration_batches)
            if batches.limited:
                warn(
                    f"calibration: used the first {batches.count} batches (max_calibration_batches="
                    f"{batches.limit}); the rest were not read"
                )
            fit, heldout = batches.fit, batches.heldout
            tx.keep_layers(layer for _, layer, _ in plan)
            for _, layer, _ in plan:
                layer.enable_adapters(False)
            try:
                base = model_outputs(model, heldout)
            finally:
                for _, layer, _ in plan:
                    layer.enable_adapters(True)
            groups = _stat_groups(plan, calibration_memory, sequential)
            adapted: list[torch.Tensor] = []  # the first run's held-out pass: the adapted model's outputs
            results = _merge_runs(model, groups, mode, safe, keep_snapshot, (fit, heldout, adapted), tune_scales, tx)
            merged = model_outputs(model, heldout)
            model_kept = kept_share(squared_distance(adapted, base), squared_distance(merged, adapted))
    names = {adapter for _, _, adapter in plan}
    report = MergeReport(
        names.pop() if len(names) == 1 else None,
        results,
        skipped,
        model_kept,
        None if batches is None else batches.count,
        batches is not None and batches.limited,
        source,
        _no_data_advice(results, warn_below) if calibration is None else None,
    )
    _warn_low(report, warn_below)
    return report


def _calibration_source(calibration: Any) -> str | None:
    """``"self"``, ``"batches"`` or None (no calibration); a string other than ``"self"`` is refused."""
    if calibration is None:
        return None
    if isinstance(calibration, str):
        if calibration != "self":
            raise ArgumentTypeError(
                f"calibration must be batches of model inputs or 'self', got a single str {shorten(calibration)}; "
                "for a text file use qadapt.calibration_batches(path, tokenizer)"
            )
        return "self"
    return "batches"


def _no_data_advice(results: dict[str, MergeResult], warn_below: float | None) -> str | None:
    """What a merge without calibration kept (weight space, median over layers) and how to keep more,
    when that is below ``warn_below``; None otherwise."""
    kept = sorted(r.kept for r in results.values() if r.kept is not None)
    if warn_below is None or not kept or kept[len(kept) // 2] >= warn_below:
        return None
    return (
        f"merged without calibration data: the layers kept {kept[len(kept) // 2]:.1%} of their adapter's effect "
        f"(weight space, median; lowest {kept[0]:.1%}): a fine-tune moves weights by less than a quantization step, "
        "so rounding without data returns mostly the old codes. To keep more: merge(model, calibration=batches) with "
        "a few of your own inputs; merge(model, calibration='self') when you have none (text the adapted model "
        "writes itself); `qadapt export --to ... --calibration FILE` for a model on disk; or a float target "
        "(unwrap(model, merge='float'))"
    )


def _warn_low(report: MergeReport, warn_below: float | None) -> None:
    if warn_below is None:
        return
    # A merge-aware layer stores what it trained with: its distance to the float merge is no loss.
    low = {
        n: r.kept
        for n, r in report.layers.items()
        if r.kept is not None and r.kept < warn_below and not r.merge_aware
    }
    if low:
        name, kept = min(low.items(), key=lambda item: item[1])
        calibrated = any(r.metric == "output" for r in report.layers.values())
        more = "more calibration batches" if calibrated else "a calibrated merge (merge(model, calibration=batches))"
        if report.advice is not None:
            warn(
                f"{len(low)} of {len(report.layers)} merged layer(s) keep less than {warn_below:.0%} of their "
                f"adapter's effect (lowest: {name}, {kept:.1%}); see the MergeReport. {report.advice}"
            )
            return
        warn(
            f"{len(low)} of {len(report.layers)} merged layer(s) keep less than {warn_below:.0%} of their adapter's "
            f"effect (lowest: {name}, {kept:.1%}); see the MergeReport. {more[0].upper() + more[1:]}, a method that "
            "trains group scales, or a float target (unwrap(model, merge='float')) keeps more"
        )


def _merge_runs(
    model: nn.Module,
    runs: list[list],
    mode: RequantizeMode,
    safe: bool,
    keep_snapshot: bool,
    calibration: tuple[list, list, list] | None,
    tune_scales: int,
    into: Transaction | None = None,
) -> dict[str, MergeResult]:
    """Merge the planned layers run by run (statistics gathered per run); all or nothing (``into``:
    the caller's transaction, which the caller undoes). ``calibration``: ``(fit, heldout, outputs)``,
    where the first run appends the (still unmerged) model's logits on the held-out batches to ``outputs``."""
    results: dict[str, MergeResult] = {}
    few: list[str] = []
    silent: list[str] = []
    with transaction(model, into) as tx:
        tx.keep_layers(layer for run in runs for _, layer, _ in run)
        for run in runs:
            stats: dict[str, LayerStats] = {}
            if calibration is not None:
                fit, heldout, outputs = calibration
                layers = [(n, layer) for n, layer, _ in run]
                stats = collect_stats(model, layers, fit, heldout, outputs if run is runs[0] else None)
            for name, layer, adapter in progress(run, "qadapt merge"):
                layer_stats = stats.pop(name, None)
                layer_mode, fit = mode, None
                if layer_stats is not None:
                    fit = layer_stats.fit_stats()
                    if mode == "calibrated" and layer_stats.fit_rows < MIN_ROWS_PER_FEATURE * layer.in_features:
                        few.append(f"{name} ({layer_stats.fit_rows} rows, in_features={layer.in_features})")
                        layer_mode = "keep"
                    elif mode == "calibrated" and not float(torch.diagonal(layer_stats.fit).sum()) > 0:
                        silent.append(name)  # every input it saw was 0: nothing to calibrate against
                        layer_mode = "keep"
                try:
                    results[name] = layer.merge(
                        safe=safe,
                        adapter_name=adapter,
                        keep_snapshot=keep_snapshot,
                        requantize=layer_mode,
                        stats=fit,
                        heldout=None if layer_stats is None else layer_stats.heldout,
                        tune_steps=tune_scales,
                    )
                except InputError as exc:
                    raise InputError(f"merging layer {name}: {exc}") from exc
    if few:
        warn(
            f"{len(few)} layer(s) had fewer than {MIN_ROWS_PER_FEATURE} x in_features calibration rows, where a "
            f"calibrated requantize was measured to hurt; they kept their scales instead (first: {few[0]}). "
            "Give more calibration batches"
        )
    if silent:
        warn(
            f"{len(silent)} layer(s) saw only zero inputs in the calibration batches, so there is nothing to "
            f"calibrate them against; they kept their scales instead (first: {silent[0]})"
        )
    return results


@torch.no_grad()
def unmerge(model: nn.Module, mode: UnmergeMode = "exact") -> None:
    """Take merged adapters back out of every layer (see :meth:`QuantAdapterLinear.unmerge`).

    If a layer fails, the layers unmerged before it are merged again, so the model keeps its state.
    """
    if mode not in ("exact", "inverse"):
        raise ConfigError(f"unmerge mode must be 'exact' or 'inverse', got {shorten(mode)}")
    merged = [(name, layer) for name, layer in wrapped_layers(model) if layer.merged]
    if not merged:
        raise AdapterStateError("no adapter is merged into this model; there is nothing to unmerge")
    with transaction(model) as tx:
        # Backends swap storage rather than write into it, so holding the merged storage costs no copy;
        # putting it back is bit-identical, where merging again would requantize an inverse-unmerged weight.
        tx.keep_layers(layer for _, layer in merged)
        for _, layer in progress(merged, "qadapt unmerge"):
            layer.unmerge(mode)


# --------------------------------------------------------------------------------------- unwrap

#: The attribute :func:`unwrap` leaves on the model with the merge's :class:`MergeReport`.
REPORT_ATTR = "qadapt_merge_report"


def _merged_float(layer: QuantAdapterLinear) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(W, W', adapter)``: the layer's unmerged dequantized weight and its exact float merged weight.

    A merged layer is taken from its snapshot when it kept one; without, from the merged storage
    (a merge the guard reverted left the base storage, which is merged again here in float).
    An unadapted layer gives ``W' = W`` and adapter ``"(none)"``.
    """
    state = layer.merged_state
    if state is None and layer.active_adapter is None:
        weight = layer.backend.dequantize_module(layer.base)
        return weight, weight, "(none)"
    if state is not None and state.reverted:
        # The guard kept the base: the storage is unmerged, so the float merge starts from it.
        storage, name = layer.backend.get_storage(layer.base), state.adapter
    elif state is not None:
        if state.snapshot is None:
            current = layer.backend.dequantize_module(layer.base)
            return current, current, state.adapter
        storage, name = state.snapshot, state.adapter
    else:
        storage, name = layer.backend.get_storage(layer.base), layer.active_adapter
    weight, merged = float_merged_weight(layer.backend, layer.methods[name], layer.adapters[name], storage)
    return weight, merged, name


def _biases(layer: QuantAdapterLinear, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(b, b')``: the layer's unmerged bias and the bias of its exact float merge with ``adapter`` (the
    same tensor for a method that leaves the bias, see :meth:`Method.merge_bias`), to go with
    :func:`_merged_float`'s ``(W, W')``."""
    bias = layer.bias_tensor
    state = layer.merged_state
    if adapter == "(none)" or bias is None:
        return bias, bias
    if state is not None and not state.reverted:
        if state.snapshot is None:  # W' = W: the merged layer as it is
            return bias, bias
        return (state.old_bias if state.bias_changed else bias), bias
    merged = merged_bias(layer.methods[adapter], layer.adapters[adapter], bias, name=adapter)
    return bias, (bias if merged is None else merged)


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=dtype).clone(), requires_grad=False)
    return linear


@torch.no_grad()
def _convert(
    layers: Layers, target: Backend | None, dtype: torch.dtype, safe: bool
) -> tuple[dict[str, nn.Module], dict[str, MergeResult]]:
    """Build each layer's replacement: a float ``nn.Linear`` (``target`` None) or ``target``'s module,
    through the engine's guarded conversion (:func:`~qadapt.merging.engine.convert_weight`)."""
    modules: dict[str, nn.Module] = {}
    results: dict[str, MergeResult] = {}
    for name, layer in progress(layers, "qadapt unwrap"):
        weight, merged, adapter = _merged_float(layer)
        base_bias, merged_b = _biases(layer, adapter)

        # convert_weight writes the merged weight, and the base weight for its guard: each with its bias.
        def bias_for(w: torch.Tensor, merged: torch.Tensor = merged, pair: tuple = (base_bias, merged_b)) -> Any:
            return pair[1] if w is merged else pair[0]

        if target is None:
            path = "float"

            def write(w: torch.Tensor, bias_for: Any = bias_for) -> nn.Module:
                return _float_linear(w, bias_for(w), dtype)

            def read(module: nn.Module) -> torch.Tensor:
                return module.weight.float()
        else:
            path, quantizer = f"to:{target.name or type(target).__name__}", target

            def write(w: torch.Tensor, bias_for: Any = bias_for, quantizer: Backend = quantizer) -> nn.Module:
                return quantizer.quantize(_float_linear(w, bias_for(w), torch.float32))

            def read(module: nn.Module, quantizer: Backend = quantizer) -> torch.Tensor:
                return quantizer.dequantize_module(module)

        modules[name], results[name] = convert_weight(
            weight,
            merged,
            write,
            read,
            name=adapter,
            path=path,
            what=f"merging adapter {adapter!r} of {name}",
            safe=safe,
            guard=adapter != "(none)",
        )
    return modules, results


def unwrap(
    model: nn.Module,
    merge: bool | Literal["float"] = True,
    *,
    dtype: torch.dtype = torch.float32,
    to: Backend | str | None = None,
    to_options: Any = None,
    **merge_options: Any,
) -> nn.Module:
    """Replace every adapter layer by a plain layer; returns the same model object.

    - ``merge=True``: merge each layer's active adapter into its quantized weight (layers already
      merged stay so), then put the quantized base layer back. ``merge_options`` go to :func:`merge`
      (``requantize``, ``calibration``, ``tune_scales``, ...).
    - ``merge=True, to="bnb8"`` (a backend name or instance; ``to_options`` its options): the exact
      float merged weight is quantized by that backend instead (another format).
    - ``merge="float"``: plain ``nn.Linear`` layers holding the exact merged weight in ``dtype``.
    - ``merge=False``: merged layers are unmerged exactly and the adapters dropped: the plain
      quantized model.

    The merge's :class:`MergeReport` is left on the model as ``model.qadapt_merge_report``. No
    qadapt module is left either way. On failure the model is as it was.
    """
    layers = wrapped_layers(model)
    if merge not in (True, False, "float"):
        raise ConfigError(f"merge must be True, False or 'float', got {merge!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if merge_options and (merge is not True or to is not None):
        raise ConfigError(
            f"merge options {sorted(merge_options)} apply only to unwrap(model, merge=True) into the layers' own "
            "backends, not to float or other-backend targets"
        )
    report: MergeReport | None = None
    replacements: dict[str, nn.Module]
    if merge is False and to is not None:
        raise ConfigError("to= names a merge target; it needs merge=True")
    with transaction(model) as tx:
        tx.keep_layers(layer for _, layer in layers)
        if merge == "float" or to is not None:
            target = None if merge == "float" else registry.instance("backends", to, to_options, label="to")
            replacements, results = _convert(layers, target, dtype, safe=True)
            report = MergeReport(None, results)
        elif merge:
            cannot = [n for n, layer in layers if not layer.merged and not layer.backend.capabilities.requantize]
            if cannot:
                raise CapabilityError(
                    f"cannot unwrap with merge=True: the backend of {cannot[0]} (and {len(cannot) - 1} more) cannot "
                    "requantize; use unwrap(model, merge=False) to drop the adapters, or merge='float'"
                )
            if any(not layer.merged and layer.active_adapter is not None for _, layer in layers):
                report = _merge(model, pending_only=True, into=tx, **merge_options)
            replacements = {name: layer.base for name, layer in layers}
        else:
            for _, layer in progress(layers, "qadapt unwrap"):
                if layer.merged:
                    layer.unmerge("exact")
            replacements = {name: layer.base for name, layer in layers}
        for name, _ in layers:
            tx.replace(name, replacements[name])
        shared_state(model).clear()
        to_name = None if to is None else (to if isinstance(to, str) else (to.name or type(to).__name__))
        integrations.after_unwrap(model, integrations.Unwrapped(merge, dtype, to_name))
    if report is not None:
        model.__dict__[REPORT_ATTR] = report
    return model
