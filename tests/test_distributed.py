"""Training a wrapped model: 2-process DDP on CPU (gloo), and a short transformers ``Trainer`` run.

The DDP test starts two real processes that talk over 127.0.0.1; each trains on its own data,
and afterwards every rank must hold the same adapter parameters (DDP averaged the gradients),
different from where they started, while the quantized base stayed untouched.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import launch
import pytest
import torch
from conftest import model_checksum
from tiny_models import VOCAB, tiny_llama, token_ids
from transformers import Trainer, TrainingArguments

import qadapt

TESTS_DIR = Path(__file__).resolve().parent
STEPS = 3

WORKER = """
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, {tests_dir!r})
from conftest import model_checksum
from tiny_models import tiny_llama, token_ids

import qadapt

rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", rank=rank, world_size=world)
model = qadapt.wrap(tiny_llama(), method={method!r}, backend={backend!r}, targets=["q_proj", "v_proj", "down_proj"],
                    method_options={options!r})
model.train()
base = model_checksum(model.model.layers[0].self_attn.q_proj.base)
initial = {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
ddp = DistributedDataParallel(model)
optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
losses = []
for step in range({steps}):
    ids = token_ids(seed=1000 + 10 * rank + step, batch=2, length=8)  # each rank sees its own data
    loss = ddp(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
trained = {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
torch.save({{"initial": initial, "trained": trained, "losses": losses, "base_before": base,
            "base_after": model_checksum(model.model.layers[0].self_attn.q_proj.base)}}, out)
dist.destroy_process_group()
"""


def run_ddp(tmp_path: Path, method: str, backend: str, options: dict, world: int = 2) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(
        WORKER.format(tests_dir=str(TESTS_DIR), method=method, backend=backend, options=options, steps=STEPS)
    )
    outputs = [tmp_path / f"rank{rank}.pt" for rank in range(world)]
    commands = [[sys.executable, str(script), str(rank), str(world), str(outputs[rank])] for rank in range(world)]
    launch.run_processes(commands, launch.env(), timeout=120)
    return [torch.load(path) for path in outputs]


@pytest.mark.parametrize(
    ("method", "backend", "options"),
    [("oft", "bnb4", {"block_size": 16}), ("randlora", "bnb8", {"r": 8})],
    ids=["oft-bnb4", "randlora-bnb8"],
)
def test_ddp_on_two_cpu_processes_keeps_adapters_identical_across_ranks(tmp_path, method, backend, options):
    first, second = run_ddp(tmp_path, method, backend, options)
    assert first["trained"].keys() == second["trained"].keys() and first["trained"]
    for name, value in first["trained"].items():
        assert torch.equal(value, second["trained"][name]), name
        assert torch.equal(first["initial"][name], second["initial"][name]), name
    assert any(not torch.equal(v, first["initial"][n]) for n, v in first["trained"].items())
    # Each rank computed its loss on its own data, so the losses differ while the weights agree.
    assert first["losses"] != second["losses"]
    assert all(math.isfinite(loss) for loss in first["losses"] + second["losses"])
    for rank in (first, second):
        assert rank["base_after"] == rank["base_before"]


def test_a_short_trainer_run_trains_only_the_adapters(tmp_path):
    model = qadapt.wrap(
        tiny_llama(), method="oft", backend="bnb4", targets=["q_proj", "v_proj"], method_options={"block_size": 16}
    )
    model.train()
    storage_before = [model_checksum(m.base) for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear)]
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert adapters_before and all(".adapters." in n for n in adapters_before)

    examples = [{"input_ids": ids, "labels": ids} for ids in token_ids(seed=5, batch=16, length=8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    result = trainer.train()

    assert result.global_step == 4 and math.isfinite(result.training_loss)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4 and all(math.isfinite(loss) for loss in logged)
    assert result.training_loss < 1.5 * math.log(VOCAB)  # a sane cross-entropy, not a blow-up
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in adapters_before.items())
    assert all(torch.equal(after[n], p) for n, p in frozen_before.items())
    storage_after = [model_checksum(m.base) for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear)]
    assert storage_after == storage_before
