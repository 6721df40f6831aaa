"""``merge(model, calibration="self")``: text the adapted model writes itself; and what a merge with no data says."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import perturb_adapters, tiny_llama

import qadapt
from qadapt.errors import ArgumentTypeError, ConfigError


def adapted(scale: float = 0.05) -> torch.nn.Module:
    model = qadapt.wrap(tiny_llama(), method="lora", backend="bnb4", method_options={"r": 4})
    perturb_adapters(model, scale=scale)
    return model.eval()


@torch.no_grad()
def test_self_calibration_is_seeded_samples_the_adapted_model_and_keeps_the_callers_rng():
    model = adapted()
    state = torch.random.get_rng_state()
    first = qadapt.self_calibration(model, tokens=1024, seq_len=32, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    again = qadapt.self_calibration(model, tokens=1024, seq_len=32, seed=3)
    other = qadapt.self_calibration(model, tokens=1024, seq_len=32, seed=4)
    assert len(first) == 8 and first[0]["input_ids"].shape == (4, 32)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other, strict=True))
    assert all(bool((b["input_ids"][:, 0] == model.config.bos_token_id).all()) for b in first)
    # Sampled with the adapters on: disabling them changes what is written.
    qadapt.disable_adapters(model)
    plain = qadapt.self_calibration(model, tokens=1024, seq_len=32, seed=3)
    qadapt.enable_adapters(model)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, plain, strict=True))


@torch.no_grad()
def test_merge_with_self_calibration_is_the_merge_with_those_batches():
    model = adapted()
    report = qadapt.merge(model, calibration="self")
    assert report.calibration_source == "self" and report.calibration_batches == 32  # 8192 tokens in rows of 64
    assert "of its own text (self-calibrated)" in str(report) and report.to_dict()["calibration_source"] == "self"
    assert all(r.path == "calibrated" for r in report.layers.values())
    again = adapted()
    # seq_len defaults to the model's max_position_embeddings (64) when shorter than 128
    batches = qadapt.self_calibration(again, seq_len=64)
    given = qadapt.merge(again, calibration=batches)
    assert {n: r.kept for n, r in given.layers.items()} == {n: r.kept for n, r in report.layers.items()}
    assert given.calibration_source == "batches"
    with pytest.raises(ArgumentTypeError, match=r"inputs or 'self', got a single str 'data\.txt'"):
        qadapt.merge(adapted(), calibration="data.txt")
    with pytest.raises(ConfigError, match="fewer than 2 batches"):
        qadapt.self_calibration(model, tokens=100)


def test_a_merge_without_data_that_keeps_little_names_the_share_and_the_options():
    model = adapted(scale=0.002)  # a change far below one 4-bit step, as real fine-tunes make
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = qadapt.merge(model)
    assert report.advice is not None and report.advice in str(report)
    median = sorted(r.kept for r in report.layers.values())[len(report.layers) // 2]
    assert f"kept {median:.1%} of their adapter's effect" in report.advice
    for option in ("calibration=batches", "calibration='self'", "--calibration FILE", "merge='float'"):
        assert option in report.advice
    low = [str(w.message) for w in caught if "without calibration data" in str(w.message)]
    assert len(low) == 1 and report.advice in low[0] and "keep less than 50%" in low[0]
    # with data, no such advice
    assert qadapt.merge(adapted(scale=0.002), calibration="self", warn_below=None).advice is None
