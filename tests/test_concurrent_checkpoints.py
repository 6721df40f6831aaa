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
from concurrent_saver import ADAPTERS, base_model, build

import qadapt
from qadapt.errors import CheckpointError
from qadapt.persist.adapter import adapter_tensors, read_adapter

#: Seconds this process loads for, once the writer runs.
LOAD_SECONDS = 5.0


def adapter_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." in n}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def test_concurrent_saves_never_load_a_mix(tmp_path: Path):
    models = [build(*spec) for spec in ADAPTERS]
    expected = [adapter_values(model) for model in models]
    stored = [adapter_tensors(model, "default") for model in models]
    plain = base_model()
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("concurrent_saver.py")), str(tmp_path), str(stop), "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    counts = {"A": 0, "B": 0, "CheckpointError": 0, "silent corruption": 0}
    others: list[str] = []
    reasons: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 90  # the writer imports torch first: slow on a busy machine
        while not ((tmp_path / "peft" / "adapter_config.json").exists() and (tmp_path / "qadapt").exists()):
            assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
            time.sleep(0.05)
        end = time.monotonic() + LOAD_SECONDS
        i = 0
        while time.monotonic() < end:
            try:
                if i % 16 == 0:
                    values = adapter_values(qadapt.load_adapter(copy.deepcopy(plain), tmp_path / "qadapt"))
                elif i % 16 == 8:
                    model = qadapt.load_peft_adapter(copy.deepcopy(plain), tmp_path / "peft", backend="none")
                    values = adapter_values(model)
                else:  # the read alone, many times faster: more chances to meet a save mid-way
                    values = read_adapter(tmp_path / "qadapt").tensors
            except CheckpointError as exc:
                counts["CheckpointError"] += 1
                text = str(exc)
                why = "pair from two saves" if ("not written with" in text or "other method settings" in text) else text
                reasons[why] = reasons.get(why, 0) + 1
            except Exception as exc:  # the point of the test: anything else is a failure, reported below
                others.append(f"{type(exc).__name__}: {exc}")
            else:
                pairs = zip("AB", expected, stored, strict=True)
                kind = next((name for name, e, t in pairs if same(values, e) or same(values, t)), None)
                counts[kind or "silent corruption"] += 1
            i += 1
    finally:
        stop.write_text("")
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    saves = int(out.strip())
    print(f"\nconcurrent checkpoints: {saves} saves (x2 formats), {i} loads and reads: {counts}")
    print(f"CheckpointErrors: {reasons}; other errors: {len(others)} {others[:2]}")
    assert counts["silent corruption"] == 0, counts
    assert not others, others[:3]
    assert counts["A"] + counts["B"] > 0 and saves > 1, (counts, saves)
