"""bnb4/bnb8 keep-state and calibrated requantize, and group scales: formats bitsandbytes itself loads."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F
from conftest import float_linear

from qadapt import registry, rounding
from qadapt.merging.engine import output_sq_error
from qadapt.protocols import CalibrationStats, QuantizedWeight
from qadapt_bnb import bnb4_codes

BNB4 = [
    pytest.param(
        {"quant_type": qt, "compress_statistics": nested, "blocksize": bs}, id=f"{qt}-nested{int(nested)}-{bs}"
    )
    for qt in ("nf4", "fp4")
    for nested in (True, False)
    for bs in (64, 128)
]
#: (out, in): row-aligned blocks, and in not a multiple of the block size.
SHAPES = [(48, 256), (40, 352)]
#: An odd element count (a half-filled last byte); bitsandbytes compiles its dequantize per shape,
#: so only one option set runs it.
ODD = pytest.param({"quant_type": "fp4", "compress_statistics": True, "blocksize": 64}, (7, 131), id="fp4-odd")


def quantized(name: str, options: dict, shape: tuple[int, int], seed: int = 0):
    backend = registry.backend_class(name)(options)
    module = backend.quantize(float_linear(shape[1], shape[0], seed=seed))
    return backend, module, backend.get_storage(module)


def nudged(weight: torch.Tensor, size: float, seed: int = 1) -> torch.Tensor:
    """``weight`` plus a random change of ``size`` times its standard deviation."""
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    return weight + size * weight.std() * noise


def bnb4_state(storage: QuantizedWeight) -> bnbF.QuantState:
    t, m = storage.tensors, storage.meta
    state2 = None
    if m["nested"]:
        state2 = bnbF.QuantState(
            absmax=t["nested_absmax"], code=t["nested_code"], blocksize=m["nested_blocksize"], dtype=m["nested_dtype"]
        )
    return bnbF.QuantState(
        absmax=t["absmax"],
        shape=torch.Size(m["shape"]),
        code=t["code"],
        blocksize=m["blocksize"],
        quant_type=m["quant_type"],
        dtype=m["dtype"],
        offset=t.get("offset"),
        state2=state2,
    )


def assert_bitsandbytes_loads_bnb4(backend, storage: QuantizedWeight) -> None:
    """Plain bitsandbytes reads the storage: dequantize, Linear4bit forward, from_prequantized round trip."""
    expected = backend.dequantize(storage)
    out_f, in_f = storage.meta["shape"]
    state = bnb4_state(storage)
    flat = copy.copy(state)
    flat.shape = torch.Size([out_f * in_f])  # bitsandbytes' 2-D CPU dequantize is wrong for unaligned rows
    dequantized = bnbF.dequantize_4bit(storage.tensors["data"], flat).reshape(out_f, in_f).float()
    assert torch.equal(dequantized, expected)
    stats = state.as_dict(packed=True)
    params = bnb.nn.Params4bit.from_prequantized(storage.tensors["data"], stats, device="cpu")
    flat = copy.copy(params.quant_state)
    flat.shape = torch.Size([out_f * in_f])
    again = bnbF.dequantize_4bit(params.data, flat)
    assert torch.equal(again.reshape(out_f, in_f).float(), expected)
    if in_f % storage.meta["blocksize"] == 0:  # bitsandbytes' CPU matmul is wrong otherwise (see bnb4.py)
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, device="meta")
        layer.weight = bnb.nn.Params4bit.from_prequantized(storage.tensors["data"], stats, device="cpu", module=layer)
        x = torch.randn(3, in_f)
        with torch.no_grad():
            out = layer(x)
        assert float((out - x @ expected.T).norm() / (x @ expected.T).norm()) < 1e-5


def assert_bitsandbytes_loads_bnb8(backend, storage: QuantizedWeight, shape: tuple[int, int]) -> None:
    """A plain Linear8bitLt loads CB/SCB from a state dict and computes with them."""
    out_f, in_f = shape
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
    layer.load_state_dict(torch.nn.Linear(in_f, out_f, bias=False).state_dict())
    layer = layer.to("cpu")
    state = layer.state_dict()
    state["weight"], state["SCB"] = storage.tensors["CB"], storage.tensors["SCB"]
    layer.load_state_dict(state)
    layer.train()  # training mode multiplies by the dequantized weight
    x = torch.randn(3, in_f)
    expected = x @ backend.dequantize(storage).T
    with torch.no_grad():
        assert float((layer(x) - expected).norm() / expected.norm()) < 1e-5


def scale_tensors(storage: QuantizedWeight, codes_key: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in storage.tensors.items() if k != codes_key}


def assert_codes_nearest(target: torch.Tensor, stored: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor):
    """Every stored value is as close to the target as the best of all levels at the element's scale."""
    candidates = levels.view(1, 1, -1) * scales.unsqueeze(-1)
    best = (target.unsqueeze(-1) - candidates).abs().amin(-1)
    assert bool(((target - stored).abs() <= best + 1e-3 * scales.abs() + 1e-12).all())


