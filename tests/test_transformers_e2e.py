"""End to end on real transformers models: wrap → train → save → load → merge → unwrap, per backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, model_output, tiny_bert, tiny_llama, token_ids
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import qadapt

CASES = [
    ("llama", "oft", {"block_size": 16}),
    ("bert", "randlora", {"r": 8, "alpha": 16.0}),
]
BUILDERS = {"llama": tiny_llama, "bert": tiny_bert}


def loss_of(model: torch.nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = model_output(model, ids)
    if out.shape[-1] == VOCAB:
        return torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1))
    return torch.nn.functional.mse_loss(out, target)


@pytest.mark.parametrize("backend", ["none", "bnb8", "bnb4"])
@pytest.mark.parametrize(("arch", "method", "options"), CASES, ids=[c[0] for c in CASES])
def test_wrap_train_save_load_merge_unwrap(tmp_path: Path, arch: str, method: str, options: dict, backend: str):
    build = BUILDERS[arch]
    ids = token_ids(length=8)
    model = qadapt.wrap(build(), method=method, backend=backend, method_options=options)
    model.train()
    generator = torch.Generator().manual_seed(7)
    if arch == "llama":
        target = torch.roll(ids, shifts=1, dims=1)
    else:
        target = torch.randn(model_output(model, ids).shape, generator=generator)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = loss_of(model, ids, target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses
    model.eval()
    trained = model_output(model, ids).detach()

    qadapt.save_adapter(model, tmp_path)
    fresh = qadapt.load_adapter(build(), tmp_path)
    assert torch.equal(model_output(fresh, ids), trained)

    report = qadapt.merge(fresh)
    assert len(report.layers) == qadapt.summary(model).layers
    merged = model_output(fresh, ids).detach()
    tolerance = 1e-4 if backend == "none" else 0.25
    assert (merged - trained).abs().max() / trained.abs().max() < tolerance
    qadapt.unwrap(fresh, merge=True)
    assert not any(isinstance(m, qadapt.QuantAdapterLinear) for m in fresh.modules())
    unwrapped = model_output(fresh, ids)
    if backend == "bnb4":
        # Linear4bit's own CPU inference kernel (used after unwrap) rounds differently.
        assert (unwrapped - merged).abs().max() / merged.abs().max() < 1e-2
    else:
        assert torch.equal(unwrapped, merged)


@pytest.mark.parametrize("load_in", ["4bit", "8bit"])
def test_adopts_a_model_loaded_with_bitsandbytes_config(tmp_path: Path, load_in: str):
    tiny_llama().save_pretrained(tmp_path)
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if load_in == "4bit"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    model = LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    qadapt.wrap(model, method="oft", method_options={"block_size": 16})
    expected_backend = "bnb4" if load_in == "4bit" else "bnb8"
    info = qadapt.summary(model)
    assert info.backends == {expected_backend: 14}
    # The head stays float and unwrapped; only the adapters train.
    assert type(model.lm_head) is torch.nn.Linear
    assert all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)
    ids = token_ids(length=8)
    before = model_output(model, ids).detach()
    qadapt.merge(model)
    qadapt.unmerge(model)
    assert torch.equal(model_output(model, ids), before)
