"""The issue's targets, checked against a run's cases.

Each check returns ``(name, status, detail)`` with ``status`` one of ``met``, ``not met`` or
``not measured`` (the case was not part of the run, or PEFT failed on it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Case = dict[str, Any]
Check = tuple[str, str, str]

#: OFT merge time over PEFT's, per size.
OFT_MERGE_VS_PEFT = {2048: 0.5, 4096: 0.4}
#: Any merge over its floor (dequantize + requantize alone).
MERGE_VS_FLOOR = 1.2
#: Training step over PEFT's, time and peak memory.
TRAIN_VS_PEFT = 1.0


def ratio(numerator: Any, denominator: Any) -> float | None:
    """``numerator / denominator`` when both are positive numbers, else None."""
    if isinstance(numerator, (int, float)) and isinstance(denominator, (int, float)) and denominator > 0:
        return numerator / denominator
    return None


def label(case: Case) -> str:
    return f"d={case['d']} {case['backend']} {case['method']}"


def _bounded(name: str, cases: list[Case], value: Callable[[Case], float | None], bound: float) -> Check:
    figures = [(label(c), value(c)) for c in cases]
    measured = [(who, v) for who, v in figures if v is not None]
    if not measured:
        return name, "not measured", "no case of this run has the figure"
    failing = [f"{who}: {v:.3f}x" for who, v in measured if v > bound]
    worst_who, worst = max(measured, key=lambda item: item[1])
    missing = len(figures) - len(measured)
    tail = f"; {missing} case(s) without the figure" if missing else ""
    if failing:
        return name, "not met", f"{len(failing)} of {len(measured)} over {bound}x: " + ", ".join(failing) + tail
    return name, "met", f"all {len(measured)} at or under {bound}x (worst {worst:.3f}x, {worst_who}){tail}"


def check_targets(cases: list[Case]) -> list[Check]:
    """Every target of the issue that this run's cases can speak to."""
    ok = [c for c in cases if "error" not in c]
    checks: list[Check] = []
    for d, bound in OFT_MERGE_VS_PEFT.items():
        oft = [c for c in ok if c["method"] == "oft" and c["d"] == d]
        checks.append(
            _bounded(
                f"OFT merge <= {bound}x PEFT at d={d}",
                oft,
                lambda c: ratio(c["merge"]["qadapt_s"], c["merge"].get("peft_s")),
                bound,
            )
        )
    checks.append(
        _bounded(
            f"every merge <= {MERGE_VS_FLOOR}x its floor",
            ok,
            lambda c: ratio(c["merge"]["qadapt_s"], c["merge"]["floor_s"]),
            MERGE_VS_FLOOR,
        )
    )
    checks.append(
        _bounded(
            f"training step time <= {TRAIN_VS_PEFT}x PEFT",
            ok,
            lambda c: ratio(c["train"]["qadapt_s"], c["train"]["peft_s"]),
            TRAIN_VS_PEFT,
        )
    )
    checks.append(
        _bounded(
            f"training step peak memory <= {TRAIN_VS_PEFT}x PEFT",
            ok,
            lambda c: ratio(c["train"].get("qadapt_peak_bytes"), c["train"].get("peft_peak_bytes")),
            TRAIN_VS_PEFT,
        )
    )
    with_drift = [c for c in ok if c.get("drift")]
    if with_drift:
        bad = [
            label(c)
            for c in with_drift
            if not c["drift"]["exact_bit_identical"] or any(v != 0 for v in c["drift"]["exact"].values())
        ]
        status = "not met" if bad else "met"
        detail = ", ".join(bad) if bad else f"bit-identical after every cycle count in all {len(with_drift)} cases"
        checks.append(("exact unmerge drift == 0", status, detail))
    else:
        checks.append(("exact unmerge drift == 0", "not measured", "no drift cases in this run"))
    return checks
