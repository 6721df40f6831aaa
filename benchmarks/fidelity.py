"""What each merge keeps of a fine-tune, and what a calibrated merge costs (``make bench-fidelity``).

Part 1 runs the demo's distillation (the built-in 2-layer Llama, 4-bit and 8-bit) for each
method and backend, then merges each way: naive requantize (new scales, what bitsandbytes and
PEFT do), qadapt's default (scales kept), calibrated, a bf16 float target, and the ``scales``
method trained instead. The figure is the share of the method's KL gain the merged model keeps.

Part 2 times one layer's merge, keep-state vs calibrated, on d×d layers whose inputs have a few
strong outlier channels, and reports the calibrated merge's kept share beside the default's.

    python benchmarks/fidelity.py                       # both parts, writes benchmarks/results/fidelity.md
    python benchmarks/fidelity.py --sizes 1024 --steps 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"


def merge_table(methods: list[str], backends: list[str], steps: int, shift: float = 0.0) -> list[dict[str, Any]]:
    from qadapt.cli.demo import DemoSettings, run_demo

    rows = []
    for backend in backends:
        for method in methods:
            with tempfile.TemporaryDirectory() as tmp:
                settings = DemoSettings(method=method, backend=backend, steps=steps, out_dir=tmp, teacher_shift=shift)
                if method == "randlora":
                    settings.method_options = {"r": 8}
                result = run_demo(settings, verbose=False)
            row: dict[str, Any] = {"method": method, "backend": backend, "gap_recovered": result.gap_recovered}
            for merge in result.merges:
                row[merge.label] = merge.gain_kept
                row[merge.label + " (note)"] = merge.note
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _layer_with_stats(d: int, backend: str, seed: int = 0) -> tuple[nn.Module, Any, torch.Tensor]:
    import qadapt
    from qadapt.protocols import CalibrationStats

    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d, d)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d, d, generator=generator) / d**0.5)
    layer = qadapt.QuantAdapterLinear(linear, "oft", backend, method_options={"block_size": 32})
    with torch.no_grad():
        for param in layer.adapters["default"].parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.002)
    rows = 4 * d
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=generator)[:8]] = 20.0  # a few outlier channels, as real inputs have
    x = torch.randn(rows + rows // 4, d, generator=generator) * scale
    fit, held = x[:rows], x[rows:]
    return layer, CalibrationStats(fit.T @ fit, rows), held.T @ held


def calibrated_cost(sizes: list[int], backends: list[str]) -> list[dict[str, Any]]:
    rows = []
    for d in sizes:
        for backend in backends:
            layer, stats, heldout = _layer_with_stats(d, backend)
            figures: dict[str, Any] = {"d": d, "backend": backend}
            for mode in ("keep", "calibrated"):
                started = time.perf_counter()
                result = layer.merge(requantize=mode, stats=stats, heldout=heldout)
                figures[f"{mode}_s"] = time.perf_counter() - started
                figures[f"{mode}_kept"] = result.kept
                figures[f"{mode}_path"] = result.path
                layer.unmerge()
            rows.append(figures)
            print(json.dumps(figures), flush=True)
    return rows


def markdown(merges: list[dict[str, Any]], costs: list[dict[str, Any]]) -> str:
    lines = []
    if merges:
        labels = [k for k in merges[0] if k not in ("method", "backend", "gap_recovered") and not k.endswith("(note)")]
        lines += ["| method | backend | gap recovered | " + " | ".join(labels) + " |"]
        lines += ["|---" * (3 + len(labels)) + "|"]
        for row in merges:
            cells = ["n/a" if row[k] is None else f"{row[k]:+.1%}" for k in labels]
            lines.append(
                f"| {row['method']} | {row['backend']} | {row['gap_recovered']:.1%} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    if costs:
        lines += [
            "| d | backend | keep: s | keep: kept | calibrated: s | calibrated: kept |",
            "|---|---|---|---|---|---|",
        ]
        for row in costs:
            lines.append(
                f"| {row['d']} | {row['backend']} | {row['keep_s']:.2f} | {row['keep_kept']:.1%} | "
                f"{row['calibrated_s']:.2f} | {row['calibrated_kept']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["oft", "randlora"])
    p.add_argument("--backends", nargs="+", default=["bnb4", "bnb8"])
    p.add_argument("--steps", type=int, default=300, help="distillation steps per run")
    p.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096], help="layer sizes for the cost part")
    p.add_argument("--skip-merges", action="store_true", help="only the cost part")
    p.add_argument(
        "--teacher-shift", type=float, default=0.0, help="distil towards a shifted teacher (see qadapt demo --help)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    merges = [] if args.skip_merges else merge_table(args.methods, args.backends, args.steps, args.teacher_shift)
    costs = calibrated_cost(args.sizes, args.backends)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps({"merges": merges, "costs": costs}, indent=2))
    text = markdown(merges, costs)
    (args.out / "fidelity.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
