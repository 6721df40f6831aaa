"""The end-to-end demo behind ``qadapt demo`` / ``make demo``.

A small transformer (built from a config, seeded; or any local Hugging Face causal LM folder) is
the float *teacher*. A copy is quantized by the chosen backend and given adapters, which are
trained to recover the teacher's next-token distributions on random token sequences
(distillation, KL divergence). The demo then merges the adapters into the quantized weights,
checks merged against unmerged outputs and the exact unmerge, and prints one table.

It then tells what each way of merging keeps of the fine-tune: the naive requantize (new scales,
what bitsandbytes and PEFT do), the default (scales kept), a calibrated merge, a float target,
and a second student trained with an exactly mergeable method (``exact_method``, per-group
scales) where the backend exposes group scales. ``merges.png`` compares them.

Needs ``transformers`` and ``matplotlib`` (the ``demo`` extra).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DemoSettings:
    """What the demo runs: method/backend plugin names, training length, where to write."""

    method: str = "oft"
    backend: str = "bnb4"
    steps: int = 300
    model_dir: str | None = None
    out_dir: str = "out/demo"
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 48
    lr: float = 3e-4
    method_options: dict[str, Any] = field(default_factory=dict)
    #: a method that merges exactly into a backend's group scales, trained for comparison ("" skips it).
    exact_method: str = "scales"
    #: 0 distils towards the float model itself (recover the quantization gap). Above 0, the teacher
    #: is the float model with a rank-4 change of this relative size added to every linear layer
    #: (a stand-in fine-tune the quantized base cannot reach by re-rounding).
    teacher_shift: float = 0.0
    exact_lr: float = 3e-3
    #: calibration batches for the calibrated merge (every fourth is held out).
    calibration_batches: int = 8


@dataclass
class MergeOutcome:
    """One way of merging: the KL to the float model after it, and the share of the fine-tune's gain kept."""

    label: str
    kl: float
    gain_kept: float | None
    note: str = ""

    def describe(self) -> str:
        if self.gain_kept is None:
            return self.note
        text = f"{self.gain_kept:+.1%} (KL {self.kl:.5f})"
        return f"{text}, {self.note}" if self.note else text


@dataclass
class DemoResult:
    """The figures the demo's table shows."""

    rows: list[tuple[str, str]]
    losses: list[float]
    gap_recovered: float
    merge_max_error: float
    exact_unmerge_identical: bool
    out_dir: Path
    #: what each way of merging kept (see :class:`MergeOutcome`).
    merges: list[MergeOutcome] = field(default_factory=list)


def build_default_model(seed: int) -> nn.Module:
    """A 2-layer Llama-style causal LM (hidden 128, vocab 512), seeded random init, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        initializer_range=0.08,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def load_model(settings: DemoSettings) -> nn.Module:
    """The teacher: the built-in model, or a local Hugging Face folder (no hub access)."""
    if settings.model_dir is None:
        return build_default_model(settings.seed)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(settings.model_dir, local_files_only=True).float().eval()


@torch.no_grad()
def shifted(model: nn.Module, size: float, seed: int) -> nn.Module:
    """``model`` itself (``size`` 0), or a copy whose linear layers (not the output head) each get a
    random rank-4 change ``D`` with ``||D|| = size * ||W||``: a fine-tuned model to distil towards."""
    if size <= 0:
        return model
    generator = torch.Generator().manual_seed(seed + 7)
    out = copy.deepcopy(model)
    head = out.get_output_embeddings() if hasattr(out, "get_output_embeddings") else None
    for module in out.modules():
        if isinstance(module, nn.Linear) and module is not head:
            weight = module.weight
            change = torch.randn(weight.shape[0], 4, generator=generator) @ torch.randn(
                4, weight.shape[1], generator=generator
            )
            weight.add_(change.to(weight.dtype) * (size * weight.norm() / change.norm()))
    return out


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits.float()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the vocabulary; inputs ``[batch, seq, vocab]``."""
    teacher = F.log_softmax(teacher_logits, dim=-1)
    student = F.log_softmax(student_logits, dim=-1)
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


