"""FSDP2 over bnb4 on GPUs (NCCL): the CPU test's checks (tests/test_fsdp.py) on the real transport.

    torchrun --nproc_per_node 2 benchmarks/fsdp2_cuda.py [--hidden 2048 --layers 16 --steps 6 --storage bfloat16]

Every rank builds the same wrapped Llama (bnb4, OFT, ``quant_storage`` as given, model in that
dtype), shards it per decoder block and at the root, and trains ``--steps`` steps with rank ``r``
taking rows ``[r*b, (r+1)*b)`` of each batch. Rank 0 then trains an unsharded copy on the whole
batch (the single-process reference), and the ranks resume a fresh sharded copy from the
checkpoint written halfway. Printed: per-step losses (sharded mean vs single), max adapter
difference, per-rank peak GPU memory (sharded) against the single-process peak, and the resume
check. Not run in CI (no GPU there); it is the same code path as the CPU test.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import qadapt
from qadapt.model import distributed


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=8,
    )
    dtype = getattr(torch, args.storage)
    model = LlamaForCausalLM(config).to(dtype)
    model = qadapt.wrap(
        model,
        method="oft",
        backend="bnb4",
        method_options={"block_size": 32},
        backend_options={"quant_storage": args.storage, "compute_dtype": args.storage},
    )
    # OFT adapters start in float32; FSDP2 wants one dtype for trainable parameters, the model's.
    model.to(device=device, dtype=dtype)
    model.train()
    return model


def shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rows: int, length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 1024, (rows, length), generator=generator).to(device)


def train(model, opt, steps, rows_of, device, on_step=None) -> list[float]:
    losses = []
    for step in steps:
        ids = rows_of(batch(step, 2 * ARGS.batch, ARGS.length, device))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    return losses


def adam(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    mesh = init_device_mesh("cuda", (world,))
    b = ARGS.batch

    def mine(ids: torch.Tensor) -> torch.Tensor:
        return ids[rank * b : (rank + 1) * b]

    workdir = Path(tempfile.mkdtemp()) if rank == 0 else None
    shared = [str(workdir) if workdir else None]
    dist.broadcast_object_list(shared, src=0)
    workdir = Path(shared[0])

    # Sharded run.
    base = build(ARGS, device)
    pristine = copy.deepcopy(base).cpu() if rank == 0 else None
    model = shard(base, mesh)
    opt = adam(model)
    half = ARGS.steps // 2

    def checkpoint(done: int) -> None:
        if done == half:
            qadapt.save_adapter(model, workdir / "adapter")
            state = get_optimizer_state_dict(
                model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if rank == 0:
                torch.save(state, workdir / "optimizer.pt")
            dist.barrier()

    torch.cuda.reset_peak_memory_stats(device)
    losses = train(model, opt, range(ARGS.steps), mine, device, checkpoint)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    adapters = {n: distributed.full(p.detach()).float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    model = opt = None  # free the trained model before the resumed one is built
    torch.cuda.empty_cache()

    # Resume into a fresh sharded model.
    resumed = shard(build(ARGS, device), mesh)
    qadapt.load_adapter(resumed, workdir / "adapter")
    resumed_opt = adam(resumed)
    state = torch.load(workdir / "optimizer.pt") if rank == 0 else {}
    set_optimizer_state_dict(
        resumed, resumed_opt, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    resumed_losses = train(resumed, resumed_opt, range(half, ARGS.steps), mine, device)
    del resumed, resumed_opt
    torch.cuda.empty_cache()

    if rank == 0:
        # Single-process reference on the whole batch (same device, nothing sharded).
        single = pristine.to(device)
        single_opt = adam(single)
        torch.cuda.reset_peak_memory_stats(device)
        single_losses = train(single, single_opt, range(ARGS.steps), lambda ids: ids, device)
        single_peak = torch.cuda.max_memory_allocated(device) / 2**20
        named = dict(single.named_parameters())
        max_diff = max((named[n].detach().float().cpu() - v).abs().max().item() for n, v in adapters.items())
        mean = [sum(col) / world for col in zip(*gathered, strict=True)]
        print(f"model: hidden {ARGS.hidden}, {ARGS.layers} layers, quant_storage {ARGS.storage}, {world} ranks")
        for step, (m, s) in enumerate(zip(mean, single_losses, strict=True)):
            print(f"step {step}: sharded mean {m:.6f}  single {s:.6f}  diff {abs(m - s):.2e}")
        print(f"max adapter difference sharded vs single: {max_diff:.2e}")
        print(f"peak GPU memory per rank (MiB): {[round(p, 1) for p in peaks]}  single process: {single_peak:.1f}")
        same = resumed_losses == losses[half:]
        print(f"resume: replayed {resumed_losses}  uninterrupted {losses[half:]}  equal: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--storage", choices=["bfloat16", "float32"], default="bfloat16")
    ARGS = parser.parse_args()
    main()
