"""Calibration statistics: one product for layers sharing an input, fit batches cut after the last
layer, the held-out pass's logits reused, and all of it equal to the plain per-layer sums."""

from __future__ import annotations

import pytest
import torch
from conftest import model_checksum
from tiny_models import perturb_adapters, tiny_llama, token_ids
from torch import nn

import qadapt
from qadapt.model.calibration import collect_stats, model_outputs, split_batches
from qadapt.model.layers import wrapped_layers


def reference_stats(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list) -> dict[str, torch.Tensor]:
    """``sum x^T x`` per layer over full forwards, each layer on its own (float64)."""
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in layers}

    def hook_for(name: str, in_features: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, in_features).double()
            sums[name] += x.T @ x

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m.in_features)) for n, m in layers]
    try:
        with torch.no_grad():
            for _, batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return sums


def test_stats_equal_the_per_layer_sums_and_the_heldout_logits_are_the_models():
    model = qadapt.wrap(tiny_llama(num_layers=2), method="lora", backend="bnb4").eval()
    batches = split_batches([token_ids(seed=s) for s in range(8)])
    layers = wrapped_layers(model)
    # A subset that ends before the model's last layers: fit batches stop after it.
    first_block = [(n, m) for n, m in layers if ".layers.0." in n]
    outputs: list[torch.Tensor] = []
    heads: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda *_: heads.append(1))
    stats = collect_stats(model, first_block, batches.fit, batches.heldout, outputs)
    handle.remove()
    assert len(heads) == 1 + len(batches.heldout)  # the fit batches after the first stop after layer 0
    fit_ref = reference_stats(model, first_block, batches.fit)
    held_ref = reference_stats(model, first_block, batches.heldout)
    rows = sum(b.numel() for _, b in batches.fit)
    for name, _ in first_block:
        assert stats[name].fit_rows == rows
        assert torch.allclose(stats[name].fit.double(), fit_ref[name], rtol=1e-5, atol=1e-4)
        assert torch.allclose(stats[name].heldout.double(), held_ref[name], rtol=1e-5, atol=1e-4)
    # q/k/v see one input: their statistics are the same numbers.
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"].fit for p in "qkv")
    assert torch.equal(q, k) and torch.equal(k, v)
    expected = model_outputs(model, batches.heldout)
    assert len(outputs) == len(expected) and all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))


class Twice(nn.Module):
    """One linear layer applied twice per forward (a shared layer): no batch may be cut short."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.proj(x)))


def test_a_layer_called_twice_per_batch_gets_both_inputs():
    model = qadapt.wrap(Twice(), method="lora", backend="bnb4", targets="proj").eval()
    batches = split_batches([torch.randn(4, 16, generator=torch.Generator().manual_seed(s)) for s in range(6)])
    layers = wrapped_layers(model)
    stats = collect_stats(model, layers, batches.fit, batches.heldout)
    ref = reference_stats(model, layers, batches.fit)
    assert stats["proj"].fit_rows == 2 * sum(b.shape[0] for _, b in batches.fit)
    assert torch.allclose(stats["proj"].fit.double(), ref["proj"], rtol=1e-5, atol=1e-5)


def test_a_sequential_merge_takes_later_inputs_from_the_merged_layers():
    ids = [token_ids(seed=s, batch=4, length=32) for s in range(8)]

    def merged(**options):
        model = qadapt.wrap(tiny_llama(num_layers=2), method="lora", backend="bnb4").eval()
        perturb_adapters(model, scale=0.05)
        seen: dict[str, torch.Tensor] = {}
        down = model.get_submodule("model.layers.1.mlp.down_proj")
        real = down.merge

        def spy(*args, **kwargs):  # the statistics the last layer is merged against
            seen["fit"] = kwargs["stats"].hessian.clone()
            return real(*args, **kwargs)

        down.merge = spy
        report = qadapt.merge(model, calibration=ids, warn_below=None, **options)
        return report, seen["fit"]

    plain, plain_fit = merged()
    ordered, ordered_fit = merged(sequential=True)
    assert ordered.layers.keys() == plain.layers.keys() and ordered.model_kept is not None
    assert not torch.equal(plain_fit, ordered_fit)  # its inputs came through the merged layers
    assert all(r.kept is None or r.kept >= 0 for r in ordered.layers.values())
    _, two_fit = merged(sequential=2)
    assert not torch.equal(two_fit, plain_fit)


@pytest.mark.parametrize("value", [0, -1, 1.5, "yes"])
def test_sequential_refuses_what_is_not_a_number_of_runs(value):
    model = qadapt.wrap(tiny_llama(num_layers=1), method="lora", backend="bnb4")
    before = model_checksum(model)
    with pytest.raises(qadapt.ConfigError, match="sequential must be"):
        qadapt.merge(model, calibration=[token_ids(seed=s) for s in range(4)], sequential=value)
    with pytest.raises(qadapt.ConfigError, match="sequential needs calibration"):
        qadapt.merge(model, sequential=True)
    assert model_checksum(model) == before
