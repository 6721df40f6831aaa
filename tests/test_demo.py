"""The demo's shifted teacher: a stand-in fine-tune the quantized base cannot reach by re-rounding."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

from qadapt.cli.demo import shifted


def test_no_shift_is_the_model_itself():
    model = tiny_llama()
    assert shifted(model, 0.0, seed=0) is model


def test_shift_adds_a_rank_4_change_of_the_given_size_to_every_linear_but_the_head():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = shifted(model, 0.3, seed=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the original is untouched
    changed = 0
    for name, module in teacher.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        old = before[f"{name}.weight"]
        if module is teacher.get_output_embeddings():
            assert torch.equal(module.weight, old)
            continue
        change = module.weight.detach() - old
        assert float(change.norm() / old.norm()) == pytest.approx(0.3, rel=1e-4)
        assert int(torch.linalg.matrix_rank(change)) == 4
        changed += 1
    assert changed == 14
