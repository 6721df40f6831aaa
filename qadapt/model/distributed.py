"""Sharded parameters (FSDP2 ``fully_shard``, DTensor) at the points where qadapt reads or writes them.

Under FSDP2 every parameter, adapters and quantized base alike, is a ``DTensor`` holding one
shard per rank. Checkpoints stay whole: :func:`full` gathers a sharded adapter tensor (a
collective, so every rank calls it), :func:`assign` writes a whole tensor's local shard back,
and :func:`is_writer` picks the one rank that writes the file.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a ``DTensor`` (a parameter that FSDP2 or tensor parallelism split across ranks)."""
    return isinstance(tensor, DTensor)


def any_sharded(module: nn.Module) -> bool:
    """True when some parameter of ``module`` is sharded."""
    return any(is_sharded(p) for p in module.parameters())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank when sharded (collective), else ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy whole ``value`` into ``target``; a sharded target takes only its local shard.

    Every rank holds the same ``value`` (each read the same file), so the split needs no
    communication.
    """
    if is_sharded(target):
        shard = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(shard)
    else:
        target.copy_(value)


def is_writer(sharded: bool) -> bool:
    """Whether this process writes a checkpoint gathered from ``sharded`` tensors: rank 0 only."""
    return not (sharded and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def barrier(sharded: bool) -> None:
    """Wait for every rank after a gathered write, so no rank reads a checkpoint before it exists."""
    if sharded and dist.is_available() and dist.is_initialized():
        dist.barrier()
