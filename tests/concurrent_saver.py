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

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import perturb_adapters, tiny_llama  # noqa: E402

import qadapt  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
#: (seed, block size) of adapters A and B
ADAPTERS = ((3, 16), (4, 32))


def build(seed: int, block_size: int) -> torch.nn.Module:
    model = qadapt.wrap(
        tiny_llama(), method="oft", backend="none", targets=TARGETS, method_options={"block_size": block_size}
    )
    perturb_adapters(model, seed=seed)
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
