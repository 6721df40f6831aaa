"""The fast CPU 4-bit quantizer against bitsandbytes' own ``quantize_4bit``: same bytes, same state, loads in bnb."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qadapt_bnb import fast_quant

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")


def assert_identical(data: torch.Tensor, *, use_compile: bool, **kwargs: object) -> None:
    ref, ref_state = bnbF.quantize_4bit(data, **kwargs)
    got, got_state = fast_quant.quantize_4bit(data, use_compile=use_compile, **kwargs)
    assert fast_quant._same(ref, got), "packed codes differ"
    assert fast_quant._same(ref_state.absmax, got_state.absmax), "absmax differs"
    assert ref_state.shape == got_state.shape and ref_state.dtype == got_state.dtype
    assert ref_state.blocksize == got_state.blocksize and ref_state.quant_type == got_state.quant_type
    assert fast_quant._same(ref_state.code, got_state.code)
    if ref_state.nested:
        assert got_state.nested
        assert fast_quant._same(ref_state.offset, got_state.offset)
        assert fast_quant._same(ref_state.state2.absmax, got_state.state2.absmax)


@pytest.mark.parametrize("use_compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_and_type_on_awkward_values(use_compile: bool, quant_type: str, blocksize: int) -> None:
    data = fast_quant._probe()  # zeros, exact ties, neighbours of ties, subnormals, NaN, ±inf, ±0, partial block
    for nested in (False, True):
        assert_identical(
            data, use_compile=use_compile, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_input_dtypes_and_storage_dtypes(dtype: torch.dtype, storage: torch.dtype) -> None:
    data = torch.randn(96, 160, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert_identical(data, use_compile=True, blocksize=64, quant_type="nf4", quant_storage=storage)


finite = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32)
special = st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-45, -1e-45, 1e-38])


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.one_of(finite, special), min_size=1, max_size=700),
    blocksize=st.sampled_from(BLOCKSIZES[:4]),
    quant_type=st.sampled_from(QUANT_TYPES),
    nested=st.booleans(),
)
def test_any_values_any_length(values: list[float], blocksize: int, quant_type: str, nested: bool) -> None:
    data = torch.tensor(values, dtype=torch.float32)
    assert_identical(data, use_compile=True, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(min_value=1e-30, max_value=1e30),
    levels=st.lists(st.integers(min_value=0, max_value=15), min_size=64, max_size=64),
    quant_type=st.sampled_from(QUANT_TYPES),
)
def test_values_on_and_next_to_the_midpoints(scale: float, levels: list[int], quant_type: str) -> None:
    code = bnbF.get_4bit_type(quant_type, device="cpu").float().sort().values
    mids = (code[:-1] + code[1:]) / 2
    picks = torch.tensor(levels) % 15
    on = mids[picks]
    block = torch.stack([on, torch.nextafter(on, on + 1), torch.nextafter(on, on - 1)]).reshape(-1)[:63]
    data = torch.cat([torch.tensor([1.0]), block]) * scale  # absmax 1 * scale: ties survive unless scale rounds them
    assert_identical(data, use_compile=True, blocksize=64, quant_type=quant_type)


def test_the_result_loads_and_runs_in_bitsandbytes() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    packed, state = fast_quant.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    layer = bnb.nn.Linear4bit(128, 48, bias=False, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True, module=layer)
    x = torch.randn(5, 128)
    expected = x @ bnbF.dequantize_4bit(*bnbF.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")).T
    torch.testing.assert_close(layer(x), expected)
    # And bitsandbytes' own state (de)serialization round-trips it.
    restored = bnbF.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(packed, restored), bnbF.dequantize_4bit(packed, state))


def test_self_check_passes_here() -> None:
    assert fast_quant.self_check(use_compile=True)
    assert fast_quant.self_check(use_compile=False)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="quant_type"):
        fast_quant.quantize_4bit(torch.zeros(64), quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        fast_quant.quantize_4bit(torch.zeros(64), blocksize=48)
    with pytest.raises(ValueError, match="float32"):
        fast_quant.quantize_4bit(torch.zeros(64, dtype=torch.int32))
