"""torch.distributed helpers for torchrun ranks: joining the group, gathering tensors and sharing objects."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; join the process group when there are several ranks."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def gather(x: torch.Tensor, world: int, grad: bool) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (with gradients through ``torch.distributed.nn`` when ``grad``)."""
    if world == 1:
        return x
    if grad:
        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():  # deprecated in torch 2.14 for a private API, still correct
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
            return torch.cat(dist_fn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def broadcast(obj, world: int):
    """Rank 0's ``obj`` on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