# ------------------------------------------------------------------------------ keep-state


@pytest.mark.parametrize(
    ("options", "shape"), [*(pytest.param(o.values[0], s, id=f"{o.id}-{s}") for o in BNB4 for s in SHAPES), ODD]
)
def test_bnb4_keep_state_keeps_scales_bit_for_bit_and_rounds_to_nearest(options, shape):
    backend, _, storage = quantized("bnb4", options, shape)
    before = storage.clone()
    weight = backend.dequantize(storage)
    target = nudged(weight, 0.05)
    new = backend.requantize_keep_state(target, storage)
    assert storage.equal(before), "requantize_keep_state wrote into like"
    kept, old = scale_tensors(new, "data"), scale_tensors(storage, "data")
    assert kept.keys() == old.keys() and QuantizedWeight(kept, new.meta).equal(QuantizedWeight(old, storage.meta))
    assert new.tensors["data"].dtype == storage.tensors["data"].dtype
    assert new.tensors["data"].shape == storage.tensors["data"].shape
    layout = backend.group_layout(storage)
    scales = layout.expand(backend.get_group_scales(storage), shape)
    levels = bnbF.get_4bit_type(options["quant_type"], device="cpu")
    assert_codes_nearest(target, backend.dequantize(new), levels, scales)
    # On the grid already: the storage comes back (up to FP4's two zeros).
    again = backend.requantize_keep_state(weight, storage)
    assert torch.equal(backend.dequantize(again), weight)
    assert_bitsandbytes_loads_bnb4(backend, new)


@pytest.mark.parametrize("shape", [*SHAPES, (7, 131)], ids=str)
def test_bnb8_keep_state_keeps_scb_and_rounds_to_nearest(shape):
    backend, _, storage = quantized("bnb8", {}, shape)
    weight = backend.dequantize(storage)
    target = nudged(weight, 0.05)
    new = backend.requantize_keep_state(target, storage)
    assert QuantizedWeight({"SCB": new.tensors["SCB"]}).equal(QuantizedWeight({"SCB": storage.tensors["SCB"]}))
    assert new.tensors["CB"].dtype == torch.int8 and int(new.tensors["CB"].abs().max()) <= 127
    steps = (storage.tensors["SCB"] / 127).reshape(-1, 1).expand(shape)
    assert_codes_nearest(target, backend.dequantize(new), torch.arange(-127.0, 128.0), steps)
    assert torch.equal(backend.requantize_keep_state(weight, storage).tensors["CB"], storage.tensors["CB"])
    assert_bitsandbytes_loads_bnb8(backend, new, shape)


@pytest.mark.parametrize(
    ("name", "options", "size"),
    [("bnb4", {"quant_type": "nf4"}, 0.05), ("bnb4", {"quant_type": "fp4"}, 0.05), ("bnb8", {}, 0.002)],
    ids=["nf4", "fp4", "int8"],
)
def test_keep_state_is_no_worse_than_a_fresh_requantize_near_the_original(name, options, size):
    """A change of about a tenth of a quantization step (what trained adapters do on 4-bit):
    keeping the scales gives a smaller error than recomputing them. (On int8 a change of a whole
    step makes some rows' absmax grow, and keeping their scale clips: then fresh is as good.)"""
    backend, _, storage = quantized(name, options, (64, 256))
    weight = backend.dequantize(storage)
    target = nudged(weight, size)
    keep = backend.dequantize(backend.requantize_keep_state(target, storage))
    fresh = backend.dequantize(backend.requantize(target, storage))
    assert (keep - target).norm() < (fresh - target).norm()


# ------------------------------------------------------------------------------ calibrated


