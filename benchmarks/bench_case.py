"""Measure one case (size d, backend, method) on both sides; returns a JSON-ready dict.

Figures, all from the same process and the same quantized weights:

* ``merge``: median seconds of one merge, qadapt and PEFT; beside them the floor, i.e. the backend's
  dequantize and requantize alone, and the method's float math alone; peak extra memory of each.
* ``train``: median seconds of forward + backward on ``[8, 128, d]`` (the output's gradient is a
  fixed random tensor), peak extra memory of each.
* ``drift``: relative change ``||W_n - W_0|| / ||W_0||`` of the dequantized weight after ``n``
  merge → unmerge cycles, for qadapt ``exact`` and ``inverse`` and for PEFT.
* ``accuracy``: merge error ``||deq(stored) - W'|| / ||W'||`` against the exact float target ``W'``
  (the method applied to the dequantized original in float32), and how far each side's merged
  forward is from its own unmerged forward.

A PEFT call that raises is recorded as ``"<ErrorClass>: <message>"`` in place of its figure.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from measure import interleaved_medians, memory_probes_available, peak_bytes, prepare_memory_probes
from pairs import Pair, build_pair

TRAIN_BATCH = (8, 128)
CHECK_ROWS = 8


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def describe_error(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message[:160]}"


def _try(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    # The harness reports PEFT's failures instead of dying on them, whatever they are.
    try:
        return fn(), None
    except Exception as exc:
        return None, describe_error(exc)


class _SectionClock:
    """Wall time spent per section of a case (reported, so the budget of a run can be seen)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 2)
        self._last = now


def _clear_grads(module: torch.nn.Module) -> None:
    for param in module.parameters():
        param.grad = None


