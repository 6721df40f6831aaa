"""qadapt side by side with PEFT 0.21.2 on the same bitsandbytes-quantized layers (``make bench``).

Runs every case (size d × backend × method) in a fresh subprocess, then writes to ``--out``
(default ``benchmarks/results/``): ``results.json`` (every figure), ``results.md`` (the tables)
and ``results.png`` (the ratios against the targets). After a run with the default cases it
also puts the tables into ``docs/benchmarks.md``. See that page for what is measured and how.

    python benchmarks/run.py                                   # the full run, < 10 min on 2 cores
    python benchmarks/run.py --sizes 1024 --methods oft        # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results"
DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
DOCS_START = "<!-- benchmark-results:start -->"
DOCS_END = "<!-- benchmark-results:end -->"

DEFAULT_SIZES = (1024, 2048, 4096)
DEFAULT_BACKENDS = ("bnb4", "bnb8")
DEFAULT_METHODS = ("oft", "randlora")
#: Fewer repeats where one call takes longest, to stay within the 10 minute budget.
DEFAULT_REPEATS = {1024: 5, 2048: 5, 4096: 3}
#: Drift takes 20 merge/unmerge cycles for each of three variants (PEFT's OFT unmerge inverts a
#: dense d×d matrix each time): about half of a full run already at d=1024 and 2048 together, so
#: the default runs it at 1024 only (the figures at 2048 were the same to two digits).
DEFAULT_DRIFT_SIZES = (1024,)
DEFAULT_CYCLES = (1, 5, 20)
WORKER_TIMEOUT_S = 300


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="square layer sizes d")
    p.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS), choices=DEFAULT_BACKENDS)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=DEFAULT_METHODS)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default: by size)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    p.add_argument("--drift-sizes", type=int, nargs="*", default=None, help="sizes that get the drift cycles")
    p.add_argument("--cycles", type=int, nargs="+", default=list(DEFAULT_CYCLES), help="drift checkpoints")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument(
        "--no-fast-quant", action="store_true", help="skip timing the fast 4-bit quantizer (saves its compilation)"
    )
    p.add_argument("--inline", action="store_true", help="run the cases in this process (no subprocesses)")
    p.add_argument(
        "--docs",
        choices=("auto", "always", "never"),
        default="auto",
        help="write the tables into docs/benchmarks.md (auto: only after a run of the default cases)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def repeats_for(d: int, override: int | None) -> int:
    if override is not None:
        return override
    return DEFAULT_REPEATS.get(d, 7 if d < 1024 else 3)


def case_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    drift_sizes = set(DEFAULT_DRIFT_SIZES if args.drift_sizes is None else args.drift_sizes)
    return [
        {
            "d": d,
            "backend_name": backend,
            "method_name": method,
            "repeats": repeats_for(d, args.repeats),
            "drift_cycles": sorted(set(args.cycles)) if d in drift_sizes else [],
            "memory": not args.no_memory,
            "warmup": args.warmup,
            "fast_quant": not args.no_fast_quant,
        }
        for d in args.sizes
        for backend in args.backends
        for method in args.methods
    ]


def run_spec_here(spec: dict[str, Any]) -> dict[str, Any]:
    from bench_case import run_case

    spec = dict(spec)
    spec["drift_cycles"] = tuple(spec["drift_cycles"])
    return run_case(spec.pop("d"), spec.pop("backend_name"), spec.pop("method_name"), **spec)


def run_spec_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "case.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        cmd += ["--result-file", str(result_file)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return _failed(spec, f"timed out after {WORKER_TIMEOUT_S} s")
        if proc.returncode != 0 or not result_file.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return _failed(spec, f"worker exited {proc.returncode}: " + " | ".join(tail))
        return json.loads(result_file.read_text())


def _failed(spec: dict[str, Any], error: str) -> dict[str, Any]:
    return {"d": spec["d"], "backend": spec["backend_name"], "method": spec["method_name"], "error": error}


def machine() -> dict[str, Any]:
    import bitsandbytes
    import peft
    import torch

    import qadapt

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = 0.0
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "peft": peft.__version__,
        "qadapt": qadapt.__version__,
    }


def is_default_run(args: argparse.Namespace) -> bool:
    return (
        sorted(args.sizes) == sorted(DEFAULT_SIZES)
        and sorted(args.backends) == sorted(DEFAULT_BACKENDS)
        and sorted(args.methods) == sorted(DEFAULT_METHODS)
        and args.repeats is None
        and args.drift_sizes is None
        and sorted(args.cycles) == sorted(DEFAULT_CYCLES)
        and not args.no_memory
        and args.warmup == 1
        and not args.no_fast_quant
    )


def update_docs(page: Path, markdown: str) -> None:
    """Replace what is between the result markers of ``page`` by ``markdown``."""
    text = page.read_text()
    if DOCS_START not in text or DOCS_END not in text:
        raise SystemExit(f"{page} lacks the markers {DOCS_START} / {DOCS_END}; add them where the tables go")
    head, rest = text.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    page.write_text(f"{head}{DOCS_START}\n{markdown}{DOCS_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_spec_here(json.loads(args.worker))
        args.result_file.write_text(json.dumps(result))
        return 0

    from measure import MEMORY_METHOD
    from report import render_markdown, render_plot

    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    specs = case_specs(args)
    cases = []
    for i, spec in enumerate(specs, 1):
        case_clock = time.perf_counter()
        case = run_spec_here(spec) if args.inline else run_spec_subprocess(spec)
        cases.append(case)
        status = f"error: {case['error']}" if "error" in case else "ok"
        print(
            f"[{i}/{len(specs)}] d={spec['d']} {spec['backend_name']} {spec['method_name']}: "
            f"{status} ({time.perf_counter() - case_clock:.0f} s)",
            flush=True,
        )
    run = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "total_seconds": time.perf_counter() - clock,
        "machine": machine(),
        "settings": {
            "repeats": {str(s["d"]): s["repeats"] for s in specs},
            "warmup": args.warmup,
            "drift_cycles": sorted(set(args.cycles)),
            "train_input": "[8, 128, d] float32",
            "memory_method": MEMORY_METHOD if not args.no_memory else "not measured",
            "isolation": "in-process" if args.inline else "one subprocess per case",
        },
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(run, indent=1) + "\n")
    markdown = render_markdown(run)
    (args.out / "results.md").write_text(markdown)
    render_plot(run, args.out / "results.png")
    if args.docs == "always" or (args.docs == "auto" and is_default_run(args)):
        update_docs(DOCS_PAGE, markdown)
        print(f"updated {DOCS_PAGE.relative_to(ROOT)}")
    print(markdown)
    print(f"wrote {args.out}/results.{{json,md,png}} in {run['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
