"""Faults: a plugin failing mid-merge, a plugin that cannot be imported, a save interrupted midway.

In every case the model (weights, quantized storage, merge state) or the checkpoint on disk is
what it was before the fault.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import model_checksum
from methods_for_tests import AddDelta, KnownOptions
from safetensors.torch import save_file
from tiny_models import model_output, perturb_adapters, tiny_llama, token_ids
from torch import nn

import qadapt
import qadapt.persist.adapter as checkpoint
from qadapt.config import ConfigValidationError
from qadapt.persist.adapter import WEIGHTS_FILE
from qadapt_bnb import Bnb4Backend

N_LAYERS = 5
FAIL_AT = 3


def five_linears() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(32, 32) for _ in range(N_LAYERS)])


def state(model: nn.Module) -> tuple:
    """Weights and buffers (quantized storage included) plus every layer's merge state."""
    layers = [m for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear)]
    return model_checksum(model), tuple(layer.merged_adapter for layer in layers)


class FaultInMerge(AddDelta):
    """AddDelta whose merge raises on the ``FAIL_AT``-th layer it merges."""

    name = "fault_in_merge"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.calls = 0

    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == FAIL_AT:
            raise RuntimeError("plugin bug in merge_weight")
        return super().merge_weight(adapter, weight)


class FaultInRequantize(Bnb4Backend):
    """The real bnb4 backend, except that its ``FAIL_AT``-th requantize raises."""

    name = "fault_in_requantize"
    calls = 0

    def requantize(self, weight, like):
        type(self).calls += 1
        if type(self).calls == FAIL_AT:
            raise MemoryError("out of memory while requantizing")
        return super().requantize(weight, like)


FAULTY_METHOD_SOURCE = """
from methods_for_tests import AddDelta

calls = 0


class Faulty(AddDelta):
    def merge_weight(self, adapter, weight):
        global calls
        calls += 1
        if calls == 3:
            raise ValueError("third-party plugin failed on its third layer")
        return super().merge_weight(adapter, weight)
"""


def merge_faulty(method: str, make_distribution) -> tuple[nn.Module, type[BaseException], str]:
    if method == "instance":
        model = qadapt.wrap(five_linears(), method=FaultInMerge(KnownOptions()), backend="bnb4")
        return model, RuntimeError, "plugin bug in merge_weight"
    if method == "distribution":
        make_distribution(
            "qa-faulty", "0.3", {"qadapt.methods": {"faulty": "qa_faulty:Faulty"}}, {"qa_faulty": FAULTY_METHOD_SOURCE}
        )
        model = qadapt.wrap(five_linears(), method="faulty", backend="bnb8")
        return model, ValueError, "third-party plugin failed"
    FaultInRequantize.calls = 0
    model = qadapt.wrap(five_linears(), method=AddDelta(KnownOptions()), backend=FaultInRequantize())
    return model, MemoryError, "out of memory"


@pytest.mark.parametrize("keep_snapshot", [True, False], ids=["snapshot", "no-snapshot"])
@pytest.mark.parametrize("where", ["instance", "distribution", "backend"])
def test_a_fault_on_the_third_of_five_layers_leaves_the_model_as_it_was(where, keep_snapshot, make_distribution):
    model, error, words = merge_faulty(where, make_distribution)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_before = model(x)
    before = state(model)
    with pytest.raises(error, match=words):
        qadapt.merge(model, keep_snapshot=keep_snapshot)
    assert state(model) == before
    assert not any(m.merged for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear))
    with torch.no_grad():
        assert torch.equal(model(x), out_before)


class FaultInUnmerge(AddDelta):
    """Merges fine; its ``FAIL_AT``-th inverse unmerge raises."""

    name = "fault_in_unmerge"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.calls = 0

    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == FAIL_AT:
            raise RuntimeError("plugin bug in unmerge_weight")
        return super().unmerge_weight(adapter, weight)


@pytest.mark.parametrize("backend", ["bnb8", "bnb4"])
def test_a_fault_while_unmerging_leaves_the_model_merged_as_it_was(backend):
    model = qadapt.wrap(five_linears(), method=FaultInUnmerge(KnownOptions()), backend=backend)
    qadapt.merge(model)
    merged = state(model)
    with pytest.raises(RuntimeError, match="plugin bug in unmerge_weight"):
        qadapt.unmerge(model, mode="inverse")
    assert state(model) == merged


