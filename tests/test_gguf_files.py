"""GGUF in, GGUF out: load_gguf -> wrap -> train -> merge -> export -> read back, on tiny files the tests write."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import gguf
import pytest
import torch
from qadapt_gguf.backend import GgufLinear
from tiny_gguf import write_tiny_gguf
from transformers import AutoModelForCausalLM

import qadapt
from qadapt import testing
from qadapt.cli.main import main
from qadapt.errors import CheckpointError, ConfigError, UnsafeMergeError
from qadapt.protocols import CalibrationStats

TEXT = (
    "def read(path): Return the text of the file at path, decoded as UTF-8. "
    "Raise OSError when the file cannot be opened; the file is never written. " * 12
)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference(path: Path) -> torch.nn.Module:
    """transformers' own reader of the file (it dequantizes every tensor with the gguf package)."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "base.gguf"
    write_tiny_gguf(path, TEXT, linear_type="Q4_1")
    return path


def ids_of(model) -> torch.Tensor:
    return model.qadapt_tokenizer(TEXT[:160], return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A LoRA trained a few steps on the loaded file, saved; the merged model's logits."""
    torch.manual_seed(0)
    model = qadapt.load_gguf(base)
    qadapt.wrap(model, "lora", method_options={"r": 4})
    ids = ids_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = tmp_path_factory.mktemp("adapter") / "lora"
    qadapt.save_adapter(model, adapter)
    with torch.no_grad():
        unmerged = model(ids).logits
    qadapt.merge(model)
    with torch.no_grad():
        merged = model(ids).logits
    return adapter, ids, unmerged, merged


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_load_gguf_holds_the_files_blocks_and_computes_what_transformers_reads(kind, tmp_path):
    path = tmp_path / f"{kind}.gguf"
    write_tiny_gguf(path, TEXT, linear_type=kind)
    model = qadapt.load_gguf(path)
    layers = [m for m in model.modules() if isinstance(m, GgufLinear)]
    assert len(layers) == 14 and all(m.gguf_type == kind for m in layers)
    assert not any(isinstance(m, torch.nn.Linear) and m is not model.lm_head for m in model.modules())
    ids = ids_of(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(path)(ids).logits)


def test_round_trip_export_reads_back_with_gguf_and_transformers(base, trained, tmp_path):
    adapter, ids, unmerged, merged = trained
    before = digest(base)
    out = tmp_path / "out.gguf"
    report = qadapt.export(base, adapter, out, progress=False)
    assert digest(base) == before, "BASE is never written"
    assert len(report.layers) == 14
    written, original = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(base))
    assert list(written.fields) == list(original.fields)
    for key, field in original.fields.items():
        if key.startswith("GGUF."):
            continue
        assert [bytes(p) for p in written.fields[key].parts] == [bytes(p) for p in field.parts], key
    changed = 0
    for a, b in zip(original.tensors, written.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        if bytes(a.data) != bytes(b.data):
            changed += 1
            assert a.tensor_type == gguf.GGMLQuantizationType.Q4_1 and ".attn_norm" not in a.name
    assert changed == 14, "every adapted tensor is rewritten in its own type, every other one copied"
    with torch.no_grad():
        loaded = reference(out)(ids).logits
        ours = qadapt.load_gguf(out)(ids).logits
    assert torch.equal(loaded, merged), "the exported file computes the in-memory merged model"
    assert torch.equal(ours, merged)
    assert (merged - unmerged).abs().max() < (unmerged - reference(base)(ids).logits).abs().max()


def test_cli_exports_gguf_to_gguf_and_refuses_a_target(base, trained, tmp_path, capsys):
    adapter = trained[0]
    out = tmp_path / "cli.gguf"
    assert main(["export", str(base), str(adapter), str(out), "--no-progress"]) == 0
    assert out.is_file() and "14 layer(s) merged" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"is a model file: .*leave out to="):
        qadapt.export(base, adapter, tmp_path / "x.gguf", to="nf4")
    with pytest.raises(ConfigError, match="exists; pass overwrite=True"):
        qadapt.export(base, adapter, out, progress=False)
    with pytest.raises(ConfigError, match=r"must be a \.gguf file like BASE"):
        qadapt.export(base, adapter, tmp_path / "x.safetensors", progress=False)
    with pytest.raises(ConfigError, match="BASE itself"):
        qadapt.export(base, adapter, base, overwrite=True, progress=False)


