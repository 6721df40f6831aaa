"""One benchmark case built twice: a qadapt layer and a PEFT 0.21.2 model on the same quantized weights.

Both sides start from ONE quantized module (qadapt's backend quantizes a seeded ``nn.Linear [d, d]``;
PEFT gets a deep copy of that module) and carry identical, random, non-zero adapter parameters, so
they compute the same function and any difference in time, memory or numbers comes from the code.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qadapt import QuantAdapterLinear, QuantizedWeight, registry
from qadapt.protocols import Backend, Method

TARGET = "proj"

#: qadapt backend options per benchmark backend name (bnb4 = NF4, blocksize 64, double quantization).
BACKEND_OPTIONS: dict[str, dict[str, Any]] = {"bnb4": {"quant_type": "nf4"}, "bnb8": {}}
#: qadapt method options per benchmark method name (the issue's cases: OFT block 32, RandLora r 32).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "oft": {"block_size": 32},
    "randlora": {"r": 32},
    "lora": {"r": 16, "alpha": 32},
}

#: Std of the random OFT skew parameters: a trained-looking rotation whose Cayley-Neumann series converges.
OFT_PARAM_STD = 0.02
#: Std of the random RandLora lambda: a weight change of roughly 10-20% of the base weight's norm.
RANDLORA_LAMBDA_STD = 0.01
#: Std of the random LoRA factors (B non-zero, as after training): a change of a few % of the weight.
LORA_STD = 0.01


class Holder(nn.Module):
    """The smallest model PEFT can adapt: one linear layer named :data:`TARGET`.

    It carries the flags transformers sets on a model loaded with a ``BitsAndBytesConfig``; PEFT's
    RandLora picks its bitsandbytes layer classes from them (without them it wraps the quantized
    module in its float class, whose merge adds to the int8/packed storage directly).
    """

    def __init__(self, layer: nn.Module, backend_name: str) -> None:
        super().__init__()
        self.proj = layer
        self.is_loaded_in_4bit = backend_name == "bnb4"
        self.is_loaded_in_8bit = backend_name == "bnb8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class Pair:
    """Both sides of one case. ``original`` is a copy of the quantized storage both started from."""

    d: int
    backend_name: str
    method_name: str
    backend: Backend
    method: Method
    ours: QuantAdapterLinear
    peft_model: nn.Module
    original: QuantizedWeight
    peft_base_original: nn.Module

    @property
    def peft_layer(self) -> nn.Module:
        """PEFT's tuner layer that replaced :data:`TARGET`."""
        return getattr(self.peft_model.base_model.model, TARGET)

    def peft_storage(self) -> QuantizedWeight:
        """PEFT's current base weight, read through qadapt's backend (both are plain bitsandbytes modules)."""
        return self.backend.get_storage(self.peft_layer.base_layer)

    def reset_ours(self) -> None:
        """qadapt's layer back to the original weight, unmerged (not timed)."""
        if self.ours.merged:
            self.ours.unmerge("exact")  # a snapshot restore: cheap
        self.backend.set_storage(self.ours.base, self.original.clone())

    def reset_peft(self) -> None:
        """PEFT's layer back to a fresh copy of the original base module, unmerged (not timed).

        A copy each time: PEFT's 4-bit requantize edits the old parameter's attributes in place.
        """
        layer = self.peft_layer
        layer.merged_adapters.clear()
        layer.base_layer = copy.deepcopy(self.peft_base_original)


def build_pair(d: int, backend_name: str, method_name: str, seed: int = 0) -> Pair:
    """Build the qadapt layer and the PEFT model for one case, with identical weights and adapters."""
    torch.manual_seed(seed)
    linear = nn.Linear(d, d, bias=False)
    backend: Backend = registry.load("backends", backend_name)(BACKEND_OPTIONS[backend_name])
    method: Method = registry.load("methods", method_name)(METHOD_OPTIONS[method_name])
    base = backend.quantize(linear)
    peft_base = copy.deepcopy(base)
    original = backend.get_storage(base).clone()

    ours = QuantAdapterLinear(base, method, backend)
    peft_model = _peft_model(Holder(peft_base, backend_name), method_name)
    pair = Pair(d, backend_name, method_name, backend, method, ours, peft_model, original, copy.deepcopy(peft_base))
    generator = torch.Generator().manual_seed(seed + 1)
    copy_adapter = {"oft": _copy_oft, "lora": _copy_lora}.get(method_name, _copy_randlora)
    copy_adapter(pair, generator)
    ours.train()
    peft_model.train()
    return pair


def _peft_model(holder: Holder, method_name: str) -> nn.Module:
    import peft

    if method_name == "oft":
        opts = METHOD_OPTIONS["oft"]
        config = peft.OFTConfig(r=0, oft_block_size=opts["block_size"], target_modules=[TARGET])
    elif method_name == "lora":
        opts = METHOD_OPTIONS["lora"]
        config = peft.LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], target_modules=[TARGET])
    else:
        config = peft.RandLoraConfig(r=METHOD_OPTIONS["randlora"]["r"], target_modules=[TARGET])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(holder, config)


@torch.no_grad()
def _copy_oft(pair: Pair, generator: torch.Generator) -> None:
    ours = pair.ours.adapters["default"].weight
    ours.copy_(torch.randn(ours.shape, generator=generator) * OFT_PARAM_STD)
    pair.peft_layer.oft_R["default"].weight.copy_(ours)


@torch.no_grad()
def _copy_lora(pair: Pair, generator: torch.Generator) -> None:
    adapter, layer = pair.ours.adapters["default"], pair.peft_layer
    for ours, theirs in ((adapter.lora_A, layer.lora_A["default"]), (adapter.lora_B, layer.lora_B["default"])):
        ours.weight.copy_(torch.randn(ours.weight.shape, generator=generator) * LORA_STD)
        theirs.weight.copy_(ours.weight)


@torch.no_grad()
def _copy_randlora(pair: Pair, generator: torch.Generator) -> None:
    adapter = pair.ours.adapters["default"]
    layer = pair.peft_layer
    adapter.lambda_.copy_(torch.randn(adapter.lambda_.shape, generator=generator) * RANDLORA_LAMBDA_STD)
    noise = 1 + 0.1 * torch.randn(adapter.gamma.shape, generator=generator)
    adapter.gamma.copy_(noise / max(adapter.in_features, adapter.out_features))
    layer.randlora_lambda["default"].copy_(adapter.lambda_)
    layer.randlora_gamma["default"].copy_(adapter.gamma)
    # Same seed, same draw; load PEFT's bases anyway so the two sides cannot differ there.
    bases = pair.peft_model.base_model
    adapter.bases.load_projection_tensors(
        {"randlora_A": bases.randlora_A["default"].clone(), "randlora_B": bases.randlora_B["default"].clone()}
    )
