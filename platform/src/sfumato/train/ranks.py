"""What the ranks of one training share: the console line rank 0 writes, and the small
all-reduces every rank joins so that all of them decide alike (the finite checks, the loss-spike
guard). Used by the worker loop (sfumato.train.worker), its checkpoints (checkpointing) and its
tasks (tasks)."""

from __future__ import annotations

import torch


def say(line: str) -> None:
    """One line to the driver's console. Not print(): Ray Train V2 patches print in its workers
    to log and also echo each line, and the console would show every line twice."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def all_reduce_any(flag: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Boolean flags OR-ed over the ranks, on the host."""
    import torch.distributed as dist

    value = flag.to(device=device, dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.bool().cpu()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Numbers averaged over the ranks (float64 on CPUs)."""
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / dist.get_world_size()).tolist()
