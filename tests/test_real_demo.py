"""The real-model demo's pipeline on a tiny model it can run in seconds: a transformers directory with a
tokenizer trained here (the 93 MB default model is for ``make demo``, not the tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_gguf import write_tiny_gguf
from tiny_models import VOCAB, tiny_llama

from qadapt.cli.real_demo import (
    HELDOUT_MODULES,
    TRAIN_MODULES,
    RealDemoSettings,
    docstring_text,
    load_float_model,
    run_real_demo,
)


def byte_pair_tokenizer(text: str):
    """A BPE tokenizer of :data:`VOCAB` entries trained on ``text`` (in memory; nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "tiny"
    tiny_llama().save_pretrained(path)
    byte_pair_tokenizer(docstring_text(TRAIN_MODULES[:4])).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path, docstring_text(TRAIN_MODULES[:3]))


def test_a_gguf_file_loads_as_the_float_model_it_holds(tiny_gguf):
    path, source = tiny_gguf
    model, tokenizer = load_float_model(path)
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([tokenizer("def f(x):\n    return x")["input_ids"]])
    assert ids.numel() > 3
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


def test_a_transformers_directory_loads_too(tiny_dir):
    model, tokenizer = load_float_model(tiny_dir)
    with torch.no_grad():
        reference = tiny_llama()(torch.tensor([[1, 2, 3]])).logits
        assert torch.equal(model(torch.tensor([[1, 2, 3]])).logits, reference)
    assert tokenizer("json")["input_ids"]


def test_the_docstring_split_is_disjoint_and_holds_text():
    assert not set(TRAIN_MODULES) & set(HELDOUT_MODULES)
    assert len(docstring_text(HELDOUT_MODULES)) > 10_000


def test_the_demo_pipeline_runs_on_a_gguf_file_and_reports_every_row(tiny_gguf, tmp_path):
    settings = RealDemoSettings(
        model=str(tiny_gguf[0]),
        steps=3,
        seq_len=16,
        heldout_chunks=4,
        calibration_batches=2,
        method_options={"r": 4},
        out_dir=str(tmp_path / "out"),
    )
    summary = run_real_demo(settings, verbose=False)
    labels = [row["label"] for row in summary["rows"]]
    assert labels == [
        "float model",
        "bnb4 model (no adapter)",
        "unmerged lora",
        "naive requantize (bitsandbytes / PEFT)",
        "qadapt default merge",
        "qadapt calibrated merge",
        "float target (unwrap merge='float')",
        "qadapt export --to nf4, reloaded",
        "qadapt export --to bf16, reloaded",
    ]
    assert all(math.isfinite(row["ppl"]) and row["ppl"] > 1 for row in summary["rows"])
    float_target = summary["rows"][6]
    assert float_target["kept"] == pytest.approx(1.0, abs=1e-3)  # the float merge is the unmerged model
    out = tmp_path / "out"
    for name in ("loss.png", "perplexity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]
    assert (out / "export-nf4" / "config.json").is_file() and (out / "adapter" / "qadapt_config.json").is_file()
    assert isinstance(summary["continuation_after"], str)
    assert torch.isfinite(torch.tensor(summary["seconds_per_step"]))
