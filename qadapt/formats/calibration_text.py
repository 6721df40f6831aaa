"""Calibration text from a file: plain text or JSON Lines, read within bounds, cut into token batches.

A calibration file is user input like any other: it must be a regular file (not a directory, FIFO
or device) of at most :data:`MAX_CALIBRATION_BYTES`, UTF-8, and not empty. A ``.jsonl`` file holds
one JSON object per line with a string field ``"text"`` (blank lines are skipped); any other file is
one text. Every refusal names the file, the line and the field.

:func:`token_batches` turns token ids into the batches a calibrated merge reads: ``rows`` of
``seq_len`` tokens, ``batch_size`` rows a batch, at most ``tokens`` tokens in all.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from qadapt.errors import ConfigError, InputError, shorten

#: The largest calibration file read (bytes); calibration needs thousands of tokens, not gigabytes.
MAX_CALIBRATION_BYTES = 64 * 2**20
#: Defaults: tokens read, tokens per row, rows per batch (16 batches of 4 x 128 tokens).
DEFAULT_CALIBRATION_TOKENS = 8192
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 4
#: The JSON Lines field that holds each text.
TEXT_FIELD = "text"


def _read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed), at most ``limit`` of them."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"calibration file {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"calibration file {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise InputError(f"calibration file {path} is {kind}; give a text or JSON Lines file")
    if info.st_size > limit:
        raise InputError(
            f"calibration file {path} holds {info.st_size:,} bytes, more than the {limit:,} a calibration file may "
            f"hold; a calibrated merge needs some thousands of tokens: cut the file down"
        )
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew after the size check
        raise InputError(f"calibration file {path} holds more than the {limit:,} bytes a calibration file may hold")
    return data


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"calibration file {path} is not UTF-8 text: byte {exc.start} (line {line}) is {data[exc.start]:#04x}; "
            "save it as UTF-8"
        ) from None


def _jsonl_texts(path: Path, text: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"calibration file {path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(
                f"calibration file {path}: line {number} must be a JSON object with a string field "
                f"{TEXT_FIELD!r}, got {shorten(record)}"
            )
        value = record.get(TEXT_FIELD)
        if not isinstance(value, str):
            fields = ", ".join(map(repr, list(record)[:8])) or "none"
            raise InputError(
                f"calibration file {path}: line {number}: field {TEXT_FIELD!r} must be a string, got "
                f"{shorten(value)} (fields there: {fields})"
            )
        texts.append(value)
    return texts


def read_calibration_texts(path: str | os.PathLike[str], limit: int = MAX_CALIBRATION_BYTES) -> list[str]:
    """The texts of a calibration file: one per JSON Lines record (``.jsonl``), or the whole file.

    Raises:
        InputError: missing, not a regular file, over ``limit`` bytes, not UTF-8, a bad JSON Lines
            line (named), or no text at all.
    """
    path = Path(path)
    text = _decode(path, _read_bytes(path, limit))
    texts = _jsonl_texts(path, text) if path.suffix.lower() == ".jsonl" else [text]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"calibration file {path} holds no text; give a text file or JSON Lines with {TEXT_FIELD!r}")
    return texts


def _check_count(value: object, name: str, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} must be a whole number >= {least}, got {shorten(value)}")
    return value


def token_batches(
    ids: Sequence[Sequence[int]],
    tokens: int = DEFAULT_CALIBRATION_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    separator: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Token ids of several texts, joined (``separator`` between texts), cut to at most ``tokens`` ids,
    in rows of ``seq_len`` and batches of ``batch_size`` rows: ``[{"input_ids": [batch_size, seq_len]}]``.

    Raises:
        ConfigError: a bad count, or fewer than 2 batches' worth of tokens (a merge holds one out).
    """
    _check_count(tokens, "calibration_tokens")
    _check_count(seq_len, "seq_len")
    _check_count(batch_size, "batch_size")
    joined: list[int] = []
    for i, text_ids in enumerate(ids):
        if i and separator is not None:
            joined.append(separator)
        joined.extend(int(t) for t in text_ids)
        if len(joined) >= tokens:
            break
    per_batch = seq_len * batch_size
    count = min(len(joined), tokens) // per_batch
    if count < 2:
        raise ConfigError(
            f"calibration: {min(len(joined), tokens)} token(s) make fewer than 2 batches of {batch_size} x {seq_len} "
            f"tokens (one is held out to measure the merge); give at least {2 * per_batch} tokens "
            "(more text, or a larger calibration_tokens)"
        )
    flat = torch.tensor(joined[: count * per_batch], dtype=torch.long).reshape(count, batch_size, seq_len)
    return [{"input_ids": batch.clone()} for batch in flat]


def calibration_batches(
    path: str | os.PathLike[str],
    tokenize: Callable[[str], Sequence[int]] | object,
    tokens: int = DEFAULT_CALIBRATION_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[dict[str, torch.Tensor]]:
    """A calibration file's texts as token batches for ``merge(model, calibration=...)`` and the export.

    ``tokenize``: a transformers tokenizer (its ``eos_token_id`` separates texts; no special tokens
    are added) or a function ``text -> token ids``. The same file and tokenizer give the same
    batches here and in ``qadapt export --calibration``.
    """
    texts = read_calibration_texts(path)
    _check_count(tokens, "calibration_tokens")
    if callable(getattr(tokenize, "encode", None)):
        encode = tokenize.encode  # type: ignore[union-attr]

        def function(text: str) -> Sequence[int]:
            return encode(text, add_special_tokens=False)

        separator = getattr(tokenize, "eos_token_id", None)
    elif callable(tokenize):
        function, separator = tokenize, None  # type: ignore[assignment]
    else:
        raise ConfigError(f"tokenize must be a tokenizer or a function text -> token ids, got {shorten(tokenize)}")
    ids, total = [], 0
    for text in texts:  # tokenize only what the batches can use
        ids.append(function(text))
        total += len(ids[-1])
        if total >= tokens:
            break
    return token_batches(ids, tokens, seq_len, batch_size, separator)
