"""save_adapter / load_adapter: exact round trips, shared state, mismatches, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import model_checksum
from safetensors import safe_open
from tiny_models import model_output, perturb_adapters, tiny_llama, token_ids

import qadapt
import qadapt.checkpoint as checkpoint
from qadapt.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from qadapt.errors import CheckpointError

TARGETS = ["q_proj", "v_proj", "down_proj"]


def trained(method: str, options: dict, backend: str = "none", seed: int = 3) -> torch.nn.Module:
    model = qadapt.wrap(tiny_llama(), method=method, backend=backend, targets=TARGETS, method_options=options)
    perturb_adapters(model, seed=seed)
    return model


def stored_keys(directory: Path) -> set[str]:
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as handle:
        return set(handle.keys())


@pytest.mark.parametrize(
    ("method", "options", "backend"),
    [
        ("oft", {"block_size": 16}, "none"),
        ("oft", {"block_size": 16}, "bnb4"),
        ("randlora", {"r": 8, "save_projection": True}, "bnb8"),
        ("randlora", {"r": 8, "save_projection": False}, "none"),
    ],
)
def test_round_trip_into_a_fresh_model_is_exact(tmp_path: Path, method: str, options: dict, backend: str):
    ids = token_ids()
    model = trained(method, options, backend)
    expected = model_output(model, ids)
    qadapt.save_adapter(model, tmp_path)
    description = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert description["config"]["method"]["name"] == method
    assert description["config"]["backend"]["name"] == backend
    assert description["versions"]["qadapt"] == qadapt.__version__
    assert description["versions"]["method"]["version"] != "?"
    keys = stored_keys(tmp_path)
    # The shared random bases are stored once when the options say so, and drawn again otherwise.
    assert any(k.startswith("__shared__.") for k in keys) == options.get("save_projection", False)

    fresh = qadapt.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(model_output(fresh, ids), expected)
    assert model_checksum(fresh) == model_checksum(model)


def test_load_onto_a_wrapped_model_replaces_its_adapter(tmp_path: Path):
    ids = token_ids()
    saved = trained("oft", {"block_size": 16}, seed=3)
    qadapt.save_adapter(saved, tmp_path)
    other = trained("oft", {"block_size": 16}, seed=4)
    assert not torch.equal(model_output(other, ids), model_output(saved, ids))
    qadapt.load_adapter(other, tmp_path)
    assert torch.equal(model_output(other, ids), model_output(saved, ids))


def test_load_as_a_second_named_adapter(tmp_path: Path):
    ids = token_ids()
    saved = trained("randlora", {"r": 8}, seed=3)
    qadapt.save_adapter(saved, tmp_path)
    model = trained("oft", {"block_size": 16}, seed=4)
    qadapt.load_adapter(model, tmp_path, adapter_name="second")
    assert qadapt.list_adapters(model) == ["default", "second"]
    assert torch.equal(model_output(model, ids), model_output(saved, ids))


@pytest.mark.parametrize(
    ("make_target", "message"),
    [
        (lambda: trained("randlora", {"r": 8}), r"holds method 'oft', the layer has 'randlora'"),
        (lambda: trained("oft", {"block_size": 8}), r"block_size=16 saved vs 8"),
        (
            lambda: qadapt.wrap(tiny_llama(), method="oft", method_options={"block_size": 16}, targets=["q_proj"]),
            r"layers in the checkpoint but not adapted in the model: model.layers.0.mlp.down_proj",
        ),
        (lambda: torch.nn.Sequential(torch.nn.Linear(64, 64)), r"cannot wrap the model.*no module matched"),
    ],
    ids=["other-method", "other-options", "other-layers", "other-model"],
)
def test_a_checkpoint_that_does_not_fit_changes_nothing(tmp_path: Path, make_target, message: str):
    qadapt.save_adapter(trained("oft", {"block_size": 16}), tmp_path)
    target = make_target()
    before = model_checksum(target)
    structure = [type(m).__name__ for m in target.modules()]
    with pytest.raises(CheckpointError, match=f"(?s){message}"):
        qadapt.load_adapter(target, tmp_path)
    assert model_checksum(target) == before
    assert [type(m).__name__ for m in target.modules()] == structure


def test_tensor_shapes_are_checked_before_anything_is_written(tmp_path: Path):
    model = trained("oft", {"block_size": 16})
    qadapt.save_adapter(model, tmp_path)
    path = tmp_path / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key][:, :-1].contiguous()
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=header)
    target = trained("oft", {"block_size": 16}, seed=9)
    before = model_checksum(target)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has shape \(4, 119\) in the checkpoint"):
        qadapt.load_adapter(target, tmp_path)
    assert model_checksum(target) == before


def test_missing_and_foreign_directories(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"qadapt_adapter.safetensors is missing"):
        qadapt.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"looks like a PEFT adapter: use qadapt.load_peft_adapter"):
        qadapt.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        qadapt.load_adapter(tiny_llama(), tmp_path)


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ids = token_ids()
    first = trained("oft", {"block_size": 16}, seed=3)
    qadapt.save_adapter(first, tmp_path)

    def write_half_then_die(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        qadapt.save_adapter(trained("oft", {"block_size": 16}, seed=4), tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]
    loaded = qadapt.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(model_output(loaded, ids), model_output(first, ids))


def test_saving_needs_an_adapter(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no qadapt layers"):
        qadapt.save_adapter(tiny_llama(), tmp_path)
    model = trained("oft", {"block_size": 16})
    with pytest.raises(CheckpointError, match=r"no adapter named 'nope'.*adapters: default"):
        qadapt.save_adapter(model, tmp_path, adapter_name="nope")
