"""RL weight sync: ``qadapt.merged_weights`` against PEFT's ``merge_adapter`` + ``state_dict`` + ``unmerge_adapter``.

An RL trainer (TRL's GRPO with vLLM) hands the policy's merged weights to the inference engine
every step. With PEFT that is ``merge_adapter()``, a walk over ``state_dict()``, then
``unmerge_adapter()``: on bitsandbytes 4-bit each merge and unmerge requantizes every layer (PEFT
issue #2501). ``qadapt.merged_weights(model)`` reads the float merged weights one layer at a time
and changes nothing.

Both sides: SmolLM2-135M-Instruct loaded by transformers with a ``BitsAndBytesConfig`` (nf4, double
quantization), LoRA r 16 on all seven projections with the same random adapter weights. Per
side: seconds per full sweep (median), the peak extra resident memory of one sweep
(``benchmarks/measure.py``), and after 20 sweeps the drift of the model's own weights and of the
weights handed out (max |w_20 - w_1| / max |w_1| over the adapted layers). The consumer is a stand-in
for ``load_weights``: each tensor is cast to bfloat16 and summed.

    python benchmarks/merged_weights.py                 # the real model, 20 cycles
    python benchmarks/merged_weights.py --quick         # the real model, 3 cycles
    python benchmarks/merged_weights.py --quick --model tiny   # a random tiny Llama (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import measure  # noqa: E402

import qadapt  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_directory(model: str, folder: Path) -> Path:
    """A float transformers directory of the model (the real one from its GGUF, or a tiny random Llama)."""
    if model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(folder)
        return folder
    from qadapt.cli.real_demo import default_model_file, load_float_model

    float_model, _ = load_float_model(default_model_file())
    float_model.save_pretrained(folder)
    return folder


def load_nf4(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32).eval()  # fmt: skip


@torch.no_grad()
def fill(params: Iterable[tuple[str, nn.Parameter]], seed: int) -> None:
    """Seeded random adapter weights (a LoRA after some training: both factors non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted(params, key=lambda item: item[0].split("lora_")[-1]):
        param.copy_(torch.randn(param.shape, generator=generator) * 0.01)


def peft_side(folder: Path) -> tuple[nn.Module, Callable[[], Iterable[tuple[str, torch.Tensor]]]]:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_nf4(folder), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    fill([(n, p) for n, p in model.named_parameters() if "lora_" in n], seed=1)

    def sweep() -> Iterable[tuple[str, torch.Tensor]]:
        # What TRL's GRPO trainer does before each vLLM sync, in outline.
        # The state dict holds the 4-bit layers packed; an engine needs them in float, so they are
        # dequantized here (the packed state's own keys are left out).
        import bitsandbytes.functional as bnbF

        model.merge_adapter()
        try:
            modules = dict(model.named_modules())
            for name, tensor in model.state_dict().items():
                owner, _, leaf = name.rpartition(".")
                if "lora_" in name or ".weight." in name:
                    continue
                state = getattr(getattr(modules.get(owner), "weight", None), "quant_state", None)
                if leaf == "weight" and state is not None:
                    tensor = bnbF.dequantize_4bit(tensor, state)
                yield name.replace("base_model.model.", "").replace(".base_layer", ""), tensor
        finally:
            model.unmerge_adapter()

    return model, sweep


def qadapt_side(folder: Path) -> tuple[nn.Module, Callable[[], Iterable[tuple[str, torch.Tensor]]]]:
    model = load_nf4(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qadapt.wrap(model, method="lora", targets=TARGETS, method_options={"r": 16, "alpha": 32})
    fill([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=1)
    return model, lambda: qadapt.merged_weights(model, dtype=torch.bfloat16)


def consume(stream: Iterable[tuple[str, torch.Tensor]], keep: list[str]) -> dict[str, torch.Tensor]:
    """Read every tensor (cast to bf16, summed); returns copies of the float weights named in ``keep``."""
    kept = {}
    for name, tensor in stream:
        if tensor.is_floating_point():
            float(tensor.to(torch.bfloat16).float().sum())
            if name in keep:
                kept[name] = tensor.detach().float().clone()
    return kept


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The dequantized 4-bit weights of the model's quantized layers (to see whether sweeps moved them)."""
    import bitsandbytes.functional as bnbF

    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            found[name] = bnbF.dequantize_4bit(weight.data, state).float().clone()
    return found


def _drift(first: dict[str, torch.Tensor], last: dict[str, torch.Tensor]) -> float:
    return max(float((last[k] - first[k]).abs().max() / first[k].abs().max().clamp_min(1e-30)) for k in first)


def side_figures(model: nn.Module, sweep: Callable, cycles: int) -> dict[str, Any]:
    names = [n for n, _ in model.named_modules() if n.endswith(tuple(TARGETS))]
    keep = [n.replace("base_model.model.", "").replace(".base_layer", "") + ".weight" for n in names][:8]
    before = base_weights(model)
    first = consume(sweep(), keep)
    times, last = [], first
    for _ in range(cycles - 1):
        started = time.perf_counter()
        last = consume(sweep(), keep)
        times.append(time.perf_counter() - started)
    peak = measure.peak_bytes(lambda: consume(sweep(), [])) if measure.memory_probes_available() else None
    return {
        "seconds_per_sweep": statistics.median(times) if times else None,
        "peak_extra_mib": None if peak is None else peak / 2**20,
        "cycles": cycles,
        "handed_out_drift": _drift(first, last) if keep and last else None,
        "model_weight_drift": _drift(before, base_weights(model)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    measure.prepare_memory_probes()
    result: dict[str, Any] = {"model": args.model or "SmolLM2-135M-Instruct", "cycles": args.cycles}
    with tempfile.TemporaryDirectory() as tmp:
        folder = base_directory(args.model or "real", Path(tmp))
        sides = (("qadapt merged_weights", qadapt_side), ("peft merge_adapter+state_dict+unmerge", peft_side))
        for name, make in sides:
            model, sweep = make(folder)
            try:
                result[name] = side_figures(model, sweep, args.cycles)
            except Exception as exc:  # PEFT failing is a result to report
                result[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            del model, sweep
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 cycles")
    parser.add_argument("--model", default=None, help="'tiny' for a random tiny Llama (default: SmolLM2-135M)")
    parser.add_argument("--cycles", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    args.cycles = args.cycles or (3 if args.quick else 20)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
