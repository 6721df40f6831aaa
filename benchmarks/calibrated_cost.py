"""Time a calibrated requantize per layer (bnb4 with double quantization, bnb8), and one float matmul
of the same size for scale (the machine's speed at the moment of the run).

    python benchmarks/calibrated_cost.py --sizes 1024 4096 --threads 2

Inputs: correlated rows (a rank in/8 mixture plus noise) with four outlier channels, 8 x in rows;
the target is the dequantized weight plus a 5 % random change. Prints seconds per layer and the
share of the change kept (output space, held-out rows) by keep-state, fresh and calibrated.
"""

from __future__ import annotations

import argparse
import time

import torch

from qadapt import registry
from qadapt.merging.engine import output_sq_error
from qadapt.protocols import CalibrationStats


def inputs(rows: int, mix: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[rows, in]``: a low-rank mixture plus noise, four channels 20x larger."""
    x = torch.randn(rows, mix.shape[0], generator=generator) @ mix
    x += 0.3 * torch.randn(rows, mix.shape[1], generator=generator)
    x[:, :4] *= 20
    return x


def gram(rows: int, mix: torch.Tensor, generator: torch.Generator, chunk: int = 4096) -> torch.Tensor:
    n = mix.shape[1]
    h = torch.zeros(n, n)
    for start in range(0, rows, chunk):
        x = inputs(min(chunk, rows - start), mix, generator)
        h.addmm_(x.T, x)
    return h


def run(size: int, backends: list[tuple[str, dict]]) -> None:
    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(size // 8, size, generator=generator)
    fit, heldout = gram(8 * size, mix, generator), gram(4 * size, mix, generator)
    a, b = torch.randn(size, size), torch.randn(size, size)
    start = time.perf_counter()
    a @ b
    matmul = time.perf_counter() - start
    print(f"d={size}: one float32 {size}^3 matmul {matmul:.2f} s")
    for name, options in backends:
        backend = registry.backend_class(name)(options)
        linear = torch.nn.Linear(size, size)
        storage = backend.get_storage(backend.quantize(linear))
        weight = backend.dequantize(storage)
        target = weight + 0.05 * weight.std() * torch.randn(size, size, generator=generator)
        start = time.perf_counter()
        calibrated = backend.requantize_calibrated(target, storage, CalibrationStats(fit, 8 * size))
        seconds = time.perf_counter() - start
        base = output_sq_error(weight - target, heldout)
        kept = {}
        for label, new in (
            ("keep", backend.requantize_keep_state(target, storage)),
            ("fresh", backend.requantize(target, storage)),
            ("calibrated", calibrated),
        ):
            kept[label] = 1 - (output_sq_error(backend.dequantize(new) - target, heldout) / base) ** 0.5
        shares = ", ".join(f"{k} {v:+.3f}" for k, v in kept.items())
        print(f"  {backend.describe():40s} calibrated {seconds:6.2f} s ({seconds / matmul:.1f} matmuls); kept {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [("bnb4", {"compress_statistics": True}), ("bnb4", {"compress_statistics": False}), ("bnb8", {})]
    for size in args.sizes:
        run(size, backends)


if __name__ == "__main__":
    main()
