"""Shared fixtures: fake distributions on sys.path, checksums, small seeded layers."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from qadapt import registry

# The tests use small tensors: one thread avoids thread contention overhead on 2-core CI machines.
torch.set_num_threads(1)

TESTS_DIR = Path(__file__).parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

#: (backend name, backend options) for every built-in backend; ids read "bnb4-nf4" etc.
BACKENDS: list[tuple[str, dict]] = [
    ("none", {}),
    ("bnb8", {}),
    ("bnb4", {"quant_type": "nf4"}),
    ("bnb4", {"quant_type": "fp4"}),
    ("torchao", {"config": "int8"}),
    ("torchao", {"config": "int4", "group_size": 32}),
    # torchao's NF4 needs the block count to be a multiple of the scaler block (default 256):
    # the test layers (32x16, 64x48, 192x96) have 8, 48 and 288 blocks of 64.
    ("torchao", {"config": "nf4", "nf4_scaler_block_size": 8}),
    ("hqq", {"nbits": 4, "group_size": 64}),
    # compressed-tensors' W4A16 / W8A16 layout; group 16 divides every test layer's in_features.
    ("compressed", {"num_bits": 4, "group_size": 16}),
    ("compressed", {"num_bits": 8, "group_size": 16}),
    # optimum-quanto QLinear (qint2 is checked in tests/test_quanto.py: its error is above the matrix's bounds).
    ("quanto", {"weights": "qint8"}),
    ("quanto", {"weights": "qint4"}),
    ("gguf", {"type": "q4_1"}),
]
BACKEND_IDS = [
    "none",
    "bnb8",
    "bnb4-nf4",
    "bnb4-fp4",
    "torchao-int8",
    "torchao-int4",
    "torchao-nf4",
    "hqq-4bit",
    "compressed-w4",
    "compressed-w8",
    "quanto-qint8",
    "quanto-qint4",
    "gguf-q4_1",
]


def tensor_checksum(tensors: Iterator[tuple[str, torch.Tensor]]) -> str:
    """A hash over names, dtypes, shapes and raw bytes of tensors (bit-level equality)."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_checksum(model: nn.Module) -> str:
    """Checksum of every parameter and buffer (including bitsandbytes' quantized storage)."""
    return tensor_checksum(sorted(model.state_dict(keep_vars=False).items()))


@pytest.fixture
def make_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Put a fake installed distribution (dist-info + modules) on sys.path for one test.

    ``make_distribution(name, version, entry_points={"qadapt.methods": {"x": "mod:Cls"}}, modules={"mod": src})``
    """
    created: list[str] = []

    def make(name: str, version: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> Path:
        root = tmp_path / f"site-{name}"
        dist_info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = []
        for group, eps in entry_points.items():
            lines.append(f"[{group}]")
            lines.extend(f"{ep_name} = {target}" for ep_name, target in eps.items())
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in modules.items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            created.append(module)
        monkeypatch.syspath_prepend(str(root))
        registry.refresh()
        return root

    yield make
    for module in created:
        sys.modules.pop(module, None)
    registry.refresh()


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)


def float_linear(in_features: int, out_features: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    """A float32 nn.Linear with seeded weights."""
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)
