"""What a merge keeps: the never-worse guard, calibration and output-space figures, merge targets.

Backend-specific requantizers (keep-state, calibrated, group scales) have their own tests; these
check the core protocol around them on every built-in backend.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import BACKEND_IDS, BACKENDS, model_checksum
from tiny_models import tiny_llama, token_ids
from torch import nn

import qadapt
from qadapt import AdapterStateError, ArgumentTypeError, ConfigError, UnsafeMergeError
from qadapt.merging.engine import kept_share, output_sq_error, weight_figures

OFT = {"block_size": 16}


def calibration(batches: int = 8, batch: int = 4, length: int = 32) -> list[torch.Tensor]:
    return [token_ids(seed=100 + i, batch=batch, length=length) for i in range(batches)]


@torch.no_grad()
def trained_like(model: nn.Module, scale: float, seed: int = 3) -> None:
    """Move every adapter parameter off identity by ``scale`` (a stand-in for training)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def wrapped_llama(backend: str, options: dict, method: str = "oft", scale: float = 0.01) -> nn.Module:
    model = tiny_llama()
    method_options = OFT if method == "oft" else {"r": 4}
    qadapt.wrap(model, method=method, backend=backend, method_options=method_options, backend_options=options)
    trained_like(model, scale)
    return model


@pytest.mark.parametrize("method", ["oft", "randlora"])
@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("requantize", ["keep", "fresh"])
def test_default_and_fresh_merges_are_never_worse_than_no_adapter(method, backend, options, requantize):
    model = wrapped_llama(backend, options, method, scale=0.002)
    report = qadapt.merge(model, requantize=requantize, warn_below=None)
    for name, result in report.layers.items():
        assert result.kept is not None and result.kept >= 0.0, name
        assert result.metric == "weight"
        assert not result.reverted or result.kept == 0.0


@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=BACKEND_IDS)
def test_calibrated_merge_reports_output_space_figures_per_layer_and_for_the_model(backend, options):
    model = wrapped_llama(backend, options)
    report = qadapt.merge(model, calibration=calibration(), warn_below=None)
    assert report.model_kept is not None and report.model_kept <= 1.0
    assert all(r.metric == "output" and r.kept is not None and r.kept >= 0.0 for r in report.layers.values())
    if backend == "none":
        assert report.model_kept == pytest.approx(1.0, abs=1e-4)
        assert report.min_kept == pytest.approx(1.0, abs=1e-4)
    assert "model outputs kept" in str(report)
    assert report.to_dict()["layers"].keys() == report.layers.keys()


def test_output_kept_matches_a_direct_measurement_on_held_out_rows():
    model = wrapped_llama("bnb4", {"quant_type": "nf4"}, scale=0.02)
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(name)
    inputs: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().reshape(-1, 128)))
    batches = calibration()
    with torch.no_grad():
        for batch in batches[3::4]:
            model(batch)
            adapted = layer(inputs[-1])
    handle.remove()
    x = torch.cat(inputs)  # the held-out rows (every fourth batch)
    with torch.no_grad():
        layer.enable_adapters(False)
        base = layer(x)
        layer.enable_adapters(True)
        adapted = layer(x)
    report = qadapt.merge(model, calibration=batches, requantize="fresh", warn_below=None)
    with torch.no_grad():
        merged = layer(x)
    direct = 1 - float((merged - adapted).norm() / (base - adapted).norm())
    assert report.layers[name].kept == pytest.approx(direct, abs=2e-3)


def test_guard_keeps_the_old_storage_when_requantizing_would_be_worse():
    layer = qadapt.QuantAdapterLinear(nn.Linear(64, 64), "oft", "bnb4", method_options=OFT)
    trained_like(layer, 1e-5)  # far below one 4-bit step: a fresh requantize only adds error
    before = layer.backend.snapshot(layer.base)
    result = layer.merge(requantize="fresh")
    assert result.reverted and result.kept == 0.0
    assert layer.backend.get_storage(layer.base).equal(before)
    assert layer.merged
    layer.unmerge()
    assert layer.backend.get_storage(layer.base).equal(before)


