"""Process-group setup and the one place where parallelism is applied to the model.

    env = init_distributed("auto", cfg.parallel)      # single process, or the ranks torchrun started
    par = parallelize(loss_module, cfg, env, optimizer, lr_factor)     # -> Parallelized(module, grad_scale, ...)
    batch = shard_batch(batch, env.cp_group, ulysses_degree=env.ulysses_degree)   # the trainer shards inputs

Order (each step a small function; later ones wrap what earlier ones built):
  1. context parallelism: swap every block.attention.inner_attention for a ring / Ulysses / hybrid core
  2. activation checkpointing: per block, model.ckpt (applied inside GPT, trainer/activations.py); the ring
     core takes part in ckpt=selective (keeps / replays its output)
  3. torch.compile of each block's non-attention stages (model.compile, inside GPT); the CP core stays eager
  4. data parallelism, outermost, so it sees the final parameters and gradient hooks: DDP for zero_stage=0,
     a DeepSpeed ZeRO 1/2/3 engine otherwise (it then owns backward, optimizer step and its checkpoint shards)
Rank layout: rank = dp_rank * cp + cp_rank, so a cp group sits on neighbouring GPUs (NVLink); under
cp_impl=hybrid, cp_rank = ring_rank * u + ulysses_rank (the all-to-all runs over the nearest u). Gradients are
reduced over all dp x cp ranks (parallel/data_parallel.py says why that is exact).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from parallel import (ParallelDims, hybrid_plan, hybrid_shard_for_rank, init_mesh, ring_attn_func, ring_plan,
                      shard_sequence, ulysses_attn_func, ulysses_plan)
from parallel.data_parallel import destroy_process_groups, init_zero_engine, wrap_ddp, zero_config
from parallel.hybrid import hybrid_to_heads, hybrid_to_sequence
from parallel.sharding import group_rank_and_size
from trainer.config import ParallelConfig
from trainer.model.activations import attention_keep_mode, keep_attention, replay_attention
from trainer.model.loss import IGNORE_INDEX

CP_IMPLS = ("ring", "ulysses", "hybrid")
CP_LAYOUT = "zigzag"  # 2*cp chunks, rank r holds r and 2cp-1-r: equal causal work on every rank


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
    cp_group: Optional[Any] = None  # this rank's cp group (consecutive ranks); None when cp == 1
    ulysses_degree: int = 1  # hybrid CP: u; the two groups below are set only when u > 1
    cp_ulysses_group: Optional[Any] = None  # u consecutive ranks: the all-to-all
    cp_ring_group: Optional[Any] = None  # cp / u ranks of stride u: the ring

    def barrier(self) -> None:
        if dist.is_initialized():
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


@dataclass
class Parallelized:
    """What parallelize() built: the module the loop calls, and how to scale its loss for backward."""
    module: nn.Module  # DDP wrapper, DeepSpeed engine, or the module itself
    grad_scale: float  # undoes the gradient average over ranks (the loss is already a global mean)
    engine: Optional[Any] = None  # the DeepSpeed engine when zero_stage > 0 (it steps the optimizer)


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


def resolve_parallel(cfg, world_size: int) -> ParallelDims:
    """The one check of parallel.* (cfg: a ParallelConfig) against the world size; resolves parallel.dp=-1.

    Returns the dp x cp (x Ulysses) sizes the process groups are built for. init_distributed calls it before
    joining any process group, so every rank stops with the same ValueError; validate_parallel calls it again
    to check that an existing DistEnv runs this config.
    """
    cp, dp = cfg.cp, cfg.dp
    if cfg.cp_impl not in CP_IMPLS:
        raise ValueError(f"parallel.cp_impl must be one of {CP_IMPLS}, got {cfg.cp_impl!r}")
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"parallel.cp must be an int >= 1, got {cp!r}")
    if not isinstance(dp, int) or (dp < 1 and dp != -1):
        raise ValueError(f"parallel.dp must be -1 (world size // parallel.cp) or an int >= 1, got {dp!r}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    needed = cp if dp == -1 else dp * cp  # ranks the config asks for (dp=-1: a multiple of cp)
    if world_size == 1 and needed > 1:
        raise ValueError(f"parallel.dp={dp} parallel.cp={cp} needs {needed} ranks, but this process runs alone "
                         f"(world size 1): start {needed} ranks with torchrun --nproc_per_node={needed} -m "
                         f"trainer.train ... (or scripts/launch.sh)")
    if dp == -1 and world_size % cp != 0:
        raise ValueError(f"parallel.cp ({cp}) must divide the world size ({world_size}): parallel.dp=-1 is "
                         f"world size // parallel.cp")
    if dp != -1 and dp * cp != world_size:
        raise ValueError(f"parallel.dp={dp} x parallel.cp={cp} needs {dp * cp} ranks, but the world size is "
                         f"{world_size}: launch with torchrun --nproc_per_node={dp * cp}, or set parallel.dp=-1 "
                         f"(world size // parallel.cp)")
    dp = world_size // cp if dp == -1 else dp
    if cfg.zero_stage != 0 and world_size == 1:
        raise ValueError(f"parallel.zero_stage={cfg.zero_stage} shards weights / optimizer state over ranks, but "
                         f"the world size is 1; start several ranks (torchrun --nproc_per_node=N) or use "
                         f"parallel.zero_stage=0")
    ulysses = cfg.ulysses_degree if cfg.cp_impl == "hybrid" else 1  # check_config checked 1 < u < cp, u | cp
    return ParallelDims(dp=dp, cp=cp, world_size=world_size, ulysses=ulysses)


def init_distributed(device: str = "auto", parallel: Optional[ParallelConfig] = None) -> DistEnv:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK), or run as one process.

    gloo on CPU, NCCL on CUDA. parallel (default: ParallelConfig(), data parallel over every rank) is checked
    by resolve_parallel first; with cp > 1 the dp x cp mesh (parallel.init_mesh) gives this rank its cp group,
    and with parallel.cp_impl=hybrid its Ulysses and ring groups.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if parallel is not None and not isinstance(parallel, ParallelConfig):
        raise ValueError(f"init_distributed: parallel must be a ParallelConfig (cfg.parallel), got {parallel!r}")
    dims = resolve_parallel(parallel if parallel is not None else ParallelConfig(), world)
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    groups = (None, None, None)
    if dims.cp > 1:
        mesh = init_mesh(cp=dims.cp, dp=dims.dp, ulysses_degree=dims.ulysses)
        groups = (mesh.cp_group, mesh.cp_ulysses_group, mesh.cp_ring_group)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, dp_rank=rank // dims.cp,
                   dp_size=dims.dp, cp_rank=rank % dims.cp, cp_size=dims.cp, cp_group=groups[0],
                   ulysses_degree=dims.ulysses, cp_ulysses_group=groups[1], cp_ring_group=groups[2])


def destroy_distributed() -> None:
    destroy_process_groups()


def validate_parallel(cfg, env: DistEnv) -> None:
    """cfg (cfg.parallel) checked by resolve_parallel against env's world size, and env's process groups
    built for it (an env from init_distributed without this config runs dp over every rank)."""
    dims = resolve_parallel(cfg, env.world_size)
    want, built = (dims.dp, dims.cp, dims.ulysses), (env.dp_size, env.cp_size, env.ulysses_degree)
    if want != built:
        raise ValueError(f"parallel.* asks for dp={want[0]} cp={want[1]} ulysses_degree={want[2]}, but the process "
                         f"groups were built for dp={built[0]} cp={built[1]} ulysses_degree={built[2]}: pass "
                         f"cfg.parallel to trainer.parallelize.init_distributed")


# -- 1. context parallelism ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPGroups:
    """The process groups a CP core talks over: `cp` for ring / Ulysses; `ulysses` x `ring` for hybrid."""
    cp: Any
    ulysses: Any = None
    ring: Any = None


class CurrentPlan:
    """The packed-document plan of the model forward in progress, shared by every layer's CP core.

    A forward pre-hook on the GPT reads this rank's position ids (GPT.forward receives them for RoPE) and
    builds the ring / Ulysses / hybrid plan once: one all-gather of int positions (hybrid: two, one per
    group) and one host sync per forward, not per layer. The cores' signature carries no positions, so they
    read the plan here. A backward (and its activation-checkpoint recompute, which reruns the cores but not
    the GPT hook) always runs before the next forward in the trainer, so the stored plan is the right one
    then and is not rebuilt.
    """

    def __init__(self, impl: str, groups: CPGroups, window_size: tuple = (-1, -1)):
        self.impl, self.groups, self.window_size = impl, groups, window_size
        self.plan = None  # RingPlan | UlyssesPlan | HybridPlan, or None before the first forward / without ids

    def capture(self, module, args, kwargs) -> None:
        pos = kwargs["position_ids"] if "position_ids" in kwargs else (args[1] if len(args) > 1 else None)
        g = self.groups
        if pos is None:
            self.plan = None
        elif self.impl == "ring":
            self.plan = ring_plan(pos, g.cp, CP_LAYOUT, causal=True, window_size=self.window_size)
        elif self.impl == "hybrid":
            self.plan = hybrid_plan(pos, g.ulysses, g.ring, causal=True, window_size=self.window_size)
        else:
            self.plan = ulysses_plan(pos, g.cp, CP_LAYOUT)


class ContextParallelAttention(nn.Module):
    """Replaces InnerAttention: q (B, N_local, H, D), k/v (B, N_local, Hkv, D) shards -> out (B, N_local, H, D).

    Causal attention over the whole sequence split across the cp group (ring, Ulysses, or hybrid: Ulysses
    all-to-all inside, ring outside). With packed documents the forward's plan (CurrentPlan, built from the
    shard's position ids) keeps attention inside documents; the batch's global cu_seqlens do not describe a
    shard and must not be passed. Under model.ckpt=selective the ring keeps its (out, lse) and the block
    recomputation replays them (RingAttnFunc saves q, k, v, out, lse like the local attention Function), so
    backward runs no second forward ring; hybrid replays its ring the same way (the recomputation reruns only
    its all-to-alls); Ulysses is recomputed. window_size: the swapped core's, (left, 0) for a sliding window.
    """

    def __init__(self, impl: str, groups: CPGroups, current: Optional[CurrentPlan], backend: str = "auto",
                 window_size: tuple = (-1, -1)):
        super().__init__()
        assert impl in CP_IMPLS, impl
        assert impl != "hybrid" or (groups.ulysses is not None and groups.ring is not None), "hybrid needs groups"
        self.impl, self.groups, self.current, self.backend = impl, groups, current, backend
        self.window_size = window_size

    @torch.compiler.disable  # process-group calls and a data-dependent plan: always eager
    def forward(self, q, k, v, cu_seqlens=None, max_seqlen=None):
        assert cu_seqlens is None, "under context parallelism document boundaries come from the position ids"
        plan = None
        if self.current is not None:
            plan = self.current.plan
            assert plan is not None, "the model forward must receive position_ids"
        if self.impl == "ulysses":
            return ulysses_attn_func(q, k, v, group=self.groups.cp, causal=True, layout=CP_LAYOUT, plan=plan,
                                     backend=self.backend, window_size=self.window_size)
        if self.impl == "ring":
            return self._ring(q, k, v, self.groups.cp, plan)
        # hybrid: the hybrid_attn_func steps, with the ring in the middle taking part in ckpt=selective
        qh, kh, vh = hybrid_to_heads(q, k, v, self.groups.ulysses)  # (B, N_local * u, H / u, D)
        out = self._ring(qh, kh, vh, self.groups.ring, None if plan is None else plan.ring)
        return hybrid_to_sequence(out, self.groups.ulysses)

    def _ring(self, q, k, v, group, plan):
        mode = attention_keep_mode()
        if mode == "replay":
            return replay_attention(q, k, v)
        out, lse = ring_attn_func(q, k, v, group=group, causal=True, layout=CP_LAYOUT, return_lse=True,
                                  plan=plan, backend=self.backend, window_size=self.window_size)
        if mode == "record":
            keep_attention(out, lse)
        return out


def apply_context_parallel(model: nn.Module, impl: str, group, packed_documents: bool, ulysses_group=None,
                           ring_group=None) -> None:
    """Swap every block.attention.inner_attention of `model` (a GPT) for a ContextParallelAttention.

    group: the cp group; impl="hybrid" also needs the cp group's split into ulysses_group x ring_group
    (parallel.init_mesh(cp, ulysses_degree=u) builds them). Each new core takes the backend and window_size of
    the core it replaces; the window is one for all layers, since every layer shares one plan.
    """
    cores = [block.attention.inner_attention for block in model.layers]
    windows = {tuple(getattr(core, "window_size", (-1, -1))) for core in cores}
    if len(windows) > 1:
        raise ValueError(f"context parallelism runs one attention window in every layer; the model has {windows}")
    window_size = windows.pop()
    groups = CPGroups(group, ulysses_group, ring_group)
    current = None
    if packed_documents:
        current = CurrentPlan(impl, groups, window_size)
        model.register_forward_pre_hook(current.capture, with_kwargs=True)
    for block, core in zip(model.layers, cores):
        backend = getattr(core, "backend", "auto")
        block.attention.inner_attention = ContextParallelAttention(impl, groups, current, backend, window_size)


def shard_batch(batch: dict, group, layout: str = CP_LAYOUT, ulysses_degree: int = 1) -> dict:
    """This cp rank's part of a batch: tokens, labels, position_ids (B, N) -> (B, N / cp), same layout.

    ulysses_degree u > 1 (hybrid CP): the hybrid layout instead (zigzag over cp / u ring ranks, each ring
    shard split contiguously over u; parallel.hybrid_shard_for_rank). Labels are next-token targets already,
    so the shift happened before sharding. num_valid becomes the shard's own count (summed over dp x cp it
    counts every target once); cu_seqlens / max_seqlen describe the unsharded rows and are dropped.
    """
    if ulysses_degree > 1:
        cp_rank, cp_size = group_rank_and_size(group)
        out = {k: hybrid_shard_for_rank(batch[k], 1, cp_rank, ulysses_degree, cp_size)
               for k in ("tokens", "labels", "position_ids")}
    else:
        out = {k: shard_sequence(batch[k], 1, group, layout) for k in ("tokens", "labels", "position_ids")}
    out.update(cu_seqlens=None, max_seqlen=None, num_valid=int((out["labels"] != IGNORE_INDEX).sum()))
    return out


# -- 4. data parallelism -------------------------------------------------------------------------------------


def run_zero_config(cfg, env: DistEnv, bf16: bool) -> dict:
    """The DeepSpeed config of this run's ZeRO engine (also the one a ZeRO-3 model is built under)."""
    return zero_config(cfg.parallel.zero_stage, cfg.data.batch_size, cfg.train.grad_accum, env.dp_size,
                       cfg.optim.grad_clip, bf16, env.device, cp=env.cp_size)


