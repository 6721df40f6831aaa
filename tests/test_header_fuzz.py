"""Fuzzing the one safetensors header parser against safetensors itself (hypothesis, bounded).

Random headers (keys that may repeat, dtype codes real and not, shapes and offsets that fit, lie or
overflow, metadata of every JSON type) and data sections of the right size or not. The properties:

* the parser raises nothing but :class:`CheckpointError`;
* every file safetensors refuses, the parser refuses (it may refuse more: a key given twice);
* every file the parser accepts, safetensors reads with the same tensors (name, dtype, shape).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qadapt.errors import CheckpointError
from qadapt.formats.safetensors_header import DTYPE_BITS, MAX_HEADER_BYTES, header_length, parse_header

CODES = sorted(DTYPE_BITS)
PATH = Path("fuzz.safetensors")

dims = st.one_of(st.integers(0, 4), st.integers(-2, -1), st.sampled_from([2**32, 2**63, 2**64, 2**70]))
shapes = st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(dims, max_size=3), st.just("4"), st.none())
codes = st.one_of(st.sampled_from(CODES), st.sampled_from(["F4_E2M1", "", "f32", "X"]), st.integers(0, 3))
metadata = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["format", "a"]), st.sampled_from(["pt", ""]), max_size=2),
    st.dictionaries(st.just("format"), st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=1))),
    st.lists(st.integers(), max_size=1),
    st.just("pt"),
)


@st.composite
def files(draw: st.DrawFn) -> bytes:
    """A safetensors file's bytes: mostly valid layouts, each with a few random lies."""
    count = draw(st.integers(0, 3))
    pairs: list[tuple[str, object]] = []
    position = 0
    for _ in range(count):
        key = draw(st.sampled_from(["a", "b", "c", "__metadata__"]) if draw(st.booleans()) else st.just(f"t{_}"))
        code = draw(st.sampled_from(CODES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        size = numel * DTYPE_BITS[code] // 8
        entry: dict[str, object] = {"dtype": code, "shape": shape, "data_offsets": [position, position + size]}
        position += size
        if draw(st.integers(0, 3)) == 0:  # one lie about this entry
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "extra"]))
            if field == "dtype":
                entry["dtype"] = draw(codes)
            elif field == "shape":
                entry["shape"] = draw(shapes)
            elif field == "data_offsets":
                entry["data_offsets"] = draw(
                    st.one_of(st.lists(st.integers(-4, position + 8), max_size=3), st.just("0"), st.none())
                )
            elif field == "drop":
                del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
            else:
                entry["extra"] = 1
        if draw(st.integers(0, 9)) == 0:
            entry = draw(st.sampled_from(["x", 3, [1]]))  # type: ignore[assignment]
        pairs.append((key, entry))
    if draw(st.booleans()):
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", draw(metadata)))
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    raw = text.encode()
    if draw(st.integers(0, 9)) == 0:
        raw = draw(st.sampled_from([b"[]", b"{", raw + b" ", b"  " + raw, raw[:-1], b"\xff" + raw]))
    data = b"\x00" * max(0, position + draw(st.sampled_from([0, 0, 0, -1, 1, 4])))
    length = len(raw) if draw(st.integers(0, 9)) else draw(st.sampled_from([0, len(raw) + 5, 2**62, 2**64 - 1]))
    return struct.pack("<Q", length) + raw + data


def ours(data: bytes) -> list[tuple[str, str, tuple[int, ...]]] | None:
    """The parser's tensors, or None when it refuses (any other exception fails the test)."""
    try:
        size = header_length(data[:8], len(data), PATH)
        _, entries = parse_header(data[8 : 8 + size], len(data) - 8 - size, PATH)
    except CheckpointError:
        return None
    return sorted((e.key, e.code, e.shape) for e in entries)


def theirs(data: bytes) -> list[tuple[str, str, tuple[int, ...]]] | None:
    try:
        read = safetensors.deserialize(data)
    except Exception:  # safetensors refuses with SafetensorError, or a Rust panic's exception
        return None
    return sorted((key, value["dtype"].upper(), tuple(value["shape"])) for key, value in read)


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(files())
def test_the_parser_refuses_whatever_safetensors_refuses(data: bytes):
    mine, reference = ours(data), theirs(data)
    if reference is None:
        assert mine is None, f"safetensors refuses this file, the parser reads {mine}: {data[:300]!r}"
    if mine is not None:
        assert mine == reference, (
            f"parser {mine}, safetensors {reference}: {data[:300]!r}"
        )


@pytest.mark.parametrize(
    ("header", "data_size", "words"),
    [
        ({"a": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}}, 0, "overflows"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"x": 1}}, 4, "__metadata__"),
        ({"__metadata__": "pt"}, 0, "__metadata__"),
    ],
)
def test_cases_the_fuzzer_found(header: dict, data_size: int, words: str):
    with pytest.raises(CheckpointError, match=words):
        parse_header(json.dumps(header).encode(), data_size, PATH)


def test_the_header_cap_is_safetensors_own():
    assert MAX_HEADER_BYTES == 100_000_000
    with pytest.raises(CheckpointError, match="header length field says"):
        header_length(struct.pack("<Q", MAX_HEADER_BYTES + 1), MAX_HEADER_BYTES + 100, PATH)