def _storage_digest(model: nn.Module) -> str:
    from qadapt.model.layers import wrapped_layers

    digest = hashlib.sha256()
    for name, layer in wrapped_layers(model):
        storage = layer.backend.get_storage(layer.base)
        for key in sorted(storage.tensors):
            tensor = storage.tensors[key].detach().contiguous().reshape(-1).view(torch.uint8)
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _plot(losses: list[float], gap: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, label="training loss (KL to float model)")
    ax.axhline(gap, color="grey", linestyle="--", label="quantization gap before training")
    ax.set_xlabel("step")
    ax.set_ylabel("KL divergence")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _train(
    student: nn.Module,
    teacher: nn.Module,
    settings: DemoSettings,
    generator: torch.Generator,
    lr: float,
    verbose: bool,
    desc: str,
) -> tuple[list[float], float]:
    """Distil ``teacher`` into ``student``'s adapters; returns the losses and seconds per step."""
    from tqdm.auto import tqdm

    vocab = teacher.config.vocab_size
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    student.train()
    started = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=desc, disable=not verbose)
    for _ in bar:
        tokens = torch.randint(0, vocab, (settings.batch_size, settings.seq_len), generator=generator)
        with torch.no_grad():
            target = _logits(teacher, tokens)
        loss = distillation_loss(_logits(student, tokens), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    student.eval()
    return losses, (time.perf_counter() - started) / max(settings.steps, 1)


def _gain_kept(gap_before: float, gap_after: float, gap_merged: float) -> float | None:
    gain = gap_before - gap_after
    return (gap_before - gap_merged) / gain if gain > 0 else None


def _compare_merges(
    student: nn.Module, kl: Any, calibration: list[torch.Tensor], gap_before: float, gap_after: float
) -> list[MergeOutcome]:
    """Merge ``student`` each way (unmerging exactly in between) and measure the KL after each."""
    import qadapt

    outcomes = []
    for label, options in (
        ("naive requantize (new scales)", {"requantize": "fresh"}),
        ("default merge (scales kept)", {}),
        ("calibrated merge", {"calibration": calibration}),
    ):
        report = qadapt.merge(student, warn_below=None, **options)
        after = kl(student)
        qadapt.unmerge(student, mode="exact")
        paths = sorted({r.path for r in report.layers.values()})
        note = f"paths {'/'.join(paths)}"
        if report.model_kept is not None:
            note += f", logits kept {report.model_kept:.1%}"
        outcomes.append(MergeOutcome(label, after, _gain_kept(gap_before, gap_after, after), note))
    floating = copy.deepcopy(student)
    qadapt.unwrap(floating, merge="float", dtype=torch.bfloat16)
    after = kl(floating.float())  # bf16-rounded weights, run in the model's float32
    outcomes.append(MergeOutcome("float target (bf16)", after, _gain_kept(gap_before, gap_after, after)))
    return outcomes


def _exact_method_row(
    base: nn.Module,
    teacher: nn.Module,
    settings: DemoSettings,
    generator: torch.Generator,
    kl: Any,
    gap_before: float,
    gap_after: float,
    verbose: bool,
) -> MergeOutcome | None:
    """Train ``settings.exact_method`` instead and merge it (None when it is not asked for).

    Its ``gain_kept`` is measured against the main method's gain, like the other rows, so the
    chart compares what each option leaves in the merged model; the note gives its own figures.
    """
    import qadapt
    from qadapt.errors import CapabilityError, ConfigError, PluginError

    if not settings.exact_method or settings.exact_method == settings.method:
        return None
    label = f"{settings.exact_method} method, merged"
    student = copy.deepcopy(base)
    try:
        qadapt.wrap(student, method=settings.exact_method, backend=settings.backend, targets="all-linear")
    except (CapabilityError, ConfigError, PluginError) as exc:
        return MergeOutcome(label, float("nan"), None, f"n/a: {' '.join(str(exc).split())[:140]}")
    _train(student, teacher, settings, generator, settings.exact_lr, verbose, settings.exact_method)
    unmerged = kl(student)
    qadapt.merge(student, warn_below=None)
    merged = kl(student)
    own = _gain_kept(gap_before, unmerged, merged)
    share = 1.0 - unmerged / gap_before if gap_before > 0 else 0.0
    note = f"its own gap recovered {share:.1%}, its own gain kept {'n/a' if own is None else f'{own:.1%}'}"
    return MergeOutcome(label, merged, _gain_kept(gap_before, gap_after, merged), note)


def _plot_merges(merges: list[MergeOutcome], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in merges if m.gain_kept is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = [100 * m.gain_kept for m in shown]
    ax.barh([m.label for m in shown], values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("share of the fine-tune's KL gain kept after merging (%)")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(settings: DemoSettings, *, verbose: bool = True) -> DemoResult:
    """Run the demo end to end; prints the table when ``verbose`` and returns the figures."""
    import qadapt
    from qadapt.cli.tables import format_table

    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)

    base = load_model(settings)
    base.requires_grad_(False)
    teacher = shifted(base, settings.teacher_shift, settings.seed)
    student = copy.deepcopy(base)
    options = settings.method_options
    qadapt.wrap(student, method=settings.method, backend=settings.backend, targets="all-linear", method_options=options)
    info = qadapt.summary(student)

    vocab = teacher.config.vocab_size
    generator = torch.Generator().manual_seed(settings.seed + 1)
    eval_tokens = torch.randint(0, vocab, (settings.batch_size, settings.seq_len), generator=generator)
    with torch.no_grad():
        eval_teacher = _logits(teacher, eval_tokens)
        gap_before = float(distillation_loss(_logits(student, eval_tokens), eval_teacher))

    losses, step_time = _train(student, teacher, settings, generator, settings.lr, verbose, "distilling")

    with torch.no_grad():
        unmerged_logits = _logits(student, eval_tokens)
        gap_after = float(distillation_loss(unmerged_logits, eval_teacher))
        digest_before = _storage_digest(student)
        report = qadapt.merge(student, warn_below=None)
        merged_logits = _logits(student, eval_tokens)
        gap_merged = float(distillation_loss(merged_logits, eval_teacher))
        qadapt.unmerge(student, mode="exact")
        exact_identical = _storage_digest(student) == digest_before

    qadapt.save_adapter(student, out_dir / "adapter")
    recovered = 1.0 - gap_after / gap_before if gap_before > 0 else 0.0
    errors = sorted(r.error for r in report.layers.values())
    _plot(losses, gap_before, out_dir / "loss.png", f"{settings.method} on {settings.backend}: distillation")

    def kl(model: nn.Module) -> float:
        with torch.no_grad():
            return float(distillation_loss(_logits(model, eval_tokens), eval_teacher))

    calibration = [
        torch.randint(0, vocab, (settings.batch_size, settings.seq_len), generator=generator)
        for _ in range(settings.calibration_batches)
    ]
    merges = _compare_merges(student, kl, calibration, gap_before, gap_after)
    exact = _exact_method_row(base, teacher, settings, generator, kl, gap_before, gap_after, verbose)
    if exact is not None:
        merges.append(exact)
    _plot_merges(merges, out_dir / "merges.png", f"{settings.method} on {settings.backend}: what each merge keeps")

    rows = [
        ("model", settings.model_dir or "built-in 2-layer Llama (hidden 128, vocab 512)"),
        (
            "teacher",
            "the float model"
            if settings.teacher_shift <= 0
            else f"float model + a rank-4 change of {settings.teacher_shift:.0%} per layer",
        ),
        ("method / backend", f"{settings.method} {options or ''} / {settings.backend}".replace("  ", " ")),
        ("layers wrapped", str(info.layers)),
        ("trainable / total parameters", f"{info.trainable_params:,} / {info.total_params:,}"),
        ("quantized weight bytes", f"{info.quantized_bytes:,}"),
        ("KL to float model, before training", f"{gap_before:.5f}"),
        ("KL to float model, after training", f"{gap_after:.5f}"),
        ("share of the quantization gap recovered", f"{recovered:.1%}"),
        (
            "merge error per layer (min / median / max)",
            f"{errors[0]:.4f} / {errors[len(errors) // 2]:.4f} / {errors[-1]:.4f}",
        ),
        ("KL after merge (default)", f"{gap_merged:.5f}"),
        ("merged vs unmerged logits (relative)", f"{_relative(merged_logits, unmerged_logits):.2e}"),
        ("exact unmerge bit-identical", "yes" if exact_identical else "NO"),
        *[(f"{settings.method}'s gain kept: {m.label}", m.describe()) for m in merges],
        ("time per training step", f"{step_time * 1000:.1f} ms"),
        ("adapter saved to", str(out_dir / "adapter")),
        ("loss curve", str(out_dir / "loss.png")),
        ("merge comparison", str(out_dir / "merges.png")),
    ]
    (out_dir / "summary.json").write_text(json.dumps(dict(rows), indent=2))
    if verbose:
        print()
        print(format_table(("what", "value"), rows))
    return DemoResult(rows, losses, recovered, errors[-1], exact_identical, out_dir, merges)