def run_case(
    d: int,
    backend_name: str,
    method_name: str,
    *,
    repeats: int,
    drift_cycles: tuple[int, ...] = (),
    memory: bool = True,
    warmup: int = 1,
    fast_quant: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """All figures for one case (see the module docstring)."""
    warnings.filterwarnings("ignore")
    torch.manual_seed(seed)
    pair = build_pair(d, backend_name, method_name, seed=seed)
    generator = torch.Generator().manual_seed(seed + 2)
    check_x = torch.randn(CHECK_ROWS, d, generator=generator)
    train_x = torch.randn(*TRAIN_BATCH, d, generator=generator)
    train_grad = torch.randn(*TRAIN_BATCH, d, generator=generator)

    result: dict[str, Any] = {"d": d, "backend": backend_name, "method": method_name, "repeats": repeats}
    clock = _SectionClock()
    result["accuracy"] = _accuracy(pair, check_x)
    peft_ok = "peft_merge_crash" not in result["accuracy"]
    clock.lap("accuracy")
    result["merge"] = _merge_times(pair, repeats, warmup, peft_ok=peft_ok, fast_quant=fast_quant)
    clock.lap("merge")
    result["train"] = _train_times(pair, train_x, train_grad, repeats, warmup)
    clock.lap("train")
    result["drift"] = _drift(pair, drift_cycles, peft_ok=peft_ok) if drift_cycles else None
    clock.lap("drift")
    result["memory_measured"] = memory and memory_probes_available()
    if result["memory_measured"]:
        prepare_memory_probes()
        result["merge"].update(_merge_memory(pair, peft_ok=peft_ok))
        result["train"].update(_train_memory(pair, train_x, train_grad))
        clock.lap("memory")
    result["section_seconds"] = clock.laps
    peft_merge_error = result["accuracy"].get("peft_merge_crash")
    if peft_merge_error is not None:
        result["merge"]["peft_error"] = peft_merge_error
    return result


# ------------------------------------------------------------------------------------------ accuracy


@torch.no_grad()
def _accuracy(pair: Pair, x: torch.Tensor) -> dict[str, Any]:
    backend, adapter = pair.backend, pair.ours.adapters["default"]
    original = backend.dequantize(pair.original)
    target = pair.method.merge_weight(adapter, original)
    out: dict[str, Any] = {}

    pair.reset_ours()
    y_ours = pair.ours(x)
    merged = pair.ours.merge()
    out["qadapt_merge_error"] = relative(backend.dequantize(backend.get_storage(pair.ours.base)), target)
    out["qadapt_delta_retained"] = merged.delta_retained
    out["qadapt_merged_vs_unmerged_forward"] = relative(pair.ours(x), y_ours)
    # The requantization error of the target itself: what any merge into this format must at least pay.
    out["requantize_error"] = relative(backend.dequantize(backend.requantize(target, like=pair.original)), target)
    pair.reset_ours()

    pair.reset_peft()
    y_peft = pair.peft_model(x)
    out["unmerged_forward_qadapt_vs_peft"] = relative(y_ours, y_peft)
    _, crash = _try(pair.peft_layer.merge)
    if crash is not None:
        out["peft_merge_crash"] = f"in merge: {crash}"
    else:
        # A merge can also "succeed" and leave storage that bitsandbytes cannot read back.
        read, crash = _try(lambda: (backend.dequantize(pair.peft_storage()), pair.peft_model(x)))
        if crash is not None:
            out["peft_merge_crash"] = f"after merge, reading the weight back: {crash}"
        else:
            out["peft_merge_error"] = relative(read[0], target)
            out["peft_merged_vs_unmerged_forward"] = relative(read[1], y_peft)
    pair.reset_peft()
    return out


# --------------------------------------------------------------------------------------------- merge


def _merge_calls(
    pair: Pair, peft_ok: bool, fast_quant: bool
) -> dict[str, tuple[Callable[[], None], Callable[[], object]]]:
    backend, original = pair.backend, pair.original
    weight = backend.dequantize(original)
    adapter = pair.ours.adapters["default"]

    def nothing() -> None:
        return None

    calls: dict[str, tuple[Callable[[], None], Callable[[], object]]] = {
        "qadapt_s": (pair.reset_ours, pair.ours.merge),
        "dequantize_s": (nothing, lambda: backend.dequantize(original)),
        "requantize_s": (nothing, lambda: backend.requantize(weight, like=original)),
        "method_math_s": (nothing, lambda: pair.method.merge_weight(adapter, weight)),
    }
    if peft_ok:
        calls["peft_s"] = (pair.reset_peft, pair.peft_layer.merge)
    fast = _fast_requantize(pair) if fast_quant else None
    if fast is not None:
        calls["fast_requantize_s"] = (nothing, lambda: fast(weight))
        plain = _fast_requantize(pair, bitsandbytes_own=True)
        calls["bnb_requantize_s"] = (nothing, lambda: plain(weight))
    return calls


def _fast_requantize(pair: Pair, bitsandbytes_own: bool = False) -> Callable[[torch.Tensor], Any] | None:
    """bnb4 only: the stretch goal's one-pass quantizer with the layer's settings (None where absent).

    With ``bitsandbytes_own``, bitsandbytes' ``quantize_4bit`` with the same settings instead (the
    backend itself uses the fast one for large weights, so its requantize is no baseline).
    """
    if pair.backend_name != "bnb4":
        return None
    try:
        import bitsandbytes.functional as bnbF

        from qadapt_bnb import fast_quant
    except ImportError:
        return None
    meta, data = pair.original.meta, pair.original.tensors["data"]
    quantize = bnbF.quantize_4bit if bitsandbytes_own else fast_quant.quantize_4bit

    def run(weight: torch.Tensor) -> Any:
        return quantize(
            weight,
            blocksize=meta["blocksize"],
            compress_statistics=meta["nested"],
            quant_type=meta["quant_type"],
            quant_storage=data.dtype,
        )

    return run


@torch.no_grad()
def _fast_requantize_identical(pair: Pair) -> bool | None:
    """Whether the fast quantizer gives bitsandbytes' bytes and state on this case's merged weight."""
    import bitsandbytes.functional as bnbF

    from qadapt_bnb import fast_quant

    fast = _fast_requantize(pair)
    if fast is None:
        return None
    meta, data = pair.original.meta, pair.original.tensors["data"]
    target = pair.method.merge_weight(pair.ours.adapters["default"], pair.backend.dequantize(pair.original))
    ref, ref_state = bnbF.quantize_4bit(
        target,
        blocksize=meta["blocksize"],
        compress_statistics=meta["nested"],
        quant_type=meta["quant_type"],
        quant_storage=data.dtype,
    )
    got, got_state = fast(target)
    same = fast_quant._same
    pieces = [(ref, got), (ref_state.absmax, got_state.absmax)]
    if ref_state.nested:
        pieces += [(ref_state.offset, got_state.offset), (ref_state.state2.absmax, got_state.state2.absmax)]
    return all(same(a, b) for a, b in pieces)


@torch.no_grad()
def _merge_times(pair: Pair, repeats: int, warmup: int, peft_ok: bool, fast_quant: bool) -> dict[str, Any]:
    times: dict[str, Any] = interleaved_medians(_merge_calls(pair, peft_ok, fast_quant), repeats, warmup)
    times["floor_s"] = times["dequantize_s"] + times["requantize_s"]
    if "fast_requantize_s" in times:
        times["fast_floor_s"] = times["dequantize_s"] + times["fast_requantize_s"]
        times["bnb_floor_s"] = times["dequantize_s"] + times["bnb_requantize_s"]
        times["fast_requantize_identical"] = _fast_requantize_identical(pair)
    pair.reset_ours()
    pair.reset_peft()
    return times


#: Peak-memory probes per figure; the median is reported (resident-set readings move by a few MiB).
MEMORY_PROBES = 3


def _median_peak(reset: Callable[[], None], call: Callable[[], object]) -> int:
    peaks = []
    for _ in range(MEMORY_PROBES):
        reset()
        peaks.append(peak_bytes(call))
    reset()
    return int(statistics.median(peaks))


@torch.no_grad()
def _merge_memory(pair: Pair, peft_ok: bool) -> dict[str, Any]:
    backend, original = pair.backend, pair.original
    out: dict[str, Any] = {
        "qadapt_peak_bytes": _median_peak(pair.reset_ours, pair.ours.merge),
        "floor_peak_bytes": _median_peak(
            lambda: None, lambda: backend.requantize(backend.dequantize(original), like=original)
        ),
    }
    if peft_ok:
        out["peft_peak_bytes"] = _median_peak(pair.reset_peft, pair.peft_layer.merge)
    out["float_weight_bytes"] = pair.d * pair.d * 4
    return out


# --------------------------------------------------------------------------------------------- train


def _train_calls(
    pair: Pair, x: torch.Tensor, grad: torch.Tensor
) -> dict[str, tuple[Callable[[], None], Callable[[], object]]]:
    def step(model: torch.nn.Module) -> Callable[[], object]:
        def run() -> None:
            model(x).backward(grad)

        return run

    return {
        "qadapt_s": (lambda: _clear_grads(pair.ours), step(pair.ours)),
        "peft_s": (lambda: _clear_grads(pair.peft_model), step(pair.peft_model)),
    }


def _train_times(pair: Pair, x: torch.Tensor, grad: torch.Tensor, repeats: int, warmup: int) -> dict[str, Any]:
    pair.reset_ours()
    pair.reset_peft()
    return dict(interleaved_medians(_train_calls(pair, x, grad), repeats, warmup))


def _train_memory(pair: Pair, x: torch.Tensor, grad: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (reset, call) in _train_calls(pair, x, grad).items():
        out[name.replace("_s", "_peak_bytes")] = _median_peak(reset, call)
    return out


# --------------------------------------------------------------------------------------------- drift


@torch.no_grad()
def _drift(pair: Pair, cycles: tuple[int, ...], peft_ok: bool) -> dict[str, Any]:
    backend = pair.backend
    original = backend.dequantize(pair.original)
    out: dict[str, Any] = {"cycles": list(cycles)}

    def run(cycle: Callable[[], None], storage: Callable[[], Any]) -> tuple[dict[int, float], bool]:
        figures: dict[int, float] = {}
        identical = True
        for n in range(1, max(cycles) + 1):
            cycle()
            if n in cycles:
                current = storage()
                identical = identical and current.equal(pair.original)
                figures[n] = relative(backend.dequantize(current), original)
        return figures, identical

    def ours_storage() -> Any:
        return backend.get_storage(pair.ours.base)

    def exact_cycle() -> None:
        pair.ours.merge(keep_snapshot=True)
        pair.ours.unmerge("exact")

    def inverse_cycle() -> None:
        pair.ours.merge(keep_snapshot=False)
        pair.ours.unmerge("inverse")

    pair.reset_ours()
    out["exact"], out["exact_bit_identical"] = run(exact_cycle, ours_storage)
    pair.reset_ours()
    out["inverse"], _ = run(inverse_cycle, ours_storage)
    pair.reset_ours()

    if peft_ok:

        def peft_cycle() -> None:
            pair.peft_layer.merge()
            pair.peft_layer.unmerge()

        pair.reset_peft()
        peft, crash = _try(lambda: run(peft_cycle, pair.peft_storage))
        out["peft"] = peft[0] if crash is None else crash
        pair.reset_peft()
    else:
        out["peft"] = "merge fails (see merge)"
    return out
