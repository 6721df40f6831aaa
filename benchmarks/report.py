"""Markdown tables and the PNG plot of a run (``results.json`` → ``results.md``, ``results.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from targets import MERGE_VS_FLOOR, OFT_MERGE_VS_PEFT, TRAIN_VS_PEFT, check_targets, label, ratio

MIB = 1024 * 1024


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _mib(value: Any) -> str:
    return f"{value / MIB:.0f}" if isinstance(value, (int, float)) else "—"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _rel(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return "0" if value == 0 else f"{value:.2e}"


class _Notes:
    """Footnotes for PEFT's errors: the table cell says ``crash ¹``, the note says what was raised."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def cell(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"PEFT fails [{self.texts.index(text) + 1}]"

    def render(self) -> list[str]:
        return [f"[{i}] `{text}`  " for i, text in enumerate(self.texts, 1)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(names: list[str]) -> list[str]:
    return [_row(names), _row(["---"] * len(names))]


def _case_cells(case: dict[str, Any]) -> list[str]:
    return [str(case["d"]), case["backend"], case["method"]]


def machine_line(run: dict[str, Any]) -> str:
    m = run["machine"]
    return (
        f"{m['cpu']} ({m['cpus']} CPUs, torch threads {m['torch_threads']}, {m['memory_gib']:.0f} GiB), "
        f"{m['platform']}; Python {m['python']}, torch {m['torch']}, bitsandbytes {m['bitsandbytes']}, "
        f"peft {m['peft']}, qadapt {m['qadapt']}"
    )


def render_markdown(run: dict[str, Any]) -> str:
    """The whole results page: machine, targets, then one table per figure."""
    notes = _Notes()
    cases = [c for c in run["cases"] if "error" not in c]
    failed = [c for c in run["cases"] if "error" in c]
    s = run["settings"]
    lines = [
        f"Run {run['started']} in {run['total_seconds']:.0f} s on: {machine_line(run)}.",
        "",
        f"Timed repeats per size {s['repeats']} (median after {s['warmup']} warm-up round(s), qadapt and PEFT "
        f"interleaved; {s['isolation']}); "
        f"input of the training step `{s['train_input']}`; peak memory: {s['memory_method']}.",
        "",
        "### Targets",
        "",
        *_header(["target", "status", "detail"]),
    ]
    lines += [_row([name, f"**{status}**", detail]) for name, status, detail in check_targets(run["cases"])]

    lines += [
        "",
        "### Merge time",
        "",
        "One layer; ratio = qadapt / PEFT; floor = the backend's dequantize + requantize alone; method math = the "
        "method's float merge alone (`merge_weight`: OFT's block rotation, RandLora's full-rank ΔW product).",
        "",
    ]
    lines += _header(
        [
            "d",
            "backend",
            "method",
            "qadapt",
            "PEFT",
            "ratio",
            "floor",
            "qadapt / floor",
            "PEFT / floor",
            "method math",
            "qadapt / (floor + math)",
        ]
    )
    for c in cases:
        m = c["merge"]
        peft = notes.cell(m["peft_error"]) if "peft_error" in m else _seconds(m.get("peft_s"))
        lines.append(
            _row(
                [
                    *_case_cells(c),
                    _seconds(m["qadapt_s"]),
                    peft,
                    _x(ratio(m["qadapt_s"], m.get("peft_s"))),
                    f"{_seconds(m['floor_s'])} ({_seconds(m['dequantize_s'])} + {_seconds(m['requantize_s'])})",
                    _x(ratio(m["qadapt_s"], m["floor_s"])),
                    _x(ratio(m.get("peft_s"), m["floor_s"])),
                    _seconds(m["method_math_s"]),
                    _x(ratio(m["qadapt_s"], m["floor_s"] + m["method_math_s"])),
                ]
            )
        )

    fast = [c for c in cases if "fast_requantize_s" in c["merge"]]
    if fast:
        lines += [
            "",
            "### Fast 4-bit requantize (`qadapt_bnb.fast_quant`, compiled lookup-table quantizer)",
            "",
            "Checked bit for bit against `bitsandbytes.functional.quantize_4bit` on each case's merged weight "
            "(codes, absmax and the double-quantization state). The `bnb4` backend uses it for CPU weights of "
            "2^20 elements or more (option `fast_requantize`), so the merge floor above already includes it.",
            "",
        ]
        lines += _header(
            ["d", "backend", "method", "bitsandbytes", "fast", "speed-up", "bit-identical", "floor: bnb → fast"]
        )
        for c in fast:
            m = c["merge"]
            lines.append(
                _row(
                    [
                        *_case_cells(c),
                        _seconds(m["bnb_requantize_s"]),
                        _seconds(m["fast_requantize_s"]),
                        _x(ratio(m["bnb_requantize_s"], m["fast_requantize_s"])),
                        {True: "yes", False: "**no**"}.get(m.get("fast_requantize_identical"), "—"),
                        f"{_seconds(m['bnb_floor_s'])} → {_seconds(m['fast_floor_s'])}",
                    ]
                )
            )

    lines += ["", "### Merge peak memory (MiB above the resident set before the merge)", ""]
    lines += _header(["d", "backend", "method", "qadapt", "PEFT", "ratio", "floor", "float weight"])
    for c in cases:
        m = c["merge"]
        peft = notes.cell(m["peft_error"]) if "peft_error" in m else _mib(m.get("peft_peak_bytes"))
        lines.append(
            _row(
                [
                    *_case_cells(c),
                    _mib(m.get("qadapt_peak_bytes")),
                    peft,
                    _x(ratio(m.get("qadapt_peak_bytes"), m.get("peft_peak_bytes"))),
                    _mib(m.get("floor_peak_bytes")),
                    _mib(m.get("float_weight_bytes")),
                ]
            )
        )

    lines += ["", f"### Training step (forward + backward, input `{s['train_input']}`)", ""]
    lines += _header(["d", "backend", "method", "qadapt", "PEFT", "ratio", "qadapt MiB", "PEFT MiB", "memory ratio"])
    for c in cases:
        t = c["train"]
        lines.append(
            _row(
                [
                    *_case_cells(c),
                    _seconds(t["qadapt_s"]),
                    _seconds(t["peft_s"]),
                    _x(ratio(t["qadapt_s"], t["peft_s"])),
                    _mib(t.get("qadapt_peak_bytes")),
                    _mib(t.get("peft_peak_bytes")),
                    _x(ratio(t.get("qadapt_peak_bytes"), t.get("peft_peak_bytes"))),
                ]
            )
        )

    drift_cases = [c for c in cases if c.get("drift")]
    if drift_cases:
        cycles = drift_cases[0]["drift"]["cycles"]
        after = " / ".join(str(n) for n in cycles)
        lines += [
            "",
            f"### Merge → unmerge drift (‖W_n − W_0‖ / ‖W_0‖ of the dequantized weight after {after} cycles)",
            "",
        ]
        lines += _header(["d", "backend", "method", "qadapt exact", "bit-identical", "qadapt inverse", "PEFT"])
        for c in drift_cases:
            dr = c["drift"]

            def series(figures: Any) -> str:
                if isinstance(figures, str):
                    return notes.cell(figures)
                return " / ".join(_rel(figures[str(n)] if str(n) in figures else figures.get(n)) for n in cycles)

            peft = dr["peft"]
            peft_cell = notes.cell(c["merge"]["peft_error"]) if "peft_error" in c["merge"] else series(peft)
            lines.append(
                _row(
                    [
                        *_case_cells(c),
                        series(dr["exact"]),
                        "yes" if dr["exact_bit_identical"] else "**no**",
                        series(dr["inverse"]),
                        peft_cell,
                    ]
                )
            )

    lines += [
        "",
        "### Merge error (‖deq(stored) − W′‖ / ‖W′‖ against the exact float merged weight W′)",
        "",
        "`requantize` is the error of quantizing W′ itself, the least any merge into the format can have. "
        "The last two columns compare each side's merged forward with its own unmerged forward.",
        "",
    ]
    lines += _header(
        [
            "d",
            "backend",
            "method",
            "requantize",
            "qadapt",
            "PEFT",
            "qadapt merged vs unmerged",
            "PEFT merged vs unmerged",
        ]
    )
    for c in cases:
        a = c["accuracy"]
        crash = a.get("peft_merge_crash")
        lines.append(
            _row(
                [
                    *_case_cells(c),
                    _rel(a["requantize_error"]),
                    _rel(a["qadapt_merge_error"]),
                    notes.cell(crash) if crash else _rel(a.get("peft_merge_error")),
                    _rel(a["qadapt_merged_vs_unmerged_forward"]),
                    notes.cell(crash) if crash else _rel(a.get("peft_merged_vs_unmerged_forward")),
                ]
            )
        )
    same = max((c["accuracy"]["unmerged_forward_qadapt_vs_peft"] for c in cases), default=0.0)
    lines += [
        "",
        f"Both sides compute the same adapted layer: unmerged forwards differ by at most {_rel(same)} (relative).",
    ]
    if failed:
        lines += ["", "Cases the harness could not run:", ""]
        lines += [f"- {label(c)}: `{c['error']}`" for c in failed]
    if notes.texts:
        lines += ["", "PEFT errors:", "", *notes.render()]
    return "\n".join(lines) + "\n"


def render_plot(run: dict[str, Any], path: Path) -> None:
    """Four panels of qadapt / PEFT (or / floor) ratios per case, with the targets drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in run["cases"] if "error" not in c]
    names = [f"{c['d']}\n{c['backend']}\n{c['method']}" for c in cases]

    def oft_target(c: dict[str, Any]) -> float | None:
        return OFT_MERGE_VS_PEFT.get(c["d"]) if c["method"] == "oft" else None

    panels = [
        (
            "merge time: qadapt / PEFT (targets: OFT at 2048 and 4096)",
            [ratio(c["merge"]["qadapt_s"], c["merge"].get("peft_s")) for c in cases],
            [oft_target(c) for c in cases],
        ),
        (
            f"merge time: qadapt / floor (target {MERGE_VS_FLOOR})",
            [ratio(c["merge"]["qadapt_s"], c["merge"]["floor_s"]) for c in cases],
            [MERGE_VS_FLOOR] * len(cases),
        ),
        (
            f"training step time: qadapt / PEFT (target {TRAIN_VS_PEFT})",
            [ratio(c["train"]["qadapt_s"], c["train"]["peft_s"]) for c in cases],
            [TRAIN_VS_PEFT] * len(cases),
        ),
        (
            f"training step peak memory: qadapt / PEFT (target {TRAIN_VS_PEFT})",
            [ratio(c["train"].get("qadapt_peak_bytes"), c["train"].get("peft_peak_bytes")) for c in cases],
            [TRAIN_VS_PEFT] * len(cases),
        ),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 0.9 * len(cases) + 3), 8), constrained_layout=True)
    for ax, (title, values, targets) in zip(axes.flat, panels, strict=True):
        heights = [v if v is not None else 0.0 for v in values]
        colors = [
            "tab:gray" if t is None or v is None else ("tab:green" if v <= t else "tab:red")
            for v, t in zip(values, targets, strict=True)
        ]
        ax.bar(range(len(cases)), heights, color=colors)
        for i, v in enumerate(values):
            ax.text(i, heights[i], "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom", fontsize=7)
            if targets[i] is not None:
                ax.hlines(targets[i], i - 0.45, i + 0.45, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(cases)), names, fontsize=7)
        ax.set_title(title, fontsize=10)
    axes.flat[0].text(
        0.01, 0.98, "dashes: target; gray: no target", transform=axes.flat[0].transAxes, va="top", fontsize=8
    )
    fig.suptitle(f"qadapt vs PEFT {run['machine']['peft']} — {run['machine']['cpu']}", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