def correlated_inputs(rows: int, in_features: int, seed: int) -> torch.Tensor:
    """Rows of a rank in/8 mixture plus noise, with four outlier channels (20x)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features // 8, in_features, generator=torch.Generator().manual_seed(99))
    x = torch.randn(rows, in_features // 8, generator=g) @ mix + 0.3 * torch.randn(rows, in_features, generator=g)
    x[:, :4] *= 20
    return x


CALIBRATED = [
    pytest.param("bnb4", {"compress_statistics": True}, id="bnb4-nf4-nested"),
    pytest.param("bnb4", {"compress_statistics": False}, id="bnb4-nf4"),
    pytest.param("bnb4", {"quant_type": "fp4", "blocksize": 128}, id="bnb4-fp4-nested-128"),
    pytest.param("bnb8", {}, id="bnb8"),
]


@pytest.mark.parametrize(("name", "options"), CALIBRATED)
def test_calibrated_requantize_beats_keep_state_and_fresh_on_heldout_rows(name, options):
    shape = (64, 256)
    backend, _, storage = quantized(name, options, shape)
    weight = backend.dequantize(storage)
    target = nudged(weight, 0.05)
    fit, heldout = correlated_inputs(8 * shape[1], shape[1], 0), correlated_inputs(4 * shape[1], shape[1], 1)
    stats = CalibrationStats(fit.T @ fit, fit.shape[0])
    h_out = heldout.T @ heldout
    base = output_sq_error(weight - target, h_out)
    errors = {
        "keep": backend.requantize_keep_state(target, storage),
        "fresh": backend.requantize(target, storage),
        "calibrated": backend.requantize_calibrated(target, storage, stats),
    }
    kept = {k: 1 - (output_sq_error(backend.dequantize(v) - target, h_out) / base) ** 0.5 for k, v in errors.items()}
    assert kept["calibrated"] > kept["keep"] + 0.05, kept
    assert kept["calibrated"] > kept["fresh"] + 0.02, kept
    new = errors["calibrated"]
    assert new.meta == storage.meta and new.tensors.keys() == storage.tensors.keys()
    assert all(new.tensors[k].dtype == v.dtype and new.tensors[k].shape == v.shape for k, v in storage.tensors.items())
    if name == "bnb4":
        assert_bitsandbytes_loads_bnb4(backend, new)
        assert int(new.tensors["data"].view(torch.uint8).max()) <= 255
    else:
        assert int(new.tensors["CB"].abs().max()) <= 127
        assert_bitsandbytes_loads_bnb8(backend, new, shape)


@pytest.mark.parametrize("nested", [True, False])
def test_calibrated_bnb4_with_blocks_across_rows_chooses_codes_only(nested):
    """in_features % blocksize != 0: the scales stay bit for bit, the objective does not rise."""
    shape = (40, 352)
    backend, _, storage = quantized("bnb4", {"compress_statistics": nested}, shape)
    target = nudged(backend.dequantize(storage), 0.05)
    fit = correlated_inputs(8 * shape[1], shape[1], 0)
    stats = CalibrationStats(fit.T @ fit, fit.shape[0])
    new = backend.requantize_calibrated(target, storage, stats)
    keep = backend.requantize_keep_state(target, storage)
    assert QuantizedWeight(scale_tensors(new, "data"), new.meta).equal(
        QuantizedWeight(scale_tensors(storage, "data"), storage.meta)
    )
    objective = output_sq_error(backend.dequantize(new) - target, stats.hessian)
    assert objective < 0.5 * output_sq_error(backend.dequantize(keep) - target, stats.hessian)
    assert_bitsandbytes_loads_bnb4(backend, new)


@pytest.mark.parametrize("name", ["bnb4", "bnb8"])
def test_too_few_calibration_rows_warn_and_keep_the_state(name):
    backend, _, storage = quantized(name, {}, (32, 128))
    target = nudged(backend.dequantize(storage), 0.05)
    x = correlated_inputs(3 * 128, 128, 0)
    with pytest.warns(UserWarning, match=r"at least 4 x in_features = 512 calibration rows .* got 384"):
        new = backend.requantize_calibrated(target, storage, CalibrationStats(x.T @ x, x.shape[0]))
    assert new.equal(backend.requantize_keep_state(target, storage))


# ------------------------------------------------------------------------------ rounding core


def test_error_feedback_tracks_its_own_objective_exactly():
    """GPTQ's per-row objective (sum of scaled rounding errors) equals tr(E H_damped E^T)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=g)
    x = correlated_inputs(512, 64, 0)
    hd, _ = rounding.damped(x.T @ x, 0.01)
    book = rounding.Codebook(bnbF.get_4bit_type("nf4", device="cpu"))
    scales = weight.abs().amax(1, keepdim=True).expand_as(weight).contiguous()
    codes, rows = rounding.gptq_codes(weight, scales, book, rounding.inverse_cholesky(hd))
    direct = rounding.row_objective(weight - book.levels[codes] * scales, hd)
    assert torch.allclose(rows, direct, rtol=1e-3)
    nearest = rounding.nearest_codes(weight, scales, book)
    assert float(direct.sum()) < float(rounding.row_objective(weight - book.levels[nearest] * scales, hd).sum())


