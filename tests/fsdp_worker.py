"""One training run for tests/test_fsdp.py: FSDP2 under ``torchrun`` (2 ranks), or a single process.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT MODEL.pt...   # FSDP2, rank r takes rows [2r, 2r+2)
    python tests/fsdp_worker.py OUT MODEL.pt...                        # one process, all rows at once

Each ``MODEL.pt`` is a wrapped model saved whole by the test (built once, so every process
starts from the same quantized bits); results go to ``OUT/<model file stem>/``. The run trains
``STEPS`` AdamW steps; after ``RESUME_AT`` steps it checkpoints the adapter
(``qadapt.save_adapter``) and the optimizer; the sharded run then resumes a fresh sharded copy
from that checkpoint, replays the remaining steps, and merges its adapter on rank 0. Everything
the test checks goes to ``rank{r}.pt`` (``rank0.pt`` for the single process).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import token_ids

import qadapt
from qadapt import registry
from qadapt.model import distributed

STEPS = 3
RESUME_AT = 2
ROWS_PER_RANK = 2
RANKS = 2
LENGTH = 8


def status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def settle_and_reset_peak() -> None:
    """Free what is garbage, give freed heap back to the OS, and restart the peak (``VmHWM``)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def batch(step: int, rank: int | None) -> torch.Tensor:
    """Step ``step``'s batch: all ``RANKS * ROWS_PER_RANK`` rows (rank None) or one rank's rows."""
    ids = token_ids(seed=500 + step, batch=RANKS * ROWS_PER_RANK, length=LENGTH)
    return ids if rank is None else ids[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]


def load(path: str, mesh) -> torch.nn.Module:
    # The plugins' registered names come from the registry: load them before unpickling instances.
    registry.method_class("oft"), registry.backend_class("bnb4"), registry.backend_class("torchao")
    model = torch.load(path, weights_only=False)
    model.train()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:  # one FSDP unit per decoder block, and the root
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train(model, opt, steps: range, rank: int | None, on_step=None) -> list[float]:
    losses = []
    for step in steps:
        ids = batch(step, rank)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    return losses


def plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind ``tensor``: itself, or a tensor subclass's inner tensors (NF4)."""
    tensor = tensor.detach()
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [part for name in names for part in plain_parts(getattr(tensor, name))]
    return [tensor]


def base_digest(model: torch.nn.Module) -> str:
    """Hash of this process's part of every quantized base (local shards under FSDP2)."""
    digest = hashlib.sha256()
    for name, layer in _layers(model):
        for key, tensor in sorted(layer.base.state_dict().items()):
            local = tensor.to_local() if distributed.is_sharded(tensor) else tensor
            digest.update(f"{name}.{key}".encode())
            for part in plain_parts(local):
                digest.update(part.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, qadapt.QuantAdapterLinear)]


def local_param_mib(model: torch.nn.Module) -> float:
    """MiB of parameters this process holds (its shards under FSDP2)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if distributed.is_sharded(p) else p
        total += sum(part.numel() * part.element_size() for part in plain_parts(local))  # NF4: its packed parts
    return total / 2**20


def full_adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (gathered from all ranks when sharded)."""
    return {n: distributed.full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def merged_digest(model_path: str, adapter: str | os.PathLike[str] | dict[str, torch.Tensor]) -> str:
    """Merge an adapter (a checkpoint directory, or whole tensors) into an unsharded model; hash the
    merged quantized weights. Only the first and last decoder blocks are merged (14 of 56 layers):
    a 4-bit requantize on CPU is the slow part, and these cover both ends of the sharded order."""
    model = load(model_path, None)
    if isinstance(adapter, dict):
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in adapter.items():
                params[name].copy_(value)
    else:
        qadapt.load_adapter(model, adapter)
    merged = torch.nn.ModuleList([model.model.layers[0], model.model.layers[-1]])
    for _, layer in _layers(merged):
        layer.merge()
    return base_digest(merged)


def run(model_path: str, out: Path, mesh, rank: int | None) -> None:
    """Train, checkpoint, resume and merge one model; results to ``out/rank{r}.pt``."""
    sharded = mesh is not None
    out.mkdir(parents=True, exist_ok=True)
    settle_and_reset_peak()
    rss_start = status_mib("VmRSS")
    model = load(model_path, mesh)
    base_before = base_digest(model)
    opt = optimizer(model)
    settle_and_reset_peak()
    rss_trained_from = status_mib("VmRSS")

    def checkpoint(done: int) -> None:
        if done != RESUME_AT:
            return
        qadapt.save_adapter(model, out / "resume")  # every rank joins; rank 0 writes the whole adapter
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_optimizer_state_dict(model, opt, options=options)
        else:
            state = opt.state_dict()
        if rank in (None, 0):
            torch.save(state, out / "optimizer.pt")
        if sharded:
            dist.barrier()

    losses = train(model, opt, range(STEPS), rank, checkpoint)
    result = {
        "losses": losses,
        "peak_mib": status_mib("VmHWM"),
        "rss_start_mib": rss_start,
        "rss_trained_from_mib": rss_trained_from,
        "param_mib": local_param_mib(model),
        "base_before": base_before,
        "base_after": base_digest(model),
        "adapters": full_adapters(model),
    }
    if sharded:
        try:
            qadapt.merge(model)
        except qadapt.CapabilityError as exc:
            result["merge_on_shards"] = str(exc)
        assert base_digest(model) == base_before
    qadapt.save_adapter(model, out / "final")
    model = opt = None  # free the trained model before the resumed one is built

    if not sharded:
        torch.save(result, out / "rank0.pt")
        return
    # Resume: a fresh model, sharded the same way, takes the checkpoint and replays the last steps.
    resumed = load(model_path, mesh)
    qadapt.load_adapter(resumed, out / "resume")
    resumed_opt = optimizer(resumed)
    state = torch.load(out / "optimizer.pt") if rank in (None, 0) else {}
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(resumed, resumed_opt, state, options=options)
    else:
        resumed_opt.load_state_dict(state)
    result["resumed_losses"] = train(resumed, resumed_opt, range(RESUME_AT, STEPS), rank)
    result["resumed_adapters"] = full_adapters(resumed)
    del resumed, resumed_opt

    if rank == 0:
        # The merge after training: from the checkpoint the sharded run wrote, and from the
        # same whole tensors put straight into an unsharded model.
        result["merged_from_checkpoint"] = merged_digest(model_path, out / "final")
        result["merged_in_memory"] = merged_digest(model_path, result["adapters"])
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()


def main() -> None:
    out, model_paths = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    mesh, rank = None, None
    if "RANK" in os.environ:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for model_path in model_paths:
        run(model_path, out / Path(model_path).stem, mesh, rank)
    if mesh is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
