"""qadapt beside PEFT 0.21.2 on a real pretrained model: SmolLM2-135M-Instruct (``make bench-real``).

Both sides start from the same model, loaded by transformers with a ``BitsAndBytesConfig`` (nf4
with double quantization, or int8), the way users load it; qadapt adopts those layers and PEFT
wraps them. Adapters: LoRA / DoRA r 16 (alpha 32) and OFT (block 32) on all seven projections.

* **Training step** (batch 2 x 128 tokens of stdlib docstrings, AdamW): median seconds, the two
  sides interleaved step by step in one process, and the peak RSS of one step
  (``benchmarks/measure.py``: VmHWM reset before the step).
* **Merge** of a LoRA fine-tune (the same steps on the same batches on both sides): seconds and
  held-out perplexity / gain kept for PEFT's ``merge_and_unload`` on 4-bit and each qadapt merge.
* **Export**: ``qadapt export BASE ADAPTER OUT --to nf4`` vs PEFT's load + ``merge_and_unload`` +
  ``save_pretrained``, each in its own process, wall time and peak RSS (``/usr/bin/time``).

These are CPU figures from a 2-core machine; the load average is recorded with them. Results go to
``benchmarks/results/real_model.json`` and the table into ``docs/benchmarks.md``.

    python benchmarks/real_model.py            # ~10-15 min on a quiet 2-core machine
    python benchmarks/real_model.py --quick    # fewer steps, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import measure  # noqa: E402

import qadapt  # noqa: E402
from qadapt.cli.real_demo import (  # noqa: E402
    HELDOUT_MODULES,
    TRAIN_MODULES,
    chunks,
    default_model_file,
    docstring_text,
    load_float_model,
    perplexity,
)

DOCS_PAGE = HERE.parent / "docs" / "benchmarks.md"
START, END = "<!-- real-model:start -->", "<!-- real-model:end -->"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [("lora", "nf4"), ("dora", "nf4"), ("oft", "nf4"), ("lora", "int8")]


def load_quantized(base: Path, kind: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        if kind == "nf4"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu", dtype=torch.float32)


def qadapt_side(base: Path, kind: str, method: str):
    model = load_quantized(base, kind)
    options = {"r": 16, "alpha": 32} if method in ("lora", "dora") else {"block_size": 32}
    qadapt.wrap(model, method=method, targets=TARGETS, method_options=options)
    return model


def peft_side(base: Path, kind: str, method: str):
    import peft

    model = load_quantized(base, kind)
    if method in ("lora", "dora"):
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=method == "dora")
    else:
        config = peft.OFTConfig(oft_block_size=32, r=0, target_modules=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def step_fn(model, rows: torch.Tensor, generator: torch.Generator):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def step() -> float:
        ids = rows[torch.randint(0, rows.shape[0], (2,), generator=generator)]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def training(base: Path, rows: torch.Tensor, steps: int) -> list[dict[str, Any]]:
    results = []
    for method, kind in CASES:
        sides = {"qadapt": qadapt_side(base, kind, method), "peft": peft_side(base, kind, method)}
        steps_of = {name: step_fn(m.train(), rows, torch.Generator().manual_seed(0)) for name, m in sides.items()}
        times: dict[str, list[float]] = {name: [] for name in sides}
        losses: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(steps + 1):
            for name, step in steps_of.items():  # interleaved: a slow phase of the machine hits both
                started = time.perf_counter()
                losses[name].append(step())
                if i:  # the first step warms up
                    times[name].append(time.perf_counter() - started)
        peak = {name: measure.peak_bytes(step) / 2**20 for name, step in steps_of.items()}
        row = {
            "method": method,
            "format": kind,
            "qadapt_s": statistics.median(times["qadapt"]),
            "peft_s": statistics.median(times["peft"]),
            "qadapt_peak_mib": peak["qadapt"],
            "peft_peak_mib": peak["peft"],
            "max_loss_difference": max(abs(a - b) for a, b in zip(losses["qadapt"], losses["peft"], strict=True)),
        }
        row["time_ratio"] = row["qadapt_s"] / row["peft_s"]
        results.append(row)
        print(json.dumps(row), flush=True)
        del sides, steps_of
    return results


def merges(base: Path, rows: torch.Tensor, heldout: torch.Tensor, steps: int, calibration: list) -> dict[str, Any]:
    q, p = qadapt_side(base, "nf4", "lora"), peft_side(base, "nf4", "lora")
    with qadapt.disable_adapters(q):
        base_ppl = perplexity(q, heldout)
    for model in (q, p):
        step = step_fn(model.train(), rows, torch.Generator().manual_seed(0))
        for _ in range(steps):
            step()
        model.eval()
    tuned = perplexity(q, heldout)
    out: dict[str, Any] = {"nf4_ppl": base_ppl, "unmerged_ppl": tuned, "peft_unmerged_ppl": perplexity(p, heldout)}

    def kept(ppl: float) -> float:
        return (base_ppl - ppl) / (base_ppl - tuned)

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = p.merge_and_unload()
    out["peft_merge_and_unload"] = {"s": time.perf_counter() - started, "ppl": perplexity(merged, heldout)}
    for label, options in (("qadapt_default", {}), ("qadapt_calibrated", {"calibration": calibration})):
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qadapt.merge(q, warn_below=None, **options)
        out[label] = {"s": time.perf_counter() - started, "ppl": perplexity(q, heldout)}
        qadapt.unmerge(q)
    for value in out.values():
        if isinstance(value, dict):
            value["kept"] = kept(value["ppl"])
    qadapt.save_adapter(q, base.parent / "adapter")
    q.save_pretrained(base.parent / "adapter")  # the PEFT files too, for the PEFT export side
    print(json.dumps(out), flush=True)
    return out


EXPORT_QADAPT = "import qadapt, sys; qadapt.export(sys.argv[1], sys.argv[2], sys.argv[3], to='nf4', progress=False)"
EXPORT_PEFT = """
import sys, torch, warnings
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
warnings.simplefilter("ignore")
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, device_map="cpu", dtype=torch.float32)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def export(base: Path) -> dict[str, Any]:
    out = {}
    for name, code in (("qadapt", EXPORT_QADAPT), ("peft", EXPORT_PEFT)):
        target = base.parent / f"export-{name}"
        started = time.perf_counter()
        result = subprocess.run(
            ["/usr/bin/time", "-f", "%M", sys.executable, "-c", code, str(base), str(base.parent / "adapter"),
             str(target)],
            capture_output=True, text=True, timeout=1800,
        )
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            out[name] = {"error": result.stderr[-800:]}
            continue
        out[name] = {"s": seconds, "peak_mib": int(result.stderr.strip().splitlines()[-1]) / 1024}
    print(json.dumps(out), flush=True)
    return out


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"Measured {data['when']} on {data['machine']} (load average at start {data['load']}); CPU figures.",
        "",
        "| method | format | qadapt step | PEFT step | ratio | qadapt peak | PEFT peak | max loss difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["training"]:
        lines.append(
            f"| {r['method']} | {r['format']} | {r['qadapt_s']:.2f} s | {r['peft_s']:.2f} s | {r['time_ratio']:.2f} | "
            f"{r['qadapt_peak_mib']:.0f} MiB | {r['peft_peak_mib']:.0f} MiB | {r['max_loss_difference']:.2g} |"
        )
    m = data["merges"]
    lines += [
        "",
        f"LoRA r 16 on nf4 after {data['merge_steps']} steps: held-out ppl nf4 {m['nf4_ppl']:.2f}, unmerged "
        f"{m['unmerged_ppl']:.2f} (PEFT unmerged {m['peft_unmerged_ppl']:.2f}).",
        "",
        "| merge | time | held-out ppl | gain kept |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("peft_merge_and_unload", "PEFT `merge_and_unload` (4-bit)"),
        ("qadapt_default", "qadapt `merge` (default)"),
        ("qadapt_calibrated", "qadapt `merge(calibration=...)`"),
    ):
        lines.append(f"| {label} | {m[key]['s']:.1f} s | {m[key]['ppl']:.2f} | {100 * m[key]['kept']:.1f} % |")
    e = data["export"]
    lines += ["", "| export to nf4 | wall time | peak RSS |", "|---|---|---|"]
    for name, label in (("qadapt", "`qadapt export`"), ("peft", "PEFT load + `merge_and_unload` + `save_pretrained`")):
        if "error" in e[name]:
            lines.append(f"| {label} | failed | {e[name]['error'].splitlines()[-1][:80]} |")
        else:
            lines.append(f"| {label} | {e[name]['s']:.1f} s | {e[name]['peak_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps and a 4-step fine-tune")
    args = parser.parse_args(argv)
    steps, merge_steps = (3, 4) if args.quick else (6, 30)
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="qadapt-bench-real-"))
    model, tokenizer = load_float_model(default_model_file())
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    rows = chunks(tokenizer, docstring_text(TRAIN_MODULES), 128)
    heldout = chunks(tokenizer, docstring_text(HELDOUT_MODULES), 128)[:24]
    generator = torch.Generator().manual_seed(1)
    calibration = [rows[p] for p in torch.randint(0, rows.shape[0], (16, 4), generator=generator)]
    del model
    measure.prepare_memory_probes()
    data = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load": f"{load:.1f}",
        "training": training(work / "base", rows, steps),
        "merge_steps": merge_steps,
        "merges": merges(work / "base", rows, heldout, merge_steps, calibration),
        "export": export(work / "base"),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "real_model.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    table = markdown(data)
    print(table)
    page = DOCS_PAGE.read_text(encoding="utf-8")
    if START in page and not args.quick:
        head, rest = page.split(START, 1)
        page = head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1]
        DOCS_PAGE.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
