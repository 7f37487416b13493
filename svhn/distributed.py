"""Processes started by torchrun: which one this is, its device, and what they share.

torchrun (torch.distributed.run, PyTorch's own launcher) sets WORLD_SIZE, RANK and LOCAL_RANK;
without it this is rank 0 of 1 and nothing is initialised. The backend follows the device: HCCL
on Ascend NPUs, NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from svhn import devices


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Ranks:
    """This process's place among torchrun's (rank 0 of 1 without torchrun), and its device:
    the kind --device names, at index LOCAL_RANK. Raises devices.DeviceError when there is no
    such device; rank 0 reports why auto chose what it chose through `note`."""

    def __init__(self, device_spec: str, note: Callable[[str], None] = lambda line: None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        notes: list[str] = []
        device = devices.resolve(device_spec, notes)
        if device.type != "cpu" and device.index != local:  # a torchrun rank: its own device of that kind
            device = devices.resolve(f"{device.type}:{local}")
        self.device = device
        if self.rank == 0:
            for line in notes:
                note(line)
        if self.world > 1:
            backend = {"npu": "hccl", "cuda": "nccl"}.get(self.device.type, "gloo")
            dist.init_process_group(backend=backend, device_id=self.device if self.device.type != "cpu" else None)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float32 on the device (HCCL on Atlas training chips
        all-reduces fp32 but never int64)."""
        t = torch.tensor(values, dtype=torch.float32, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def same_everywhere(self, model: nn.Module) -> bool:
        """Whether every rank holds the same weights (a sum of the parameters, compared). In
        float32: equal weights give equal sums, and NPUs have little float64."""
        if self.world == 1:
            return True
        with torch.no_grad():
            checksum = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum().reshape(1)
        low, high = checksum.clone(), checksum.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool(low == high)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj: object) -> object:
        """Rank 0's obj on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: object) -> list[object]:
        """Every rank's obj, in rank order (a list of one without torchrun)."""
        if self.world == 1:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
