"""Joining the process group torchrun describes, as the distributed example and benchmark both do."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from .errors import UserError


def start_process_group(device_type: Optional[str] = None, how_to_run: str = "torchrun --nproc_per_node 2 ...") \
        -> torch.device:
    """init_process_group for this torchrun rank: NCCL with one GPU per rank (LOCAL_RANK) when
    device_type is "cuda" (default: when CUDA is available), else gloo on CPUs with the cores split
    evenly among the ranks. Returns this rank's device. Raises UserError naming `how_to_run` when the
    process was not started by torchrun (no RANK in the environment)."""
    if "RANK" not in os.environ:
        raise UserError(f"run me with torchrun, e.g. {how_to_run}")
    cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return device