def test_low_kept_share_warns_and_the_threshold_is_an_option():
    model = wrapped_llama("bnb4", {"quant_type": "nf4"}, scale=0.002)
    with pytest.warns(UserWarning, match="keep less than 99%"):
        qadapt.merge(model, warn_below=0.99, requantize="fresh")
    qadapt.unmerge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qadapt.merge(model, warn_below=None)


def test_too_few_calibration_rows_fall_back_to_keeping_scales_with_a_warning():
    model = wrapped_llama("bnb4", {"quant_type": "nf4"})
    few = [token_ids(seed=i, batch=1, length=8) for i in range(3)]  # 16 fit rows < 4 x 64
    with pytest.warns(UserWarning, match="fewer than 4 x in_features calibration rows"):
        report = qadapt.merge(model, calibration=few, warn_below=None)
    assert all(r.path != "calibrated" for r in report.layers.values())


def embedded(values: list[float | None], length: int = 8) -> list[dict[str, torch.Tensor]]:
    """Calibration batches of input embeddings ``[1, length, 64]``; a value puts it into the batch's first entry."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for value in values:
        embeds = torch.randn(1, length, 64, generator=generator)
        if value is not None:
            embeds[0, 0, 0] = value
        batches.append({"inputs_embeds": embeds})
    return batches


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_calibration_batch_is_named_with_the_layer_and_changes_nothing(value):
    model = wrapped_llama("bnb4", {"quant_type": "nf4"})
    before = model_checksum(model)
    with pytest.raises(qadapt.InputError, match=r"calibration batch 2 makes the input statistics of layer "
                       r"model\.layers\.0\.\w+\.\w+ non-finite"):  # fmt: skip
        qadapt.merge(model, calibration=embedded([None, None, value, None, None]))
    assert model_checksum(model) == before


def test_calibration_inputs_whose_squares_overflow_are_refused():
    torch.manual_seed(0)
    model = qadapt.wrap(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)), method="oft",
                        backend="bnb8", method_options={"block_size": 16})  # fmt: skip
    batches = [torch.randn(64, 64) for _ in range(4)]
    batches[3][5, 5] = 1e30
    before = model_checksum(model)
    with pytest.raises(qadapt.InputError, match=r"calibration batch 3 .* layer 0 non-finite.*overflow float32"):
        qadapt.merge(model, calibration=batches)
    assert model_checksum(model) == before


def test_an_endless_calibration_loader_is_read_up_to_the_limit_and_the_report_says_so():
    pulled = []

    def endless():
        generator = torch.Generator().manual_seed(1)
        while True:
            pulled.append(1)
            yield torch.randint(0, 128, (2, 16), generator=generator)

    model = wrapped_llama("bnb4", {"quant_type": "nf4"})
    with pytest.warns(UserWarning, match=r"used the first 6 batches \(max_calibration_batches=6\)"):
        report = qadapt.merge(model, calibration=endless(), max_calibration_batches=6, warn_below=None)
    assert len(pulled) == 6 and report.calibration_batches == 6 and report.calibration_limited
    assert "calibrated on 6 batch(es) (stopped at max_calibration_batches)" in str(report)
    qadapt.unmerge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = qadapt.merge(model, calibration=calibration(batches=6), max_calibration_batches=6, warn_below=None)
    assert report.calibration_batches == 6 and not report.calibration_limited  # a list of exactly 6: all read


def test_layers_that_see_only_zeros_keep_their_scales_with_a_warning_and_unmerge_exactly():
    model = wrapped_llama("bnb4", {"quant_type": "nf4"})
    before = model_checksum(model)
    zeros = [{"inputs_embeds": torch.zeros(1, 128, 64)} for _ in range(8)]
    with pytest.warns(UserWarning, match=r"saw only zero inputs .* kept their scales"):
        report = qadapt.merge(model, calibration=zeros, warn_below=None)
    assert report.layers and all(r.path != "calibrated" for r in report.layers.values())
    qadapt.unmerge(model)
    assert model_checksum(model) == before


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"calibration": [token_ids()]}, ConfigError, "at least 2 batches"),
        ({"calibration": token_ids()}, ArgumentTypeError, "iterable of model inputs"),
        ({"calibration": 3}, ArgumentTypeError, "iterable of model inputs"),
        ({"requantize": "nearest"}, ConfigError, "requantize must be one of"),
        ({"requantize": "calibrated"}, ConfigError, "needs calibration data"),
        ({"tune_scales": 5}, ConfigError, "tune_scales needs calibration"),
        ({"tune_scales": -1}, ConfigError, "tune_scales must be"),
        ({"warn_below": float("nan")}, ConfigError, "warn_below must be"),
        ({"calibration_memory": 0}, ConfigError, "calibration_memory must be"),
        ({"calibration": calibration(), "max_calibration_batches": 1}, ConfigError, "max_calibration_batches must"),
        ({"calibration": calibration(), "max_calibration_batches": True}, ConfigError, "max_calibration_batches"),
        ({"calibration": "abcd"}, ArgumentTypeError, "got a single str"),
    ],
)
def test_bad_merge_arguments_are_refused_and_change_nothing(kwargs, error, words):
    model = wrapped_llama("bnb4", {"quant_type": "nf4"})
    before = model_checksum(model)
    with pytest.raises(error, match=words):
        qadapt.merge(model, **kwargs)
    assert model_checksum(model) == before
    assert not any(m.merged for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear))


def test_merge_while_adapters_are_disabled_is_refused():
    model = wrapped_llama("bnb4", {"quant_type": "nf4"})
    qadapt.disable_adapters(model)
    before = model_checksum(model)
    with pytest.raises(AdapterStateError, match="disabled"):
        qadapt.merge(model)
    with pytest.raises(AdapterStateError, match="disabled"):
        qadapt.unwrap(model, merge=True)
    assert model_checksum(model) == before


def test_calibration_in_small_memory_runs_layer_groups_and_still_merges_every_layer():
    model = wrapped_llama("bnb8", {})
    report = qadapt.merge(model, calibration=calibration(), calibration_memory=8 * 64 * 64, warn_below=None)
    assert len(report.layers) == 14 and all(r.metric == "output" for r in report.layers.values())


def test_calibration_leaves_module_modes_as_they_were():
    model = wrapped_llama("bnb4", {"quant_type": "nf4"})
    model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    qadapt.merge(model, calibration=calibration(), warn_below=None)
    assert [m.training for m in model.modules()] == modes


# ------------------------------------------------------------------------- merged means frozen


def test_merged_adapters_are_frozen_and_get_their_flags_back_on_unmerge():
    layer = qadapt.QuantAdapterLinear(nn.Linear(64, 64), "oft", "bnb4", method_options=OFT)
    params = list(layer.adapters["default"].parameters())
    assert all(p.requires_grad for p in params)
    layer.merge()
    assert not any(p.requires_grad for p in params)
    layer.unmerge()
    assert all(p.requires_grad for p in params)


def test_inverse_unmerge_refuses_an_adapter_changed_since_the_merge():
    layer = qadapt.QuantAdapterLinear(nn.Linear(64, 64), "oft", "bnb8", method_options=OFT)
    trained_like(layer, 0.01)
    layer.merge(keep_snapshot=False)
    merged = layer.backend.snapshot(layer.base)
    with torch.no_grad():
        next(layer.adapters["default"].parameters()).add_(0.1)
    with pytest.raises(AdapterStateError, match="changed since it was merged"):
        layer.unmerge("inverse")
    assert layer.merged and layer.backend.get_storage(layer.base).equal(merged)


# ----------------------------------------------------------------------------------- numerics


def test_safe_merge_checks_what_is_written_in_the_layers_dtype():
    linear = nn.Linear(16, 16).half()
    with torch.no_grad():
        linear.weight.fill_(60000.0)  # finite in float16; the adapter pushes it past 65504
    layer = qadapt.QuantAdapterLinear(linear, "randlora", "none", method_options={"r": 2})
    trained_like(layer, 50.0)
    before = layer.backend.snapshot(layer.base)
    with pytest.raises(UnsafeMergeError, match="as stored"):
        layer.merge()
    assert layer.backend.get_storage(layer.base).equal(before) and not layer.merged


def test_merge_figures_stay_finite_for_huge_weights():
    weight = torch.full((8, 8), 1e30)
    error, retained = weight_figures(weight, weight * 1.5, weight * 1.25)
    assert math.isfinite(error) and retained == pytest.approx(0.5)
    assert kept_share(output_sq_error(weight, None), output_sq_error(weight / 2, None)) == pytest.approx(0.5)


# --------------------------------------------------------------------------------- merge targets


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids(seed=7, batch=2, length=16)).logits


@pytest.mark.parametrize("method", ["oft", "randlora"])
def test_float_target_holds_the_exact_merged_weight(method):
    model = wrapped_llama("bnb4", {"quant_type": "nf4"}, method, scale=0.01)
    adapted = _logits(model)
    qadapt.unwrap(model, merge="float", dtype=torch.float32)
    assert not any(isinstance(m, qadapt.QuantAdapterLinear) for m in model.modules())
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-4, atol=1e-4)
    report = model.qadapt_merge_report
    assert report.min_kept is not None and report.min_kept >= 0.99


def test_float_target_in_bfloat16_keeps_nearly_everything():
    model = wrapped_llama("bnb4", {"quant_type": "nf4"}, scale=0.01)
    qadapt.unwrap(model, merge="float", dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert model.qadapt_merge_report.min_kept >= 0.95


def test_merge_into_another_backend():
    import bitsandbytes as bnb

    model = wrapped_llama("bnb4", {"quant_type": "nf4"}, scale=0.01)
    adapted = _logits(model)
    qadapt.unwrap(model, merge=True, to="bnb8")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    model.train()  # bnb8's training-mode forward multiplies by the dequantized weight
    rel = float((_logits(model) - adapted).norm() / adapted.norm())
    assert rel < 0.05
    assert all(r.path == "to:bnb8" for r in model.qadapt_merge_report.layers.values())


def test_bad_merge_targets_are_refused_and_change_nothing():
    model = wrapped_llama("bnb4", {"quant_type": "nf4"})
    before = model_checksum(model)
    with pytest.raises(ConfigError, match="merge must be"):
        qadapt.unwrap(model, merge="bf16")
    with pytest.raises(ConfigError, match="dtype must be"):
        qadapt.unwrap(model, merge="float", dtype=torch.int8)
    with pytest.raises(qadapt.UnknownPluginError):
        qadapt.unwrap(model, merge=True, to="bnb9")
    with pytest.raises(ConfigError, match="merge options"):
        qadapt.unwrap(model, merge="float", requantize="fresh")
    assert model_checksum(model) == before
    assert any(isinstance(m, qadapt.QuantAdapterLinear) for m in model.modules())


@pytest.mark.parametrize(("backend", "options"), [("bnb4", {"quant_type": "nf4"}), ("bnb8", {})], ids=["nf4", "bnb8"])
def test_tune_scales_refits_group_scales_after_requantize(backend, options):
    model = wrapped_llama(backend, options, scale=0.01)
    batches = calibration()
    plain = qadapt.merge(model, calibration=batches, requantize="keep", warn_below=None)
    qadapt.unmerge(model)
    tuned = qadapt.merge(model, calibration=batches, requantize="keep", tune_scales=20, warn_below=None)
    assert any(r.tuned for r in tuned.layers.values())
    assert not any(r.tuned for r in plain.layers.values())
    assert all(r.kept is not None and r.kept >= 0.0 for r in tuned.layers.values())
    # Refit on the fit rows: on held-out rows the tuned layers keep about as much or more.
    assert tuned.median_kept >= plain.median_kept - 0.02
    qadapt.unmerge(model)  # exact unmerge still restores what was there


def test_tune_scales_on_a_backend_without_group_scales_changes_nothing():
    model = wrapped_llama("none", {}, scale=0.01)
    report = qadapt.merge(model, calibration=calibration(), tune_scales=5, warn_below=None)
    assert not any(r.tuned for r in report.layers.values())


def test_unwrap_merges_only_the_layers_not_merged_yet():
    partly, whole = (wrapped_llama("bnb4", {"quant_type": "nf4"}) for _ in range(2))
    partly.get_submodule("model.layers.0.mlp.down_proj").merge()
    qadapt.unwrap(partly, merge=True, warn_below=None)
    qadapt.unwrap(whole, merge=True, warn_below=None)
    assert model_checksum(partly) == model_checksum(whole)  # the merged layer was not merged twice
    assert len(partly.qadapt_merge_report.layers) == 13


def test_an_inverse_unmerge_of_a_reverted_merge_leaves_the_base_bits():
    # The guard kept the old storage, so there is no adapter in the weight to take out: applying
    # the method's inverse would damage the base (it did before the reverted state was recorded).
    layer = qadapt.QuantAdapterLinear(nn.Linear(64, 64), "oft", "bnb4", method_options=OFT)
    trained_like(layer, 1e-5)
    before = layer.backend.snapshot(layer.base)
    assert layer.merge(requantize="fresh", keep_snapshot=False).reverted
    layer.unmerge("inverse")
    assert layer.backend.get_storage(layer.base).equal(before)
    assert not layer.merged


def test_a_reverted_merge_travels_with_the_state_dict():
    source = qadapt.QuantAdapterLinear(nn.Linear(64, 64), "oft", "bnb8", method_options=OFT)
    trained_like(source, 1e-6)
    before = source.backend.snapshot(source.base)
    assert source.merge(requantize="fresh").reverted
    state = source.state_dict()
    assert state["qadapt_merge_reverted"].tolist() == [1]

    target = qadapt.QuantAdapterLinear(nn.Linear(64, 64), "oft", "bnb8", method_options=OFT)
    target.load_state_dict(state)
    assert target.merged_adapter == "default"
    target.unmerge("inverse")
    assert target.backend.get_storage(target.base).equal(before)

    state["qadapt_merge_reverted"] = torch.tensor([7], dtype=torch.uint8)
    with pytest.raises(qadapt.AdapterStateError, match="qadapt_merge_reverted must be"):
        qadapt.QuantAdapterLinear(nn.Linear(64, 64), "oft", "bnb8", method_options=OFT).load_state_dict(state)


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e25])
def test_output_error_in_the_input_metric_matches_float64(magnitude):
    # float32 products with float64 row sums; 1e25 overflows float32 and takes the float64 path.
    generator = torch.Generator().manual_seed(0)
    error = torch.randn(300, 96, generator=generator) * magnitude
    x = torch.randn(400, 96, generator=generator)
    hessian = x.T @ x
    expected = float(torch.trace(error.double() @ hessian.double() @ error.double().T))
    assert output_sq_error(error, hessian) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("keep_snapshot", [True, False])
def test_a_float_unwrap_of_a_reverted_merge_merges_the_adapter_in_float(keep_snapshot):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    qadapt.wrap(model, method="oft", backend="bnb4", targets=["0"], method_options=OFT)
    layer = model[0]
    trained_like(layer, 1e-5)
    expected = layer.methods["default"].merge_weight(
        layer.adapters["default"], layer.backend.dequantize_module(layer.base)
    )
    assert layer.merge(requantize="fresh", keep_snapshot=keep_snapshot).reverted
    qadapt.unwrap(model, merge="float")
    assert torch.equal(model[0].weight.detach(), expected)
