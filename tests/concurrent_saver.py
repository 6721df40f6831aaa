"""Writer half of the concurrent save/load stress test: saves two different adapters in turn.

``python concurrent_saver.py DIRECTORY STOP_FILE MAX_SECONDS`` alternates adapter A and B (other
values, other block size, so other tensor shapes) into ``DIRECTORY/qadapt`` (``save_adapter``)
and ``DIRECTORY/peft`` (``save_peft_adapter``) until ``STOP_FILE`` exists or the time is up, then
prints how many saves it made.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

import qadapt

torch.set_num_threads(1)

#: (seed, block size) of adapters A and B
ADAPTERS = ((3, 16), (4, 32))


def base_model() -> nn.Module:
    """Three float linear layers (no transformers import: this process starts fast)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 64))


@torch.no_grad()
def build(seed: int, block_size: int) -> nn.Module:
    model = qadapt.wrap(base_model(), method="oft", backend="none", method_options={"block_size": block_size})
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def main(directory: Path, stop: Path, seconds: float) -> int:
    models = [build(*spec) for spec in ADAPTERS]
    saves, start = 0, time.monotonic()
    while not stop.exists() and time.monotonic() - start < seconds:
        model = models[saves % 2]
        qadapt.save_adapter(model, directory / "qadapt")
        qadapt.save_peft_adapter(model, directory / "peft")
        saves += 1
    print(saves)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])))
