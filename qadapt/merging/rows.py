"""A float weight merged a block of rows at a time, so only one block is ever in float32."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from qadapt.merging.figures import ROWS, FigureSums, check_finite
from qadapt.protocols import RowMerger

#: float32 bytes of one block of rows (a few temporaries of this size live at once).
ROW_BLOCK_BYTES = 2 * 2**20


def merge_rows_in_blocks(
    source: torch.Tensor, merge_rows: RowMerger, dtype: torch.dtype, what: str, figures: FigureSums
) -> Iterator[torch.Tensor]:
    """The merged rows of a float ``source [out, in]``, cast to ``dtype``, a block ``[rows, in]`` at a time.

    Adds each block to ``figures``. The safe check runs where the figures show it is needed:
    non-finite merged rows, or finite ones ``dtype`` cannot hold.
    """
    step = max(1, min(ROWS, ROW_BLOCK_BYTES // (4 * max(source.shape[1], 1))))
    for start in range(0, source.shape[0], step):
        rows = slice(start, min(start + step, source.shape[0]))
        before = source[rows].float()
        merged = merge_rows(before, rows)
        out = merged.to(dtype)
        figures.add(before, merged, out)
        if not figures.finite:
            where = f"{what}, rows {rows.start}..{rows.stop - 1}"
            check_finite(merged, where)
            check_finite(out, f"{where} (in {dtype})")
        yield out
