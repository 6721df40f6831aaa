"""Self-calibration: calibration text the adapted model writes itself, for a merge with no data at hand.

``merge(model, calibration="self")`` samples token sequences from the model with its adapters on
(unmerged), then merges against those batches like any calibration set. The sampling is seeded
and runs under its own random state (the caller's torch RNG is left as it was), so the same model
and seed give the same batches. What it keeps against real data is measured in
``benchmarks/kept_share.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qadapt.errors import ConfigError, shorten
from qadapt.model.calibration import eval_mode, output_tensor

#: Defaults: 16 batches of 4 rows x 128 tokens (as ``qadapt export --calibration``).
SELF_TOKENS = 8192
SELF_SEQ_LEN = 128
SELF_BATCH_SIZE = 4
#: Rows sampled in one generation pass at most.
_ROWS_AT_ONCE = 64


def _start_token(model: nn.Module, start: int | None) -> int:
    if start is not None:
        return start
    config = getattr(model, "config", None)
    for source in (getattr(model, "generation_config", None), config):
        token = getattr(source, "bos_token_id", None)
        if isinstance(token, int):
            return token
    raise ConfigError(
        "self-calibration starts every sequence from the model's bos_token_id, and this model has none; "
        "pass start_token=ID to qadapt.self_calibration(model, start_token=...), or give calibration batches"
    )


@torch.no_grad()
def _sample(model: nn.Module, rows: int, length: int, start: int, temperature: float) -> torch.Tensor:
    """``rows`` sequences ``[rows, length]`` sampled token by token from the model's logits (global RNG)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
    if callable(getattr(model, "generate", None)) and getattr(model, "generation_config", None) is not None:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=length - 1,
            min_new_tokens=length - 1,
            pad_token_id=start,
        )
        return out[:, :length].cpu()
    for _ in range(length - 1):  # any model that maps token ids to logits [rows, seq, vocab]
        logits = output_tensor(model(ids))[:, -1, :].float() / temperature
        ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1)], dim=1)
    return ids.cpu()


def _check(tokens: Any, seq_len: Any, batch_size: Any, temperature: Any) -> None:
    for name, value, least in (("tokens", tokens, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"self_calibration {name} must be a whole number >= {least}, got {shorten(value)}")
    if tokens // (seq_len * batch_size) < 2:
        raise ConfigError(
            f"self_calibration: tokens={tokens} make fewer than 2 batches of {batch_size} x {seq_len}; "
            f"give at least {2 * seq_len * batch_size}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"self_calibration temperature must be a number > 0, got {shorten(temperature)}")


def self_calibration(
    model: nn.Module,
    tokens: int = SELF_TOKENS,
    *,
    seq_len: int | None = None,
    batch_size: int = SELF_BATCH_SIZE,
    seed: int = 0,
    temperature: float = 1.0,
    start_token: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches ``[{"input_ids": [batch_size, seq_len]}, ...]`` sampled from ``model`` as it is now
    (adapters on, unmerged), each row started from the model's ``bos_token_id`` (or ``start_token``).

    ``seq_len``: default 128, or the model's ``max_position_embeddings`` when shorter.
    Deterministic given ``seed`` (the caller's random state is kept). ``merge(model, calibration="self")``
    uses the defaults: 16 batches of 4 x 128 tokens.
    """
    if seq_len is None:
        longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        seq_len = min(SELF_SEQ_LEN, longest) if isinstance(longest, int) and longest >= 2 else SELF_SEQ_LEN
    _check(tokens, seq_len, batch_size, temperature)
    start = _start_token(model, start_token)
    count = tokens // (seq_len * batch_size)
    rows = count * batch_size
    chunks = []
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), eval_mode(model):
        torch.manual_seed(seed)
        for done in range(0, rows, _ROWS_AT_ONCE):
            chunks.append(_sample(model, min(_ROWS_AT_ONCE, rows - done), seq_len, start, float(temperature)))
    flat = torch.cat(chunks).reshape(count, batch_size, seq_len)
    return [{"input_ids": batch.clone()} for batch in flat]