# ------------------------------------------------------------------------------ broken plugins

BROKEN_IMPORT = """
import a_module_that_does_not_exist_anywhere
"""
BROKEN_AT_IMPORT_TIME = """
raise RuntimeError("plugin crashed while importing")
"""


@pytest.fixture
def broken_plugins(make_distribution):
    make_distribution(
        "qa-broken-faults",
        "0.9",
        {
            "qadapt.methods": {"missingdep": "qa_broken_dep:Method"},
            "qadapt.backends": {"crashes": "qa_broken_crash:Backend"},
        },
        {"qa_broken_dep": BROKEN_IMPORT, "qa_broken_crash": BROKEN_AT_IMPORT_TIME},
    )


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_works(broken_plugins):
    listing = {(p.family, p.name): p for p in qadapt.plugins()}
    dep = listing[("methods", "missingdep")]
    assert not dep.ok and dep.distribution == "qa-broken-faults"
    assert "a_module_that_does_not_exist_anywhere" in dep.status and "failed to load" in dep.status
    crash = listing[("backends", "crashes")]
    assert not crash.ok and "plugin crashed while importing" in crash.status
    assert all(listing[key].ok for key in [("methods", "oft"), ("methods", "randlora"), ("backends", "bnb4")])

    with pytest.raises(ConfigValidationError) as info:
        qadapt.wrap(tiny_llama(), method="missingdep")
    assert "method.name" in str(info.value) and "qa-broken-faults 0.9" in str(info.value)
    assert "failed to load" in str(info.value) and "a_module_that_does_not_exist_anywhere" in str(info.value)

    # backend="auto" tries every installed backend; the one that cannot load does not stop it.
    model = qadapt.wrap(tiny_llama(), method="oft", method_options={"block_size": 16}, targets="q_proj")
    assert qadapt.summary(model).backends == {"none": 2}
    model = qadapt.wrap(tiny_llama(), method="randlora", backend="bnb4", targets="v_proj", method_options={"r": 8})
    qadapt.merge(model)
    qadapt.unmerge(model)


# ------------------------------------------------------------------------------ interrupted save


def trained(seed: int) -> nn.Module:
    model = qadapt.wrap(
        tiny_llama(), method="oft", backend="bnb4", targets=["q_proj", "v_proj"], method_options={"block_size": 16}
    )
    perturb_adapters(model, seed=seed)
    return model


def adapter_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def half_written_then_fail(tensors, filename, metadata=None):
    save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as handle:
        handle.truncate(os.path.getsize(filename) // 2)
    raise OSError(28, "No space left on device")


def failing_replace(src, dst):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("patch", "error"),
    [("save_file", OSError), ("os_replace", KeyboardInterrupt)],
    ids=["disk-full-midway", "interrupted-at-rename"],
)
def test_an_interrupted_save_leaves_the_previous_checkpoint_readable(tmp_path: Path, monkeypatch, patch, error):
    ids = token_ids()
    first = trained(seed=3)
    qadapt.save_adapter(first, tmp_path)
    old_bytes = (tmp_path / WEIGHTS_FILE).read_bytes()
    expected = model_output(first, ids)

    second = trained(seed=4)
    assert not torch.equal(model_output(second, ids), expected)
    if patch == "save_file":
        monkeypatch.setattr(checkpoint, "save_file", half_written_then_fail)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(error):
        qadapt.save_adapter(second, tmp_path)
    monkeypatch.undo()

    assert (tmp_path / WEIGHTS_FILE).read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, checkpoint.CONFIG_FILE])
    loaded = qadapt.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(model_output(loaded, ids), expected)
    values = adapter_values(loaded)
    assert all(torch.equal(values[n], v) for n, v in adapter_values(first).items())


# ----------------------------------------------------------- every whole-model operation, half way


