"""PEFT 0.21.2 parity of every method PEFT also ships, on every built-in backend (a table for the docs).

For each method and backend: a 64 -> 48 layer with a bias is wrapped, its adapter moved off its
start, and PEFT's own layer is built on a float linear holding the *dequantized* weight (what the
quantized layer computes) with the same adapter values. Reported: the largest absolute difference
of the unmerged forwards and of the float merged weights (and bias, where the method changes it),
and through ``QuantAdapterLinear.merge`` the merged layer's output against the unmerged one
(relative, the requantization of the merge) with the merge's path.

    python benchmarks/peft_parity.py                 # prints the table, writes results/peft_parity.md
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
BACKENDS: list[tuple[str, str, dict]] = [
    ("none", "none", {}),
    ("bnb8", "bnb8", {}),
    ("bnb4-nf4", "bnb4", {"quant_type": "nf4"}),
    ("bnb4-fp4", "bnb4", {"quant_type": "fp4"}),
    ("torchao-int8", "torchao", {"config": "int8"}),
    ("torchao-int4", "torchao", {"config": "int4", "group_size": 32}),
    ("torchao-nf4", "torchao", {"config": "nf4", "nf4_scaler_block_size": 8}),
    ("hqq-4bit", "hqq", {"nbits": 4, "group_size": 64}),
]


@dataclass
class Case:
    """One method: qadapt's name and options, PEFT's config, and how to copy our adapter into PEFT's layer."""

    label: str
    method: Any  # a name or a Method instance
    options: dict | None
    peft_config: Callable[[], Any]
    copy: Callable[[nn.Module, nn.Module], None]


def _copy_named(pairs: dict[str, str]) -> Callable[[nn.Module, nn.Module], None]:
    """Copy ``adapter.<ours>`` into ``peft_layer.<theirs>["default"]`` for each pair."""

    def copy(adapter: nn.Module, layer: nn.Module) -> None:
        for ours, theirs in pairs.items():
            target = getattr(layer, theirs)["default"]
            target = target.weight if isinstance(target, nn.Module) else target
            target.copy_(adapter.get_parameter(ours))

    return copy


def _copy_all(adapter: nn.Module, layer: nn.Module) -> None:
    """Copy every adapter parameter into PEFT's parameter of the same name (LyCORIS names are PEFT's)."""
    for key, param in adapter.named_parameters():
        getattr(layer, key)["default"].copy_(param)


def cases() -> list[Case]:
    import peft

    from qadapt_ia3 import IA3Method

    return [
        Case(
            "ia3",
            IA3Method({}).for_layer("proj"),
            None,
            lambda: peft.IA3Config(target_modules=["proj"], feedforward_modules=[]),
            _copy_named({"ia3_l": "ia3_l"}),
        ),
        Case(
            "ia3 (feed-forward)",
            IA3Method({"feedforward_modules": ["proj"]}).for_layer("proj"),
            None,
            lambda: peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"]),
            _copy_named({"ia3_l": "ia3_l"}),
        ),
        Case(
            "vera (r=16)",
            "vera",
            {"r": 16},
            lambda: peft.VeraConfig(target_modules=["proj"], r=16),
            _copy_named({"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}),
        ),
        Case(
            "loha (r=4)",
            "loha",
            {"r": 4, "alpha": 8},
            lambda: peft.LoHaConfig(target_modules=["proj"], r=4, alpha=8),
            _copy_all,
        ),
        Case(
            "lokr (r=2, decompose_both)",
            "lokr",
            {"r": 2, "decompose_both": True},
            lambda: peft.LoKrConfig(target_modules=["proj"], r=2, decompose_both=True),
            _copy_all,
        ),
        Case(
            "boft (block 8)",
            "boft",
            {"block_size": 8},
            lambda: peft.BOFTConfig(target_modules=["proj"], boft_block_size=8),
            _copy_all,
        ),
    ]


class _Holder(nn.Module):
    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@torch.no_grad()
def measure(case: Case, backend: str, backend_options: dict, seed: int = 0) -> dict[str, Any]:
    import peft

    from qadapt import QuantAdapterLinear

    torch.manual_seed(seed)
    layer = QuantAdapterLinear(
        nn.Linear(64, 48), case.method, backend, method_options=case.options, backend_options=backend_options
    )
    generator = torch.Generator().manual_seed(seed + 3)
    for param in layer.adapters.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * 0.1 * param.abs().mean().clamp_min(0.1))
    weight = layer.backend.dequantize_module(layer.base)
    twin = nn.Linear(64, 48)
    twin.weight.copy_(weight)
    twin.bias.copy_(layer.base.bias.float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Holder(twin), case.peft_config())
    peft_layer = model.base_model.model.proj
    adapter, method = layer.adapters["default"], layer.methods["default"]
    case.copy(adapter, peft_layer)
    layer.train(), model.train()  # bitsandbytes' int8 CPU path multiplies by the dequantized weight in training mode
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(seed + 1))
    forward = float((layer(x) - model(x)).abs().max())
    merged = method.merge_weight(adapter, weight.clone())
    bias = method.merge_bias(adapter, layer.base.bias.float())
    peft_layer.merge()
    merged_weight = float((merged - peft_layer.base_layer.weight).abs().max())
    merged_bias = 0.0 if bias is None else float((bias - peft_layer.base_layer.bias).abs().max())
    layer.eval()
    unmerged = layer(x)
    result = layer.merge()
    merged_out = layer(x)
    relative = float((merged_out - unmerged).norm() / unmerged.norm())
    return {
        "forward": forward,
        "merged_weight": merged_weight,
        "merged_bias": merged_bias,
        "merge_vs_unmerged": relative,
        "path": result.path + (" (reverted)" if result.reverted else ""),
    }


def table(selected: list[Case]) -> str:
    lines = [
        "| method | backend | forward max abs diff | merged weight max abs diff | merged bias max abs diff "
        "| merged vs unmerged output (rel.) | merge path |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in selected:
        for label, backend, options in BACKENDS:
            row = measure(case, backend, options)
            lines.append(
                f"| {case.label} | {label} | {row['forward']:.1e} | {row['merged_weight']:.1e} | "
                f"{row['merged_bias']:.1e} | {row['merge_vs_unmerged']:.1e} | {row['path']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "peft_parity.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    selected = [c for c in cases() if not args.methods or c.label.split(" ")[0] in args.methods]
    text = table(selected)
    print(text)
    args.out.write_text("# PEFT 0.21.2 parity per method and backend (`benchmarks/peft_parity.py`)\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
