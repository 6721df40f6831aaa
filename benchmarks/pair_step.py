"""Merge error and training-step time of method x backend pairs on one 1024 x 1024 layer (not run in CI).

    python benchmarks/pair_step.py [--size 1024] [--rows 1024] [--repeats 7] [--threads 1]

Each pair wraps the same seeded ``nn.Linear(size, size)``; the adapter is moved off its start to a
trained-looking change (LoRA / DoRA: ``||ΔW|| ≈ 5 %`` of ``||W||``, DoRA magnitudes ±5 %; OFT: skew
parameters with std 0.02). A step is forward + backward + SGD update on ``rows`` input rows; the
figure is the median of ``repeats`` steps after one warm-up. The merge error is
``MergeResult.error``: ``||deq(requant(W')) - W'|| / ||W'||``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qadapt import QuantAdapterLinear

PAIRS = [
    ("oft", {"block_size": 32}, "bnb4", {"quant_type": "nf4"}),
    *[
        (method, {"r": 16, "alpha": 16}, backend, options)
        for method in ("lora", "dora")
        for backend, options in [
            ("none", {}),
            ("bnb8", {}),
            ("bnb4", {"quant_type": "nf4"}),
            ("bnb4", {"quant_type": "fp4"}),
            ("int8sym", {}),
        ]
    ],
]


@torch.no_grad()
def perturb(layer: QuantAdapterLinear, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    adapter, name = layer.adapters["default"], layer.methods["default"].name
    if name == "oft":
        adapter.weight.copy_(torch.randn(adapter.weight.shape, generator=generator) * 0.02)
        return
    weight = layer.backend.dequantize_module(layer.base)
    adapter.lora_B.weight.normal_(generator=generator)
    delta = adapter.delta_weight()
    adapter.lora_B.weight.mul_(0.05 * weight.norm() / delta.norm())
    if name == "dora":
        adapter.magnitude.mul_(1 + 0.05 * torch.randn(adapter.magnitude.shape, generator=generator))


def step_seconds(layer: QuantAdapterLinear, x: torch.Tensor, repeats: int) -> float:
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.rows, args.size, generator=torch.Generator().manual_seed(1))
    print(f"| method | backend | merge error | merge s | train step ms ({args.rows} rows, {args.threads} thread) |")
    print("|---|---|---|---|---|")
    # bnb4's compiled requantize is built (~10 s) and self-checked on first use: keep that out of the figures.
    QuantAdapterLinear(nn.Linear(args.size, args.size), "lora", "bnb4").merge()
    for method, method_options, backend, backend_options in PAIRS:
        torch.manual_seed(0)
        layer = QuantAdapterLinear(
            nn.Linear(args.size, args.size),
            method,
            backend,
            method_options=method_options,
            backend_options=backend_options,
        ).train()
        perturb(layer)
        step = step_seconds(layer, x, args.repeats)
        start = time.perf_counter()
        result = layer.merge()
        merge = time.perf_counter() - start
        label = backend + (f"-{backend_options['quant_type']}" if "quant_type" in backend_options else "")
        print(f"| {method} | {label} | {result.error:.4f} | {merge:.3f} | {1000 * step:.1f} |", flush=True)


if __name__ == "__main__":
    main()