def apply_zero(module: nn.Module, optimizer: torch.optim.Optimizer, lr_factor: Callable[[int], float], cfg,
               env: DistEnv, bf16: bool) -> Parallelized:
    """A DeepSpeed ZeRO engine over all ranks, driving our AdamW and LambdaLR(lr_factor)."""
    config = run_zero_config(cfg, env, bf16)
    # The chunked loss reads the lm head weight outside the head's forward; ZeRO-3 gathers it on that read.
    engine, grad_scale = init_zero_engine(module, optimizer,
                                          lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor), config)
    return Parallelized(engine, grad_scale, engine)


def parallelize(module: nn.Module, cfg, env: DistEnv, optimizer: torch.optim.Optimizer,
                lr_factor: Callable[[int], float], bf16: bool = False) -> Parallelized:
    """Apply the configured parallelism (see the module docstring for the order). cfg: the whole Config;
    module: the trainer's loss module (`.model` is the GPT). bf16: DeepSpeed's bf16 mode for ZeRO.
    env: from init_distributed, checked against cfg.parallel by validate_parallel (the Trainer does at start)."""
    if env.cp_size > 1:
        apply_context_parallel(module.model, cfg.parallel.cp_impl, env.cp_group,
                               packed_documents=not cfg.data.cross_doc_attention, ulysses_group=env.cp_ulysses_group,
                               ring_group=env.cp_ring_group)
    if cfg.parallel.zero_stage > 0:
        return apply_zero(module, optimizer, lr_factor, cfg, env, bf16)
    wrapped, grad_scale = wrap_ddp(module, env.device)
    return Parallelized(wrapped, grad_scale)
