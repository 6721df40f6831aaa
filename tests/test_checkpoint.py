"""save_adapter / load_adapter: exact round trips, shared state, mismatches, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import model_checksum
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import model_output, perturb_adapters, tiny_llama, token_ids

import qadapt
import qadapt.persist.adapter as checkpoint
from qadapt.errors import CheckpointError
from qadapt.model.wrap import adapter_layers
from qadapt.persist.adapter import CONFIG_FILE, WEIGHTS_FILE

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
    # A PEFT directory goes to the PEFT reader (load_adapter takes both), which names the missing file.
    with pytest.raises(CheckpointError, match=r"not a PEFT adapter directory: .*adapter_model.safetensors is missing"):
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


# ------------------------------------------------------------------------------- hardening (#13)


def adapter_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." in n}


def test_a_checkpoint_without_the_config_digest_still_loads(tmp_path: Path):
    """Checkpoints saved before the weights header carried the config's digest stay readable."""
    model = trained("oft", {"block_size": 16})
    qadapt.save_adapter(model, tmp_path)
    path = tmp_path / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    assert set(metadata) == {"qadapt", "qadapt_config_sha256"}
    save_file(load_file(str(path)), str(path), metadata={"qadapt": metadata["qadapt"]})
    loaded = qadapt.load_adapter(tiny_llama(), tmp_path)
    assert model_checksum(loaded) == model_checksum(model)
    # ... and an old checkpoint whose config describes another adapter is refused all the same.
    other = tmp_path / "other"
    qadapt.save_adapter(trained("oft", {"block_size": 8}), other)
    (tmp_path / CONFIG_FILE).write_bytes((other / CONFIG_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="describes another adapter than"):
        qadapt.load_adapter(tiny_llama(), tmp_path)


def test_a_model_built_from_plugin_instances_saves_registered_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Instances whose classes the registry never loaded (imported directly, or unpickled in a fresh
    process) are saved under their entry-point names, so the checkpoint loads back."""
    import io

    from qadapt import registry
    from qadapt_bnb.bnb8 import Bnb8Backend
    from qadapt_oft.method import OFTMethod

    for cls in (OFTMethod, Bnb8Backend):
        monkeypatch.setattr(cls, "name", "")  # as in a process where the registry never loaded them
    registry.refresh()
    model = qadapt.wrap(tiny_llama(), method=OFTMethod({"block_size": 16}), backend=Bnb8Backend(), targets=TARGETS)
    perturb_adapters(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    revived = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for source, directory in ((model, tmp_path / "built"), (revived, tmp_path / "revived")):
        qadapt.save_adapter(source, directory)
        config = json.loads((directory / CONFIG_FILE).read_text())["config"]
        assert (config["method"]["name"], config["backend"]["name"]) == ("oft", "bnb8")
        loaded = qadapt.load_adapter(tiny_llama(), directory)
        values = adapter_values(loaded)
        assert values.keys() == adapter_values(model).keys()
        assert all(torch.equal(values[k], v) for k, v in adapter_values(model).items())


@pytest.mark.parametrize(("method", "options"), [("oft", {"block_size": 16}), ("randlora", {"r": 8})])
def test_names_are_canonical_for_a_compiled_model_both_ways(tmp_path: Path, method: str, options: dict):
    """A torch.compile'd model saves plain layer names and loads plain checkpoints (nothing is run compiled)."""
    model = trained(method, options)
    compiled = torch.compile(model)
    qadapt.save_adapter(compiled, tmp_path / "from-compiled")
    keys = stored_keys(tmp_path / "from-compiled")
    assert keys and not any("_orig_mod" in k for k in keys)
    assert any(k.startswith("__shared__.") for k in keys) == (method == "randlora")
    plain = qadapt.load_adapter(tiny_llama(), tmp_path / "from-compiled")
    assert model_checksum(plain) == model_checksum(model)

    qadapt.save_adapter(model, tmp_path / "plain")
    target = torch.compile(tiny_llama())
    qadapt.load_adapter(target, tmp_path / "plain")
    assert model_checksum(target._orig_mod) == model_checksum(model)

    qadapt.save_peft_adapter(compiled, tmp_path / "peft")
    peft_keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert not any("_orig_mod" in k for k in peft_keys)
    into_compiled = torch.compile(tiny_llama())
    qadapt.load_peft_adapter(into_compiled, tmp_path / "peft", backend="none")
    assert adapter_values(into_compiled._orig_mod).keys() == adapter_values(model).keys()


def test_targets_name_layers_canonically_in_a_compiled_model():
    """Full names and anchored regexes written for the plain model select the same layers in a compiled one."""
    names = ["model.layers.0.self_attn.q_proj", r"re:model\.layers\.1\.mlp\..*_proj"]
    plain = qadapt.wrap(tiny_llama(), method="oft", method_options={"block_size": 16}, targets=names)
    compiled = qadapt.wrap(torch.compile(tiny_llama()), method="oft", method_options={"block_size": 16}, targets=names)
    expected = [n for n, _ in adapter_layers(plain)]
    assert len(expected) == 4
    assert [n for n, _ in adapter_layers(compiled)] == ["_orig_mod." + n for n in expected]
    qadapt.add_adapter(compiled, "second", "oft", method_options={"block_size": 16}, targets=names[:1])
    assert [n for n, m in adapter_layers(compiled) if "second" in m.adapters] == ["_orig_mod." + expected[0]]


def test_names_are_canonical_inside_data_parallel(tmp_path: Path):
    """DataParallel's ``module.`` prefix is no part of saved names either (same wrapper rule as DDP)."""
    model = trained("randlora", {"r": 8, "save_projection": True})
    qadapt.save_adapter(torch.nn.DataParallel(model), tmp_path)
    keys = stored_keys(tmp_path)
    assert not any(k.startswith("module.") for k in keys) and any(k.startswith("__shared__.") for k in keys)
    assert model_checksum(qadapt.load_adapter(tiny_llama(), tmp_path)) == model_checksum(model)


def test_a_pair_from_two_saves_is_read_once_more_then_refused():
    from qadapt.formats.checkpoint_files import PairMismatchError, read_pair

    attempts = []

    def save_finished_in_between():
        attempts.append(1)
        if len(attempts) == 1:
            raise PairMismatchError("config from another save")
        return "consistent"

    assert read_pair(save_finished_in_between) == "consistent" and len(attempts) == 2

    def always_mismatched():
        attempts.append(1)
        raise PairMismatchError("config from another save")

    attempts.clear()
    with pytest.raises(PairMismatchError):
        read_pair(always_mismatched)
    assert len(attempts) == 2
