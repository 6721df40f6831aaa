"""``qadapt export --calibration``: the block-by-block calibrated export against the in-memory calibrated
merge, its options, and hostile calibration files."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import perturb_adapters, tiny_llama
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import qadapt
from qadapt.cli.main import main
from qadapt.errors import ConfigError, InputError
from qadapt.exporting import REPORT_FILE, export
from qadapt.formats.calibration_text import calibration_batches, read_calibration_texts

NF4 = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
)
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()[]{}-_=+*/\n#<>"
TEXT = "def merge(model):\n    '''Fold each adapter into its layer; return the report.'''\n" * 40


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer within the tiny Llama's 128-token vocabulary."""
    vocab = {"<unk>": 0, "</s>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float tiny Llama with a tokenizer, a LoRA adapter trained (perturbed) on its nf4 load, and a text file."""
    root = tmp_path_factory.mktemp("calib")
    tiny_llama().save_pretrained(root / "float")
    char_tokenizer().save_pretrained(root / "float")
    model = qadapt.wrap(load_nf4(root / "float"), method="lora", method_options={"r": 4})
    perturb_adapters(model)
    qadapt.save_adapter(model.eval(), root / "adapter")
    (root / "calib.txt").write_text(TEXT, encoding="utf-8")
    return {"base": root / "float", "adapter": root / "adapter", "text": root / "calib.txt", "root": root}


def load_nf4(base: Path) -> torch.nn.Module:
    return LlamaForCausalLM.from_pretrained(base, quantization_config=NF4, device_map="cpu", dtype=torch.float32)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        h.update(p.name.encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


def file_batches(setup: dict[str, Path], tokens: int = 4096) -> list[dict[str, torch.Tensor]]:
    tokenizer = AutoTokenizer.from_pretrained(setup["base"], local_files_only=True)
    return calibration_batches(setup["text"], tokenizer, tokens=tokens, seq_len=32, batch_size=4)


@pytest.mark.parametrize("base", ["float", "nf4"])
@torch.no_grad()
def test_calibrated_export_writes_the_in_memory_calibrated_merge_bit_for_bit(
    setup: dict[str, Path], tmp_path: Path, base: str
):
    batches = file_batches(setup)
    if base == "nf4":  # a base transformers saved in nf4: each layer is merged in its own format
        load_nf4(setup["base"]).save_pretrained(tmp_path / "nf4")
        setup = {**setup, "base": tmp_path / "nf4"}
        load = lambda: LlamaForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")  # noqa: E731
    else:
        load = lambda: load_nf4(setup["base"])  # noqa: E731
    reference = qadapt.load_adapter(load(), setup["adapter"])
    in_memory = qadapt.merge(reference, calibration=batches)
    # Taken before any forward: bitsandbytes' CPU forward repacks a Linear4bit's state in place.
    merged = qadapt.unwrap(reference, merge=True)
    expected = {k: v.clone() for k, v in merged.state_dict().items()}
    if base == "float":  # (transformers cannot save a model it loaded from an nf4 checkpoint)
        merged.save_pretrained(tmp_path / "saved")

    report = export(setup["base"], setup["adapter"], tmp_path / "out", to="nf4", progress=False, calibration=batches)

    written = load_file(tmp_path / "out" / "model.safetensors")
    assert set(written) <= set(expected)
    assert all(torch.equal(t, expected[k]) for k, t in written.items()), [
        k for k, t in written.items() if not torch.equal(t, expected[k])
    ]
    assert {r.path for r in report.layers.values()} == {"calibrated"} and len(report.layers) == 14
    if base == "float":  # so the exported model computes what the in-memory merged model, saved and reloaded, does
        ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(5))
        exported = LlamaForCausalLM.from_pretrained(tmp_path / "out")
        assert torch.equal(exported(ids).logits, LlamaForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits)
    # The figures are the in-memory merge's: the same statistics, held-out rows and codes.
    assert {n: r.kept for n, r in report.layers.items()} == {n: r.kept for n, r in in_memory.layers.items()}
    assert report.calibration_batches == len(batches) and f"calibrated on {len(batches)} batch(es)" in str(report)
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["calibration_batches"] == len(batches) and saved["sequential"] is False


@torch.no_grad()
def test_a_calibration_file_is_tokenized_with_the_bases_tokenizer_and_sequential_feeds_merged_blocks(
    setup: dict[str, Path], tmp_path: Path
):
    from_file = export(
        setup["base"], setup["adapter"], tmp_path / "file", to="nf4", progress=False,
        calibration=setup["text"], calibration_tokens=1024,
    )  # fmt: skip
    export(
        setup["base"], setup["adapter"], tmp_path / "given", to="nf4", progress=False,
        calibration=calibration_batches(setup["text"], AutoTokenizer.from_pretrained(setup["base"]), tokens=1024),
    )  # fmt: skip
    assert digest(tmp_path / "file" / "model.safetensors") == digest(tmp_path / "given" / "model.safetensors")
    assert from_file.calibration_batches == 2  # 1024 tokens: 2 batches of 4 x 128
    sequential = export(
        setup["base"], setup["adapter"], tmp_path / "seq", to="nf4", progress=False,
        calibration=file_batches(setup), sequential=True,
    )  # fmt: skip
    plain = export(
        setup["base"], setup["adapter"], tmp_path / "plain", to="nf4", progress=False, calibration=file_batches(setup)
    )
    first = [n for n in plain.layers if n.startswith("model.layers.0.")]
    later = [n for n in plain.layers if n.startswith("model.layers.1.")]
    # Block 0 sees the same inputs either way; block 1 sees block 0 merged (sequential) or adapted.
    assert all(sequential.layers[n].kept == plain.layers[n].kept for n in first)
    assert any(sequential.layers[n].kept != plain.layers[n].kept for n in later)
    assert sequential.sequential and "sequential" in json.loads((tmp_path / "seq" / REPORT_FILE).read_text())


def test_cli_calibration_flags(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    args = [str(setup["base"]), str(setup["adapter"]), str(tmp_path / "out"), "--to", "nf4", "--no-progress"]
    assert main(["export", *args, "--calibration", str(setup["text"]), "--calibration-tokens", "1024"]) == 0
    assert "calibrated on 2 batch(es)" in capsys.readouterr().out
    assert main(["export", *args[:2], str(tmp_path / "f"), "--to", "bf16", "--calibration", str(setup["text"])]) == 2
    assert "calibration applies to quantized targets" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def _jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


HOSTILE = {
    "missing": (None, "does not exist"),
    "empty": (b"", "holds no text"),
    "blank": (b"  \n\n  ", "holds no text"),
    "not-utf8": (b"def f():\n    \xff\xfe bad\n", "is not UTF-8 text: byte 13 (line 2) is 0xff"),
    "bad-jsonl-line": (_jsonl(['{"text": "a"}', '{"text": "b"', '{"text": "c"}']), "line 2 is not valid JSON"),
    "jsonl-no-text": (_jsonl(['{"text": "a"}', '{"body": "b"}']), "line 2: field 'text' must be a string"),
    "jsonl-not-object": (_jsonl(['{"text": "a"}', '["b"]']), "line 2 must be a JSON object"),
    "directory": ("dir", "is a directory"),
    "fifo": ("fifo", "not a regular file"),
    "too-big": ("big", "holds 67,108,865 bytes, more than the 67,108,864"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_calibration_files_are_refused_naming_the_problem_and_nothing_is_written(
    setup: dict[str, Path], tmp_path: Path, case: str
):
    content, message = HOSTILE[case]
    path = tmp_path / ("calib.jsonl" if case.startswith("jsonl") or case == "bad-jsonl-line" else "calib.txt")
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "big":
        with open(path, "wb") as handle:
            handle.truncate(64 * 2**20 + 1)  # sparse: no disk used
    elif content is not None:
        path.write_bytes(content)
    before = {name: digest(setup[name]) for name in ("base", "adapter")}
    calib_before = digest(path) if path.is_file() else None
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        export(setup["base"], setup["adapter"], tmp_path / "out", to="nf4", progress=False, calibration=path)
    assert str(path) in str(caught.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert {name: digest(setup[name]) for name in ("base", "adapter")} == before
    assert (digest(path) if path.is_file() else None) == calib_before


def test_jsonl_records_and_bad_options(setup: dict[str, Path], tmp_path: Path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert read_calibration_texts(path) == ["one", "two"]
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="fewer than 2 batches of 4 x 128 tokens"):
        export(setup["base"], setup["adapter"], out, to="nf4", progress=False, calibration=path)
    with pytest.raises(ConfigError, match="calibration_tokens must be a whole number >= 1, got 0"):
        export(setup["base"], setup["adapter"], out, to="nf4", progress=False, calibration=path, calibration_tokens=0)
    with pytest.raises(ConfigError, match="sequential=True needs calibration"):
        export(setup["base"], setup["adapter"], out, to="nf4", progress=False, sequential=True)
    with pytest.raises(ConfigError, match="calibration applies to quantized targets"):
        export(setup["base"], setup["adapter"], out, to="float32", progress=False, calibration=path)
    no_tokenizer = tmp_path / "base"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((setup["base"] / name).read_bytes())
    with pytest.raises(ConfigError, match="has no tokenizer"):
        export(no_tokenizer, setup["adapter"], out, to="nf4", progress=False, calibration=setup["text"])
    assert not out.exists()


def test_an_uncalibrated_export_that_keeps_little_says_so_and_what_to_use(tmp_path: Path):
    tiny_llama().save_pretrained(tmp_path / "float")
    model = qadapt.wrap(
        LlamaForCausalLM.from_pretrained(tmp_path / "float"), method="lora", backend="bnb4", method_options={"r": 4}
    )
    perturb_adapters(model, scale=0.002)  # far below one 4-bit step, as real fine-tunes move weights
    qadapt.save_adapter(model.eval(), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="merged without calibration data: the layers kept") as caught:
        report = export(tmp_path / "float", tmp_path / "adapter", tmp_path / "out", to="nf4", progress=False)
    median = sorted(r.kept for r in report.layers.values())[len(report.layers) // 2]
    assert report.advice is not None and f"kept {median:.1%}" in report.advice and report.advice in str(report)
    assert "--calibration FILE" in report.advice and "calibration='self'" in report.advice
    assert any(report.advice == str(w.message) for w in caught)
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["advice"] == report.advice
    calibrated = export(
        tmp_path / "float", tmp_path / "adapter", tmp_path / "cal", to="nf4", progress=False,
        calibration=[{"input_ids": torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(i))}
                     for i in range(8)],
    )  # fmt: skip
    assert calibrated.advice is None and calibrated.median_kept > median
