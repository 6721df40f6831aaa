"""qadapt.merged_weights: the float merged weights, one layer at a time, the model left bit for bit as it was."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama, token_ids

import qadapt
from qadapt.errors import ConfigError
from qadapt.merging.engine import float_merged_weight
from qadapt.model.layers import adapter_layers


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _wrapped(backend: str = "bnb4", method: str = "lora", **kw):
    model = tiny_llama(bias=kw.pop("bias", False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    qadapt.wrap(model, method=method, backend=backend, **kw)
    perturb_adapters(model, scale=0.1)
    return model


def _checksum(model) -> str:
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("backend", ["bnb4", "bnb8", "hqq"])
def test_names_values_and_an_untouched_model(backend):
    model = _wrapped(backend)
    model(token_ids())  # a forward first: whatever it leaves behind is part of the "before"
    before = _checksum(model)
    got = dict(qadapt.merged_weights(model, dtype=torch.float32))
    assert _checksum(model) == before
    for name, layer in adapter_layers(model):
        storage = layer.backend.get_storage(layer.base)
        _, merged = float_merged_weight(layer.backend, layer.methods["default"], layer.adapters["default"], storage)
        assert torch.equal(got[f"{name}.weight"], merged)
    unwrapped = qadapt.unwrap(_wrapped(backend), merge="float")
    assert list(got) == list(unwrapped.state_dict())
    for key, tensor in unwrapped.state_dict().items():
        if not any(key.startswith(name + ".") for name, _ in adapter_layers(model)):
            assert torch.equal(got[key], tensor.float()), key


def test_bf16_stream_matches_what_the_model_computes():
    model = _wrapped("bnb4", method="ia3", bias=True)
    ids = token_ids()
    with torch.no_grad():
        adapted = model(ids).logits
    weights = dict(qadapt.merged_weights(model))  # bfloat16 by default
    assert all(t.dtype == torch.bfloat16 for t in weights.values() if t.is_floating_point())
    plain = tiny_llama(bias=True)
    assert set(weights) == set(plain.state_dict())
    plain.load_state_dict({k: v.float() for k, v in weights.items()})
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, adapted, atol=0.05)
    name, layer = next(iter(adapter_layers(model)))  # IA³ scales the bias of attention layers
    assert not torch.equal(weights[f"{name}.bias"], layer.bias_tensor.bfloat16())


def test_merge_aware_layers_give_what_their_merge_stores():
    model = _wrapped("bnb4", merge_aware=True)
    weights = dict(qadapt.merged_weights(model, dtype=None, adapted_only=True))
    qadapt.merge(model)
    for name, layer in adapter_layers(model):
        assert torch.equal(weights[f"{name}.weight"], layer.backend.dequantize_module(layer.base))
    assert set(weights) == {f"{name}.weight" for name, _ in adapter_layers(model)}


def test_merged_and_disabled_layers_give_their_storage_and_bad_dtype_is_refused():
    model = _wrapped("bnb8")
    with qadapt.disable_adapters(model):
        off = dict(qadapt.merged_weights(model, dtype=None, adapted_only=True))
    for name, layer in adapter_layers(model):
        assert torch.equal(off[f"{name}.weight"], layer.backend.dequantize_module(layer.base))
    with pytest.raises(ConfigError, match="dtype"):
        qadapt.merged_weights(model, dtype=torch.int8)


def test_names_drop_wrapper_segments():
    model = _wrapped("bnb8")
    compiled = torch.compile(model)  # not run: only its module tree (`_orig_mod.`) matters here
    plain = [name for name, _ in qadapt.merged_weights(model)]
    assert [name for name, _ in qadapt.merged_weights(compiled)] == plain
    assert not any("_orig_mod" in name for name in plain)