class FaultInRestore(Bnb4Backend):
    """The real bnb4 backend, except that its ``FAIL_AT``-th snapshot restore raises."""

    name = "fault_in_restore"
    calls = 0

    def restore(self, module, snapshot):
        type(self).calls += 1
        if type(self).calls == FAIL_AT:
            raise RuntimeError("restore failed half way")
        super().restore(module, snapshot)


def layer_types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model]


def test_unwrap_without_merge_failing_half_way_leaves_every_layer_merged_and_wrapped():
    FaultInRestore.calls = 0
    model = qadapt.wrap(five_linears(), method=AddDelta(KnownOptions()), backend=FaultInRestore())
    perturb_adapters(model)
    qadapt.merge(model)
    before, types = state(model), layer_types(model)
    with pytest.raises(RuntimeError, match="restore failed half way"):
        qadapt.unwrap(model, merge=False)
    assert layer_types(model) == types == ["QuantAdapterLinear"] * N_LAYERS
    assert state(model) == before  # every layer still merged, storage bit for bit
    qadapt.unmerge(model)  # and the snapshots still work
    assert not any(m.merged for m in model)


@pytest.mark.parametrize("merge", [True, "float"])
def test_unwrap_with_a_merge_failing_half_way_leaves_the_model_wrapped_as_it_was(merge):
    model = qadapt.wrap(five_linears(), method=FaultInMerge(KnownOptions()), backend="bnb4")
    perturb_adapters(model)
    before, types = state(model), layer_types(model)
    with pytest.raises(RuntimeError, match="plugin bug in merge_weight"):
        qadapt.unwrap(model, merge=merge)
    assert layer_types(model) == types
    assert state(model) == before
    assert not hasattr(model, "qadapt_merge_report")


class FaultInCreate(AddDelta):
    """Creates adapters until the ``FAIL_AT``-th layer."""

    name = "fault_in_create"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.calls = 0

    def create_adapter(self, in_features, out_features, shared):
        self.calls += 1
        if self.calls == FAIL_AT:
            raise RuntimeError("plugin bug in create_adapter")
        return super().create_adapter(in_features, out_features, shared)


def test_add_adapter_failing_half_way_leaves_the_adapters_as_they_were():
    model = qadapt.wrap(five_linears(), method=AddDelta(KnownOptions()), backend="bnb8")
    qadapt.set_adapter(model, "default")
    grads = [p.requires_grad for p in model.parameters()]
    before = state(model)
    with pytest.raises(RuntimeError, match="plugin bug in create_adapter"):
        qadapt.add_adapter(model, "second", FaultInCreate(KnownOptions()))
    assert qadapt.list_adapters(model) == ["default"]
    assert all(m.active_adapter == "default" for m in model)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert state(model) == before


def test_load_adapter_that_does_not_fit_takes_back_the_adapter_it_added(tmp_path: Path):
    source = qadapt.wrap(five_linears(), method="lora", backend="bnb8")
    qadapt.save_adapter(source, tmp_path / "ckpt")
    # Same layer names, but layer 3 is narrower: the adapter is added to every layer, then the fit
    # check refuses layer 3's shape, and what was added must go again.
    torch.manual_seed(1)
    other = nn.Sequential(*[nn.Linear(32, 16 if i == FAIL_AT else 32) for i in range(N_LAYERS)])
    model = qadapt.wrap(other, method="lora", backend="bnb8", adapter_name="mine")
    grads = [p.requires_grad for p in model.parameters()]
    before = state(model)
    with pytest.raises(qadapt.CheckpointError, match="does not fit"):
        qadapt.load_adapter(model, tmp_path / "ckpt")
    assert qadapt.list_adapters(model) == ["mine"]
    assert all(m.active_adapter == "mine" for m in model)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert state(model) == before


def test_a_failed_undo_step_does_not_stop_the_rest():
    from qadapt.model.transaction import transaction

    model = five_linears()
    ran = []
    with pytest.raises(RuntimeError, match="first undo"):
        with transaction(model) as tx:
            tx.on_undo(lambda: ran.append("older"))
            tx.on_undo(lambda: (_ for _ in ()).throw(RuntimeError("first undo")))
            tx.replace("0", nn.Identity())
            raise KeyError("the operation")
    assert ran == ["older"]
    assert isinstance(model[0], nn.Linear)
