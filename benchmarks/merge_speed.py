"""Merge speed: qadapt's default merge beside PEFT 0.21.2's and the dequantize + requantize floor.

For OFT (block 32) and LoRA (r 16) on bitsandbytes nf4 (double quantization) and int8, at 2048^2
and 4096^2 (``--quick``: 1024^2, fewer repeats), both sides start from the same quantized layer
and identical adapters (``benchmarks/pairs.py``). Timed in one process, interleaved call by call
(A, B, C, A, B, C, ...: a slow phase of a loaded machine hits every figure), median of the repeats:

* ``qadapt``: ``QuantAdapterLinear.merge()`` (keep-state requantize, a fresh one beside it, the guard
  and the figures);
* ``peft``: PEFT's ``merge()`` on its bitsandbytes layer (a copy of the same module);
* ``floor``: the backend's dequantize + requantize alone; ``floor+math``: with the method's float
  merge math (what any merge must at least do).

Ratios: qadapt / PEFT and qadapt / floor. The load average is printed with them.

    python benchmarks/merge_speed.py            # 2048^2 and 4096^2, ~2-4 min on 2 cores
    python benchmarks/merge_speed.py --quick    # 1024^2, well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_case import _try  # noqa: E402
from measure import interleaved_medians  # noqa: E402
from pairs import build_pair  # noqa: E402

METHODS = ("oft", "lora")
FORMATS = {"nf4": "bnb4", "int8": "bnb8"}


def _nothing() -> None:
    return None


def measure_case(d: int, fmt: str, method: str, repeats: int) -> dict[str, Any]:
    """Median seconds of each figure for one case, interleaved, and the two ratios."""
    pair = build_pair(d, FORMATS[fmt], method)
    backend, original = pair.backend, pair.original
    adapter = pair.ours.adapters["default"]
    weight = backend.dequantize(original)
    pair.ours.eval()
    calls = {
        "qadapt_s": (pair.reset_ours, pair.ours.merge),
        "floor_s": (_nothing, lambda: backend.requantize(backend.dequantize(original), like=original)),
        "floor_math_s": (
            _nothing,
            lambda: backend.requantize(pair.method.merge_weight(adapter, backend.dequantize(original)), like=original),
        ),
    }
    pair.reset_peft()
    _, crash = _try(pair.peft_layer.merge)
    if crash is None:
        calls["peft_s"] = (pair.reset_peft, pair.peft_layer.merge)
    times: dict[str, Any] = interleaved_medians(calls, repeats, warmup=1)
    pair.reset_ours()
    result = pair.ours.merge()
    row: dict[str, Any] = {"d": d, "format": fmt, "method": method, **times, "path": result.path}
    row["vs_peft"] = times["qadapt_s"] / times["peft_s"] if "peft_s" in times else None
    row["vs_floor"] = times["qadapt_s"] / times["floor_s"]
    row["vs_floor_math"] = times["qadapt_s"] / times["floor_math_s"]
    if crash is not None:
        row["peft_error"] = crash
    del weight
    return row


def line(row: dict[str, Any]) -> str:
    peft = f"{1e3 * row['peft_s']:8.1f}" if "peft_s" in row else "  failed"
    vs_peft = f"{row['vs_peft']:5.2f}" if row["vs_peft"] is not None else "  n/a"
    return (
        f"{row['method']:5s} {row['format']:4s} {row['d']:5d}^2 | qadapt {1e3 * row['qadapt_s']:8.1f} ms | "
        f"PEFT {peft} ms | floor {1e3 * row['floor_s']:7.1f} ms | floor+math {1e3 * row['floor_math_s']:7.1f} ms | "
        f"qadapt/PEFT {vs_peft} | qadapt/floor {row['vs_floor']:5.2f} | qadapt/(floor+math) {row['vs_floor_math']:5.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024^2 only, 3 repeats")
    parser.add_argument("--sizes", type=int, nargs="*", help="override the sizes")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    sizes = args.sizes or ([1024] if args.quick else [2048, 4096])
    repeats = args.repeats or (3 if args.quick else 7)
    print(f"load average {os.getloadavg()[0]:.2f} at start, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for d in sizes:
        for fmt in FORMATS:
            for method in METHODS:
                rows.append(measure_case(d, fmt, method, repeats))
                print(line(rows[-1]), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
