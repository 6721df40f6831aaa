"""What share of a real fine-tune's gain each way of merging keeps (issue 22), with the time of each merge.

On SmolLM2-135M-Instruct (loaded as ``qadapt demo --model`` loads it, see qadapt/cli/real_demo.py),
fine-tuned ~30 steps on Python standard-library docstrings (the demo's task), for each adapter:
LoRA r16 on nf4, OFT on nf4, LoRA r16 on int8 (bnb8). Rows:

* naive: ``requantize="fresh"`` (what PEFT / bitsandbytes do);
* default: ``merge(model)`` (no data);
* calibrated: ``merge(model, calibration=batches)`` on the training text (a calibration file, tokenized
  with the model's tokenizer: the batches ``qadapt export --calibration FILE`` reads);
* sequential: the same with ``sequential=True`` where ``merge`` takes it (skipped otherwise);
* self-calibrated: ``merge(model, calibration="self")`` (text the adapted model writes itself);
* export --calibration: ``qadapt export --to nf4|int8 --calibration FILE`` of the saved adapter on the
  saved float base, reloaded with ``from_pretrained`` (target: equal to the calibrated row);
* merge-aware: an adapter trained with ``wrap(merge_aware=True)`` then merged, where ``wrap`` takes it
  (its gain is against the plain fine-tune's, so the rows compare);
* float target: ``unwrap(model, merge="float")``.

"Gain kept" is ``(ppl_base - ppl_row) / (ppl_base - ppl_unmerged)`` on held-out docstrings of other
modules. ``--quick`` runs a tiny random Llama on a synthetic task (a smoke test, figures meaningless).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import qadapt
from qadapt.cli import real_demo as demo

CONFIGS = {
    "lora-nf4": ("lora", {"r": 16}, "bnb4", {"compress_statistics": True}, "nf4"),
    "oft-nf4": ("oft", {}, "bnb4", {"compress_statistics": True}, "nf4"),
    "lora-int8": ("lora", {"r": 16}, "bnb8", {}, "int8"),
}
QUICK_OPTIONS = {"lora": {"r": 4}, "oft": {"block_size": 16}}


@dataclass
class Row:
    config: str
    row: str
    ppl: float | None
    kept: float | None
    seconds: float | None
    note: str = ""


def _kept(base: float, tuned: float, ppl: float) -> float | None:
    return None if base == tuned else (base - ppl) / (base - tuned)


def _quiet(function: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = function()
    return value, time.perf_counter() - started


class Task:
    """The model, its text and tokenizer: SmolLM2 on docstrings, or (quick) a tiny Llama on a synthetic task."""

    def __init__(self, quick: bool, model: str | None, seq_len: int) -> None:
        self.quick, self.seq_len = quick, seq_len
        if quick:
            self._tiny()
        else:
            path = Path(model) if model else demo.default_model_file()
            self.float_model, self.tokenizer = demo.load_float_model(path)
            self.train_text = demo.docstring_text(demo.TRAIN_MODULES)
            self.train = demo.chunks(self.tokenizer, self.train_text, seq_len)
            self.heldout = demo.chunks(self.tokenizer, demo.docstring_text(demo.HELDOUT_MODULES), seq_len)[:24]

    def _tiny(self) -> None:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=1,
        )  # fmt: skip
        self.float_model = LlamaForCausalLM(config).eval()
        vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .,\n")}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
        words = ["merge", "adapter", "layer", "weight", "quantize", "scale", "block", "round"]
        generator = torch.Generator().manual_seed(1)
        picks = torch.randint(0, len(words), (3000,), generator=generator).tolist()
        self.train_text = " ".join(words[i] for i in picks) + ".\n"
        rows = demo.chunks(self.tokenizer, self.train_text, self.seq_len)
        self.train, self.heldout = rows[:-8], rows[-8:]

    def settings(self, steps: int) -> demo.RealDemoSettings:
        return demo.RealDemoSettings(steps=steps, batch_size=2 if not self.quick else 4, seq_len=self.seq_len)


def _wrap(task: Task, name: str, merge_aware: bool = False) -> nn.Module:
    method, options, backend, backend_options, _ = CONFIGS[name]
    if task.quick:  # small options; no compiled quantizer (its compile per shape dominates a tiny run)
        options = QUICK_OPTIONS[method]
        backend_options = {**backend_options, **({"fast_requantize": False} if backend == "bnb4" else {})}
    extra = {"merge_aware": True} if merge_aware else {}
    return qadapt.wrap(
        copy.deepcopy(task.float_model), method=method, backend=backend, method_options=options,
        backend_options=backend_options, **extra,
    )  # fmt: skip


def _merge_row(model: nn.Module, task: Task, label: str, base: float, tuned: float, **options: Any) -> Row:
    _, seconds = _quiet(lambda: qadapt.merge(model, warn_below=None, **options))
    ppl = demo.perplexity(model, task.heldout)
    qadapt.unmerge(model)
    return Row("", label, ppl, _kept(base, tuned, ppl), seconds)


def _export_row(task: Task, name: str, folder: Path, calibration: Path, base: float, tuned: float) -> Row:
    from transformers import AutoModelForCausalLM

    target = CONFIGS[name][4]
    out = folder / f"export-{name}"
    _, seconds = _quiet(
        lambda: qadapt.export(
            folder / "base", folder / f"adapter-{name}", out, to=target, overwrite=True, progress=False,
            calibration=calibration, calibration_tokens=CAL_TOKENS[task.quick],
        )
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    ppl = demo.perplexity(reloaded, task.heldout)
    return Row("", f"export --to {target} --calibration", ppl, _kept(base, tuned, ppl), seconds)


#: calibration tokens: 16 batches of 4 x 128 (real), 2 (quick)
CAL_TOKENS = {False: 8192, True: 1024}


def _merge_aware_row(task: Task, name: str, steps: int, base: float, tuned: float) -> Row:
    try:
        model = _wrap(task, name, merge_aware=True)
    except (TypeError, qadapt.ConfigError) as exc:
        why = f"skipped: wrap(merge_aware=True) refused ({type(exc).__name__})"
        return Row("", "merge-aware", None, None, None, why)
    demo._train(model, task.train, task.settings(steps))
    row = _merge_row(model, task, "merge-aware", base, tuned)
    row.note = "kept against the plain fine-tune's gain"
    return row


def run_config(task: Task, name: str, steps: int, folder: Path, skip: frozenset[str] = frozenset()) -> list[Row]:
    """Every row for one adapter configuration (``skip``: row keys left out, see ``--skip``)."""
    model = _wrap(task, name)
    with qadapt.disable_adapters(model):
        base = demo.perplexity(model, task.heldout)
    demo._train(model, task.train, task.settings(steps))
    tuned = demo.perplexity(model, task.heldout)
    qadapt.save_adapter(model, folder / f"adapter-{name}")
    calibration = folder / "calibration.txt"
    # the batches qadapt export --calibration reads from the same file (rows of 128 tokens, 4 a batch)
    batches = qadapt.calibration_batches(calibration, task.tokenizer, CAL_TOKENS[task.quick])
    rows = [
        Row("", "quantized base (no adapter)", base, 0.0, None),
        Row("", "unmerged", tuned, 1.0, None),
        _merge_row(model, task, "naive (requantize='fresh')", base, tuned, requantize="fresh"),
        _merge_row(model, task, "default (no data)", base, tuned),
        _merge_row(model, task, "calibrated", base, tuned, calibration=batches),
    ]
    if "sequential" in skip:
        rows.append(Row("", "sequential", None, None, None, "skipped (--skip)"))
    elif "sequential" in inspect.signature(qadapt.merge).parameters:
        rows.append(_merge_row(model, task, "sequential", base, tuned, calibration=batches, sequential=True))
    else:
        rows.append(Row("", "sequential", None, None, None, "skipped: merge() has no sequential option here"))
    own: Any = "self"
    if task.quick:  # fewer, shorter rows than merge(calibration="self") samples: a smoke test
        own = qadapt.self_calibration(model, tokens=CAL_TOKENS[True], seq_len=32)
    rows.append(_merge_row(model, task, "self-calibrated", base, tuned, calibration=own))
    rows.append(_export_row(task, name, folder, calibration, base, tuned))
    rows.append(_merge_aware_row(task, name, steps, base, tuned))
    floated, seconds = _quiet(lambda: qadapt.unwrap(copy.deepcopy(model), merge="float"))
    ppl = demo.perplexity(floated, task.heldout)
    rows.append(Row("", "float target", ppl, _kept(base, tuned, ppl), seconds))
    for row in rows:
        row.config = name
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| adapter | row | held-out ppl | gain kept | merge time | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        ppl = "" if r.ppl is None else f"{r.ppl:.2f}"
        kept = "" if r.kept is None else f"{100 * r.kept:.1f} %"
        seconds = "" if r.seconds is None else f"{r.seconds:.1f} s"
        lines.append(f"| {r.config} | {r.row} | {ppl} | {kept} | {seconds} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, a few steps (smoke test)")
    parser.add_argument("--model", default=None, help="a transformers directory or .gguf (default: SmolLM2 wheel)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 30; quick 5)")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS), help="all (quick: lora-nf4)")
    parser.add_argument("--out", default=None, help="write results.json and results.md here")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["sequential"],
        help="rows to leave out (sequential=True runs the statistics once per layer: 210 runs on SmolLM2)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 30)
    configs = args.configs or (["lora-nf4"] if args.quick else list(CONFIGS))
    task = Task(args.quick, args.model, 32 if args.quick else 128)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        task.float_model.save_pretrained(folder / "base")
        task.tokenizer.save_pretrained(folder / "base")
        (folder / "calibration.txt").write_text(task.train_text, encoding="utf-8")
        for name in configs:
            rows += run_config(task, name, steps, folder, frozenset(args.skip))
            print(table([r for r in rows if r.config == name]), flush=True)
    text = table(rows)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n", encoding="utf-8")
        (out / "results.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
