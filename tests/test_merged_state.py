"""A merged layer's state travels with ``state_dict()``, so a load never applies an adapter twice (#13)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import model_output, perturb_adapters, tiny_llama, token_ids

import qadapt
from qadapt.errors import AdapterStateError

TARGETS = ["q_proj", "v_proj"]
#: bitsandbytes 4-bit layers cannot load_state_dict at all (their quant-state keys are unexpected).
BACKEND = "bnb8"


def wrapped(seed: int = 3, **kwargs) -> torch.nn.Module:
    model = qadapt.wrap(
        tiny_llama(), method="oft", backend=BACKEND, targets=TARGETS, method_options={"block_size": 16}, **kwargs
    )
    perturb_adapters(model, seed=seed, scale=0.2)
    return model


def layers(model: torch.nn.Module) -> list[qadapt.QuantAdapterLinear]:
    return [m for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear)]


def test_a_merged_state_dict_loads_merged(tmp_path: Path):
    ids = token_ids()
    source = wrapped()
    unmerged_output = model_output(source, ids)
    qadapt.merge(source)
    merged_output = model_output(source, ids)
    # Through a safetensors file: the merged state is a plain uint8 tensor.
    save_file(source.state_dict(), str(tmp_path / "merged.safetensors"))
    state = load_file(str(tmp_path / "merged.safetensors"))

    target = wrapped(seed=9)
    target.load_state_dict(state)
    assert [layer.merged_adapter for layer in layers(target)] == ["default"] * 4
    # The adapter is not applied on top of the merged base a second time.
    assert torch.equal(model_output(target, ids), merged_output)
    with pytest.raises(AdapterStateError, match="no snapshot"):
        qadapt.unmerge(target, mode="exact")
    qadapt.unmerge(target, mode="inverse")
    assert float((model_output(target, ids) - unmerged_output).abs().max()) < 0.1 * float(unmerged_output.abs().max())


def test_an_unmerged_state_dict_loads_unmerged_into_a_merged_model():
    ids = token_ids()
    source = wrapped()
    expected = model_output(source, ids)
    target = wrapped(seed=9)
    qadapt.merge(target)
    target.load_state_dict(source.state_dict())
    assert not any(layer.merged for layer in layers(target))
    assert torch.equal(model_output(target, ids), expected)


def test_a_merged_state_dict_of_an_unknown_adapter_is_refused():
    source = wrapped(adapter_name="other")
    qadapt.merge(source)
    target = wrapped()
    with pytest.raises(AdapterStateError, match="saved with adapter 'other' merged"):
        target.load_state_dict(source.state_dict(), strict=False)


def test_state_dict_keys_are_unchanged_while_nothing_is_merged():
    model = wrapped()
    keys = set(model.state_dict())
    assert not any("qadapt_merged_adapter" in k for k in keys)
    qadapt.merge(model)
    assert {k for k in model.state_dict() if k not in keys} == {
        f"{name}.qadapt_merged_adapter" for name, m in model.named_modules() if isinstance(m, qadapt.QuantAdapterLinear)
    }
