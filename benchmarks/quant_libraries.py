"""OFT on one 1024x1024 layer per backend: training-step time and merge error (not run in CI).

    .venv/bin/python benchmarks/quant_libraries.py [--size 1024] [--steps 20]

For each backend the layer is quantized from the same float weight, the OFT adapter is trained for
``--steps`` Adam steps towards a fixed rotated target (so the merge has a real change to carry),
then one more step is timed ``--repeats`` times (median), and the merge error is the relative
Frobenius error ``qadapt.merge`` reports (``MergeResult.error``). The change the adapter made,
``||W' - W|| / ||W||``, and ``delta_retained`` are printed beside it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import qadapt

BACKENDS = [
    ("bnb4", {"quant_type": "nf4"}),
    ("torchao", {"config": "int8"}),
    ("torchao", {"config": "int4", "group_size": 32}),
    ("torchao", {"config": "int4", "group_size": 32, "mapping": "asymmetric"}),
    ("torchao", {"config": "nf4"}),
    ("hqq", {"nbits": 4, "group_size": 64}),
]


def run(name: str, options: dict, size: int, steps: int, repeats: int, batch: int, lr: float) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(size, size)
    x = torch.randn(batch, size)
    with torch.no_grad():
        target = linear(x.roll(1, dims=-1)).detach()  # a change the base cannot reach by re-rounding
    start = time.perf_counter()
    layer = qadapt.QuantAdapterLinear(linear, "oft", name, backend_options=options, method_options={"block_size": 32})
    quantize_s = time.perf_counter() - start
    params = [p for p in layer.adapters.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = (layer(x) - target).square().mean()
        loss.backward()
        optimizer.step()

    for _ in range(steps):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with torch.no_grad():
        before = layer.backend.dequantize_module(layer.base)
        merged_weight = layer.methods["default"].merge_weight(layer.adapters["default"], before)
        change = float((merged_weight - before).norm() / before.norm())
        start = time.perf_counter()
        result = layer.merge()
        merge_s = time.perf_counter() - start
    return {
        "backend": layer.backend.describe(),
        "step_ms": 1e3 * statistics.median(times),
        "merge_error": result.error,
        "change": change,
        "retained": result.delta_retained,
        "merge_ms": 1e3 * merge_s,
        "quantize_ms": 1e3 * quantize_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (2e-4: a change of a few %%)")
    args = parser.parse_args()
    print(
        f"# OFT (block_size 32) on {args.size}x{args.size}, batch {args.batch}; {platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print("| backend | train step | merge error | adapter change | delta retained | merge time | quantize time |")
    print("|---|---|---|---|---|---|---|")
    for name, options in BACKENDS:
        r = run(name, options, args.size, args.steps, args.repeats, args.batch, args.lr)
        retained = "—" if r["retained"] is None else f"{r['retained']:.3f}"
        print(
            f"| {r['backend']} | {r['step_ms']:.1f} ms | {r['merge_error']:.4f} | {r['change']:.4f} | {retained} | "
            f"{r['merge_ms']:.0f} ms | {r['quantize_ms']:.0f} ms |",
            flush=True,
        )


if __name__ == "__main__":
    main()
