"""Process-group setup and the one place where parallelism is applied to the model.

    env = init_distributed("auto", cp=1)            # single process, or the ranks torchrun started
    module, grad_scale = parallelize(loss_module, cfg.parallel, env)

Order (each step a small function; later ones wrap what earlier ones built):
  1. context parallelism: swap every block.attention.inner_attention for a ring / Ulysses core  [not yet]
  2. activation checkpointing: per block, model.ckpt (applied inside GPT, see model._run_layer)
  3. torch.compile of the blocks                                                                [not yet]
  4. data parallelism: DDP for zero_stage=0 (DeepSpeed ZeRO 1/2/3 later), outermost, so it sees the
     final parameters and gradient hooks.
Rank layout: rank = dp_rank * cp + cp_rank, so a cp group sits on neighbouring GPUs (NVLink).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

CP_IMPLS = ("ring", "ulysses")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    group: Optional[Any] = None  # the dp x cp group the loss is averaged over (None: the default group)

    def barrier(self) -> None:
        if dist.is_initialized():
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"train.device must be auto, cpu or cuda, got {name!r}")


def init_distributed(device: str = "auto", cp: int = 1) -> DistEnv:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK), or run as one process.

    gloo on CPU, NCCL on CUDA. dp_size = world_size // cp.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    cp = cp if cp >= 1 and world % cp == 0 else 1  # a bad cp is reported by validate_parallel
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, dp_rank=rank // cp,
                   dp_size=world // cp, cp_rank=rank % cp, cp_size=cp)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def validate_parallel(cfg, env: DistEnv) -> None:
    """Check the parallel config against the world size, with the numbers in the message."""
    if cfg.cp_impl not in CP_IMPLS:
        raise ValueError(f"parallel.cp_impl must be one of {CP_IMPLS}, got {cfg.cp_impl!r}")
    if cfg.cp < 1:
        raise ValueError(f"parallel.cp must be >= 1, got {cfg.cp}")
    if cfg.cp > 1:
        raise ValueError(f"parallel.cp={cfg.cp}: context parallelism is not implemented in the trainer yet "
                         f"(use parallel.cp=1)")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.zero_stage != 0:
        raise ValueError(f"parallel.zero_stage={cfg.zero_stage}: DeepSpeed ZeRO is not implemented in the "
                         f"trainer yet (use parallel.zero_stage=0 for DDP)")
    dp = env.world_size // cfg.cp if cfg.dp == -1 else cfg.dp
    if dp * cfg.cp != env.world_size:
        raise ValueError(f"parallel.dp ({cfg.dp}) * parallel.cp ({cfg.cp}) must equal the world size "
                         f"({env.world_size})")


def apply_data_parallel(module: nn.Module, env: DistEnv) -> tuple[nn.Module, float]:
    """DDP over every rank. Returns (module, grad_scale): DDP averages gradients over world_size ranks,
    while our loss is already a global mean, so the backward is scaled by world_size to undo the average."""
    if env.world_size == 1:
        return module, 1.0
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids), float(env.world_size)


def parallelize(module: nn.Module, cfg, env: DistEnv) -> tuple[nn.Module, float]:
    """Apply the configured parallelism (see the module docstring for the order)."""
    validate_parallel(cfg, env)
    return apply_data_parallel(module, env)