def test_calibrated_export_takes_per_layer_statistics(base, trained, tmp_path):
    adapter, ids, _, _ = trained
    model = qadapt.load_gguf(base)
    stats, hooks = {}, []

    def hook(name):
        def gather(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            stats[name] = CalibrationStats(x.T @ x, x.shape[0])

        return gather

    for name, module in model.named_modules():
        if isinstance(module, GgufLinear):
            hooks.append(module.register_forward_hook(hook(name)))
    with torch.no_grad():
        model(ids.repeat(4, 1))
    out = tmp_path / "calibrated.gguf"
    report = qadapt.exporting.model_file.export_model_file(base, adapter, out, calibration_stats=stats, progress=False)
    assert {r.path for r in report.layers.values() if not r.reverted} <= {"calibrated"}
    assert sum(r.path == "calibrated" for r in report.layers.values()) >= 7
    assert torch.isfinite(reference(out)(ids).logits).all()


def test_a_failed_export_leaves_no_out_file_and_an_old_out_as_it_was(base, trained, tmp_path):
    adapter = trained[0]
    broken = tmp_path / "broken"
    qadapt_files = {p.name: p.read_bytes() for p in adapter.iterdir()}
    broken.mkdir()
    for name, data in qadapt_files.items():
        (broken / name).write_bytes(data)
    from safetensors.torch import load_file, save_file

    weights = next(p for p in broken.iterdir() if p.suffix == ".safetensors")
    tensors = load_file(weights)
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    last = sorted(k for k in tensors if "layers.1.mlp.down_proj" in k)[0]
    tensors[last] = torch.full_like(tensors[last], float("nan"))
    save_file(tensors, weights, metadata=metadata)
    out = tmp_path / "out.gguf"
    with pytest.raises(UnsafeMergeError):
        qadapt.export(base, broken, out, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"], "no temporary file left beside OUT"
    out.write_bytes(b"old")
    with pytest.raises(UnsafeMergeError):
        qadapt.export(base, broken, out, overwrite=True, progress=False)
    assert out.read_bytes() == b"old"


def test_what_a_killed_export_left_beside_out_is_removed_by_the_next(base, trained, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".out.gguf.qadapt-{dead.stdout.strip()}-abc.tmp"
    left.write_bytes(b"half a file")
    alive = tmp_path / f".out.gguf.qadapt-{os.getpid()}-def.tmp"  # a running export's: kept
    alive.write_bytes(b"in progress")
    report = qadapt.export(base, trained[0], tmp_path / "out.gguf", progress=False)
    assert not left.exists() and alive.exists()
    assert any("killed" in line for line in report.recovered)


def test_the_gguf_backend_passes_the_model_file_check(base):
    testing.check_model_files("gguf", model_file=base)


def test_a_wrapped_gguf_model_trains_in_trainer(base, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = qadapt.load_gguf(base)
    qadapt.wrap(model, "lora", method_options={"r": 2})
    ids = ids_of(model)[0, :32].tolist()
    data = Dataset.from_dict({"input_ids": [ids] * 4, "labels": [ids] * 4})
    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


# ------------------------------------------------------------------ hostile files


def _info_position(data: bytes, name: str) -> int:
    """Byte position just after ``name`` in the tensor-info section (n_dims, dims, type, offset follow)."""
    at = data.rfind(name.encode())
    assert at > 0
    return at + len(name)


def _patched(base: Path, tmp_path: Path, how: str) -> Path:
    data = bytearray(base.read_bytes())
    if how == "magic":
        data[:4] = b"GGUX"
    elif how == "truncated":
        data = data[: len(data) - 4096]
    else:
        pos = _info_position(bytes(data), "blk.0.attn_q.weight")
        (n_dims,) = struct.unpack_from("<I", data, pos)
        if how == "shape":
            struct.pack_into("<Q", data, pos + 4, 48)  # rows of 48: not whole blocks of 32
        elif how == "offset":
            struct.pack_into("<Q", data, pos + 4 + 8 * n_dims + 4, 1 << 40)
    path = tmp_path / f"{how}.gguf"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("magic", "header or tensor table unreadable .*GGUF magic invalid"),
        ("truncated", "tensor table unreadable .*cannot reshape|outside the file"),
        ("shape", "row size \\(48\\) is not a multiple of Q4_1 block size|not whole blocks of 32"),
        ("offset", "tensor table unreadable .*cannot reshape|outside the file"),
    ],
)
def test_a_damaged_file_is_refused_with_a_clear_error_and_left_as_it_was(base, trained, tmp_path, how, message):
    path = _patched(base, tmp_path, how)
    before = digest(path)
    with pytest.raises(CheckpointError, match=message):
        qadapt.load_gguf(path)
    with pytest.raises(CheckpointError, match=message):
        qadapt.export(path, trained[0], tmp_path / "never.gguf", progress=False)
    assert digest(path) == before
    assert not (tmp_path / "never.gguf").exists()


def test_bad_paths_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be opened"):
        qadapt.load_gguf(tmp_path / "missing.gguf")
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        qadapt.load_gguf(folder)
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        qadapt.load_gguf(fifo)
    with pytest.raises(ConfigError, match=r"load_gguf takes a \.gguf file"):
        qadapt.load_gguf(tmp_path / "model.bin")
    with pytest.raises(ConfigError, match=r"no installed backend opens \.bin files \(\.gguf \(gguf\)\)"):
        qadapt.load_model_file(tmp_path / "model.bin")
