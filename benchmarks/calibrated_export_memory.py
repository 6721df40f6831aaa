"""Peak memory of a calibrated merge: ``qadapt export --calibration`` (one decoder block at a time) against
the in-memory ``merge(model, calibration=batches)`` (the whole model loaded), on a float Llama saved to disk.

Each path runs in its own process; the figure is the process's peak resident memory (``ru_maxrss``)
minus its resident memory once the libraries are imported and the batches made. ``--quick`` uses a
smaller model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {"quick": (256, 4, 768), "full": (512, 8, 1536)}  # hidden, layers, intermediate


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        line = next(x for x in handle if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _batches() -> list:
    import torch

    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 2000, (4, 128), generator=generator)} for _ in range(8)]


def child(path: str, mode: str) -> None:
    """Run one path in this process and print ``{"baseline": MiB, "peak": MiB}``."""
    import warnings

    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import qadapt

    folder = Path(path)
    batches = _batches()
    torch.set_num_threads(2)
    baseline = _rss_mib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "export":
            qadapt.export(
                folder / "float", folder / "adapter", folder / "out", to="nf4", progress=False, calibration=batches,
                overwrite=True,
            )  # fmt: skip
        else:
            nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
            model = LlamaForCausalLM.from_pretrained(folder / "float", quantization_config=nf4, device_map="cpu")
            qadapt.merge(qadapt.load_adapter(model, folder / "adapter"), calibration=batches, warn_below=None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"baseline": baseline, "peak": peak}))


def prepare(folder: Path, size: str) -> int:
    """The float base and a LoRA adapter trained-like (perturbed) on its nf4 load; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import qadapt

    hidden, layers, intermediate = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder / "float")
    wrapped = qadapt.wrap(model, method="lora", backend="bnb4", method_options={"r": 8})
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    qadapt.save_adapter(wrapped, folder / "adapter")
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    size = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory() as tmp:
        params = prepare(Path(tmp), size)
        found = {}
        for mode in ("in-memory", "export"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", tmp, mode], capture_output=True, text=True, check=True
            )
            found[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"model: {params / 1e6:.1f} M parameters ({size}: hidden, layers, intermediate = {SIZES[size]})")
    print("| path | peak RSS above baseline |\n|---|---|")
    for mode, figures in found.items():
        print(f"| {mode} | {figures['peak'] - figures['baseline']:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
