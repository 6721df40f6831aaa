"""Two processes: one saves adapters A and B in turn, this one loads meanwhile (#13, item 1).

Every load must give exactly A or exactly B, or raise a CheckpointError: never values from a mix
of two files (a silent corruption) and never another exception. Bounded to ~20 s.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import torch
from concurrent_saver import ADAPTERS, build
from tiny_models import tiny_llama

import qadapt
from qadapt.errors import CheckpointError

#: Seconds this process loads for, once the writer runs.
LOAD_SECONDS = 5.0


def adapter_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." in n}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_concurrent_saves_never_load_a_mix(tmp_path: Path):
    expected = [adapter_values(build(*spec)) for spec in ADAPTERS]
    plain = tiny_llama()
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("concurrent_saver.py")), str(tmp_path), str(stop), "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    counts = {"A": 0, "B": 0, "CheckpointError": 0, "silent corruption": 0}
    others: list[str] = []
    try:
        deadline = time.monotonic() + 15
        while not ((tmp_path / "peft" / "adapter_config.json").exists() and (tmp_path / "qadapt").exists()):
            assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
            time.sleep(0.05)
        end = time.monotonic() + LOAD_SECONDS
        i = 0
        while time.monotonic() < end:
            model = copy.deepcopy(plain)
            try:
                if i % 2:
                    qadapt.load_peft_adapter(model, tmp_path / "peft", backend="none")
                else:
                    qadapt.load_adapter(model, tmp_path / "qadapt")
            except CheckpointError:
                counts["CheckpointError"] += 1
            except Exception as exc:  # the point of the test: anything else is a failure, reported below
                others.append(f"{type(exc).__name__}: {exc}")
            else:
                values = adapter_values(model)
                kind = next((name for name, e in zip("AB", expected, strict=True) if same(values, e)), None)
                counts[kind or "silent corruption"] += 1
            i += 1
    finally:
        stop.write_text("")
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    saves = int(out.strip())
    print(f"\nconcurrent checkpoints: {saves} saves (x2 formats), {i} loads: {counts}, other errors: {len(others)}")
    assert counts["silent corruption"] == 0, counts
    assert not others, others[:3]
    assert counts["A"] + counts["B"] > 0 and saves > 1, (counts, saves)
