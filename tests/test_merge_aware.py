"""Merge-aware training: the layer computes with the storage its merge writes, so merged == unmerged exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama, token_ids
from torch import nn

import qadapt
from qadapt.errors import CapabilityError, ConfigError
from qadapt.model.layers import adapter_layers
from qadapt.protocols import BackendCapabilities
from qadapt.registry.reference import FloatBackend

BACKENDS = [
    ("bnb4", {"quant_type": "nf4", "compress_statistics": True}),
    ("bnb4", {"quant_type": "nf4", "compress_statistics": False}),
    ("bnb4", {"quant_type": "fp4", "compress_statistics": True}),
    ("bnb4", {"quant_type": "fp4", "compress_statistics": False}),
    ("bnb8", {}),
    ("torchao", {}),
    ("hqq", {}),
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _trained(backend: str, options: dict, method: str = "lora", steps: int = 2, **kw) -> nn.Module:
    model = tiny_llama(**kw)
    method_options = {"r": 4} if method == "lora" else {}
    qadapt.wrap(model, method=method, backend=backend, backend_options=options, method_options=method_options,
                merge_aware=True)  # fmt: skip
    perturb_adapters(model, scale=0.2)
    ids = token_ids()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        optimizer.step()
    return model


def _storages(model: nn.Module) -> list:
    return [layer.backend.get_storage(layer.base) for _, layer in adapter_layers(model)]


@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_merged_model_computes_exactly_what_was_trained(backend, options):
    model = _trained(backend, options)
    ids = token_ids(seed=4)
    modes = ("eval", "train") if backend == "bnb8" else ("eval",)  # bnb8's int8 forward differs by mode
    for mode in modes:
        getattr(model, mode)()
        before = _storages(model)
        with torch.no_grad():
            unmerged = model(ids).logits
        report = qadapt.merge(model)
        with torch.no_grad():
            merged = model(ids).logits
        assert torch.equal(merged, unmerged), (mode, float((merged - unmerged).abs().max()))
        assert all(r.merge_aware and not r.reverted for r in report.layers.values())
        assert f"{len(report.layers)} merge-aware layer(s) stored exactly as trained" in str(report)
        # The merge changed codes (the test would pass trivially if it stored the old storage).
        changed = [not new.equal(old) for new, old in zip(_storages(model), before, strict=True)]
        assert any(changed)
        qadapt.unmerge(model)
        assert all(new.equal(old) for new, old in zip(_storages(model), before, strict=True))


def test_merge_aware_layers_are_not_warned_about(recwarn):
    model = _trained("bnb4", {}, steps=1)
    warnings.simplefilter("always")
    qadapt.merge(model)  # their weight-space "kept" is far from 1: they store the trained storage, not W'
    assert not [w for w in recwarn if "keep less than" in str(w.message)]


def test_bias_changing_method_merges_exactly():
    model = _trained("bnb4", {}, method="ia3", bias=True)
    model.eval()
    ids = token_ids(seed=4)
    with torch.no_grad():
        unmerged = model(ids).logits
        qadapt.merge(model)
        assert torch.equal(model(ids).logits, unmerged)


def _grads(backend: str, merge_aware: bool, checkpointing: bool = False) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    qadapt.wrap(model, method="lora", backend=backend, method_options={"r": 4, "dropout": 0.0},
                merge_aware=merge_aware)  # fmt: skip
    perturb_adapters(model, scale=0.05)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = token_ids()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_straight_through_gradient_is_the_float_layers_gradient():
    # On the float backend, requantizing is exact: merge-aware training is plain training.
    aware, plain = _grads("none", True), _grads("none", False)
    assert aware.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(aware[name], plain[name], rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = _grads("bnb4", True), _grads("bnb4", True, checkpointing=True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8)


class _Counting(FloatBackend):
    """The float backend, counting requantizes (to see the per-step cache)."""

    calls = 0

    def requantize(self, weight, like):
        type(self).calls += 1
        return super().requantize(weight, like)


def test_target_storage_is_cached_until_the_adapter_changes():
    layer = qadapt.QuantAdapterLinear(nn.Linear(16, 8), "lora", _Counting(), method_options={"r": 2},
                                      merge_aware=True)  # fmt: skip
    x = torch.randn(3, 16)
    base = layer.backend.get_storage(layer.base).tensors["weight"]
    before = base.clone()
    _Counting.calls = 0
    layer(x).sum().backward()
    layer(x).sum().backward()  # gradient accumulation: the same adapter, the same storage
    assert _Counting.calls == 1
    with torch.no_grad():
        next(layer.adapters.parameters()).add_(0.1)  # an optimizer step
    layer(x)
    assert _Counting.calls == 2
    after = layer.backend.get_storage(layer.base).tensors["weight"]
    assert after.data_ptr() == base.data_ptr() and torch.equal(after, before)  # the base is as it was


def test_forward_leaves_the_base_as_it_was_and_disabled_adapters_run_the_base():
    model = _trained("bnb4", {}, steps=1)
    before = [(n, t.clone()) for n, t in model.state_dict().items()]
    ids = token_ids()
    with torch.no_grad():
        model(ids)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in before)
    qadapt.disable_adapters(model)
    with torch.no_grad():
        disabled = model(ids).logits
    qadapt.enable_adapters(model)
    qadapt.set_merge_aware(model, False)
    assert not any(layer.merge_aware for _, layer in adapter_layers(model))
    qadapt.disable_adapters(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, disabled)


def test_refusals_name_the_problem():
    class ForwardOnly(FloatBackend):
        capabilities = BackendCapabilities(requantize=False, snapshot=False)

    with pytest.raises(CapabilityError, match="merge_aware needs a backend that can requantize"):
        qadapt.QuantAdapterLinear(nn.Linear(8, 8), "lora", ForwardOnly(), merge_aware=True)
    layer = qadapt.QuantAdapterLinear(nn.Linear(8, 8), "lora", "bnb8", merge_aware=True)
    with pytest.raises(ConfigError, match="merge-aware"):
        layer.merge(requantize="fresh")
    assert not layer.merged
    with pytest.raises(qadapt.ArgumentTypeError, match="merge_aware"):
        layer.merge_aware = "yes"
    with pytest.raises(ConfigError, match="not both"):
        qadapt.wrap(tiny_llama(), config={"method": "lora"}, merge_aware=True)


def test_config_file_and_checkpoint_carry_merge_aware(tmp_path):
    path = tmp_path / "qadapt.yaml"
    path.write_text("method: lora\nbackend: bnb4\nmerge_aware: true\n")
    model = qadapt.wrap(tiny_llama(), config=path)
    assert all(layer.merge_aware for _, layer in adapter_layers(model))
    qadapt.save_adapter(model, tmp_path / "adapter")
    loaded = qadapt.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert all(layer.merge_aware for _, layer in adapter_layers(loaded))
    plain = qadapt.wrap(tiny_llama(), method="lora", backend="bnb4")
    qadapt.save_adapter(plain, tmp_path / "plain")
    assert "merge_aware" not in (tmp_path / "plain" / "qadapt_config.json").read_text()


@pytest.mark.parametrize("backend", ["bnb4", "bnb8", "hqq", "torchao"])
def test_forward_keeps_the_base_parameter_objects(backend):
    layer = qadapt.QuantAdapterLinear(nn.Linear(64, 32), "lora", backend, merge_aware=True)
    perturb_adapters(layer, scale=0.3)
    params = dict(layer.base.named_parameters())
    before = layer.backend.snapshot(layer.base)
    layer(torch.randn(2, 64)).sum().backward()
    assert all(p is params[name] for name, p in layer.base.named_parameters())
    assert layer.backend.get_storage(layer.base).equal(before)


@pytest.mark.parametrize(("method", "options"), [("oft", {"block_size": 32}), ("scales", {}), ("dora", {"r": 4})])
def test_other_methods_merge_exactly(method, options):
    model = tiny_llama()
    qadapt.wrap(model, method=method, backend="bnb4", method_options=options, merge_aware=True)
    perturb_adapters(model, scale=0.2)
    model.eval()
    ids = token_ids(seed=4)
    with torch.no_grad():
        unmerged = model(ids).logits
        report = qadapt.merge(model)
        assert torch.equal(model(ids).logits, unmerged)
    assert all(r.merge_aware for r in report.layers.values())