def test_act_order_error_feedback_returns_codes_in_index_order_with_their_objective():
    """Columns in order of decreasing diag(H): the objective it reports is that of the codes it
    returns (in index order), and on inputs with outlier channels it is lower than in index order."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=g)
    x = correlated_inputs(512, 64, 0)
    x[:, 40:44] *= 20  # outlier channels late in index order
    hd, _ = rounding.damped(x.T @ x, 0.01)
    book = rounding.Codebook(bnbF.get_4bit_type("nf4", device="cpu"))
    scales = weight.abs().amax(1, keepdim=True).expand_as(weight).contiguous()
    codes, rows = rounding.ordered_gptq_codes(weight, scales, book, hd, act_order=True)
    direct = rounding.row_objective(weight - book.levels[codes] * scales, hd)
    assert torch.allclose(rows, direct, rtol=1e-3)
    _, natural = rounding.ordered_gptq_codes(weight, scales, book, hd, act_order=False)
    assert float(rows.sum()) < float(natural.sum())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codebook_lookup_equals_brute_force_nearest(quant_type):
    levels = bnbF.get_4bit_type(quant_type, device="cpu")
    book = rounding.Codebook(levels)
    x = torch.cat([torch.linspace(-1.2, 1.2, 20001), (levels[:-1] + levels[1:]) / 2, levels])
    chosen = levels[book.nearest(x)]
    best = (x.unsqueeze(1) - levels.unsqueeze(0)).abs().amin(1)
    assert torch.allclose((x - chosen).abs(), best, atol=1e-7)


# ------------------------------------------------------------------------------ group scales


@pytest.mark.parametrize(
    ("name", "options"),
    [("bnb4", {"compress_statistics": False}), ("bnb4", {"compress_statistics": True}), ("bnb8", {})],
    ids=["bnb4", "bnb4-nested", "bnb8"],
)
def test_group_scales_rescale_groups_and_load_in_bitsandbytes(name, options):
    shape = (40, 352)
    backend, _, storage = quantized(name, options, shape)
    layout = backend.group_layout(storage)
    scales = backend.get_group_scales(storage)
    assert scales.shape == (layout.num_groups,) and scales.dtype == torch.float32
    factor = 1 + 0.05 * torch.randn(layout.num_groups, generator=torch.Generator().manual_seed(0))
    new = backend.with_group_scales(storage, scales * factor)
    expected = backend.dequantize(storage) * layout.expand(factor, shape)
    error = float((backend.dequantize(new) - expected).norm() / expected.norm())
    if options.get("compress_statistics"):
        assert error < 3e-3  # the nested (double-quantized) scales round the new ones
        assert new.meta == storage.meta and new.tensors["absmax"].dtype == torch.uint8
    else:
        assert error < 1e-6
    codes = "data" if name == "bnb4" else "CB"
    assert torch.equal(new.tensors[codes], storage.tensors[codes])
    if name == "bnb4":
        assert_bitsandbytes_loads_bnb4(backend, new)
    else:
        assert_bitsandbytes_loads_bnb8(backend, new, shape)


def test_bnb4_nested_scales_are_built_as_bitsandbytes_builds_them():
    """The nested state a calibrated requantize writes from raw scales is the one bitsandbytes'
    quantize_4bit gives; with_group_scales holds the scales exactly instead (<= 256 blocks)."""
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    _, state = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, raw = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    backend = registry.backend_class("bnb4")()
    storage = backend.get_storage(backend.quantize(float_linear(256, 32)))
    rebuilt = bnb4_codes.nested_tensors(raw.absmax, storage)
    assert torch.equal(rebuilt["absmax"], state.absmax)
    assert torch.equal(rebuilt["offset"], state.offset)
    assert torch.equal(rebuilt["nested_absmax"], state.state2.absmax)
    assert torch.equal(rebuilt["nested_code"], state.state2.code)
    exact = bnb4_codes.with_group_scales(storage, raw.absmax)
    held = bnb4_codes.effective_absmax(exact)
    bnb_held = bnb4_codes.effective_absmax(QuantizedWeight({**storage.tensors, **rebuilt}, storage.meta))
    assert float((held - raw.absmax).abs().max()) <= 1e-6 * float(raw.absmax.abs().max())
    assert float((bnb_held - raw.absmax).abs().max()) > 1e-5 * float(raw.absmax.abs().max())
    assert_bitsandbytes_loads_bnb4(backend, exact)  # plain bitsandbytes reads the fitted table


def test_group_scales_reject_a_wrong_shape():
    backend, _, storage = quantized("bnb4", {}, (8, 64))
    with pytest.raises(ValueError, match=r"must have shape \(8,\), got \(3,\)"):
        backend.with_group_scales(storage, torch.ones(3))


def test_keep_state_forward_matches_through_the_backend():
    backend, module, storage = quantized("bnb4", {}, (48, 256))
    new = backend.requantize_keep_state(nudged(backend.dequantize(storage), 0.05), storage)
    backend.set_storage(module, new)
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.allclose(backend.forward(module, x), F.linear(x, backend.dequantize(new), module.bias), atol=1e-5)
