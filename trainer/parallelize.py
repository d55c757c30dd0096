"""Process-group setup and the one place where parallelism is applied to the model.

    env = init_distributed("auto", cp=2)              # single process, or the ranks torchrun started
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

from parallel import (hybrid_plan, hybrid_shard_for_rank, init_mesh, ring_attn_func, ring_plan, shard_sequence,
                      ulysses_attn_func, ulysses_plan)
from parallel.data_parallel import destroy_process_groups, init_zero_engine, wrap_ddp, zero_config
from parallel.hybrid import hybrid_to_heads, hybrid_to_sequence
from parallel.sharding import group_rank_and_size
from trainer.model.activations import attention_keep_mode, keep_attention, replay_attention
from trainer.model.loss import IGNORE_INDEX
from trainer.model import sliding_window_size

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


def init_distributed(device: str = "auto", cp: int = 1, ulysses_degree: int = 1) -> DistEnv:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK), or run as one process.

    gloo on CPU, NCCL on CUDA. dp_size = world_size // cp; with cp > 1 the dp x cp mesh (parallel.init_mesh)
    gives this rank its cp group, and with 1 < ulysses_degree (hybrid CP) its Ulysses and ring groups.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    check_world_size(cp, -1, world)
    u = ulysses_degree if cp > 1 and ulysses_degree >= 1 and cp % ulysses_degree == 0 else 1  # likewise
    groups = (None, None, None)
    if cp > 1:
        mesh = init_mesh(cp=cp, ulysses_degree=u)
        groups = (mesh.cp_group, mesh.cp_ulysses_group, mesh.cp_ring_group)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, dp_rank=rank // cp,
                   dp_size=world // cp, cp_rank=rank % cp, cp_size=cp, cp_group=groups[0], ulysses_degree=u,
                   cp_ulysses_group=groups[1], cp_ring_group=groups[2])


def destroy_distributed() -> None:
    destroy_process_groups()


def check_world_size(cp: int, dp: int, world: int) -> None:
    """parallel.cp / parallel.dp against the number of processes: the one check, nothing is reset. The message
    says how to launch (torchrun --nproc_per_node=N)."""
    if cp < 1 or (dp < 1 and dp != -1):
        raise ValueError(f"need parallel.cp >= 1 and parallel.dp >= 1 (or -1: world size / cp), got cp={cp}, dp={dp}")
    need = cp * (1 if dp == -1 else dp)
    what = f"parallel.cp={cp}" if dp in (-1, 1) else (f"parallel.dp={dp}" if cp == 1 else
                                                       f"parallel.dp={dp} x parallel.cp={cp}")
    if world == 1 and need > 1:
        raise ValueError(f"{what} needs {need} processes, but the world size is 1 (started without torchrun): "
                         f"launch with torchrun --nproc_per_node={need} -m trainer.train ...")
    if dp == -1 and world % cp:
        raise ValueError(f"parallel.cp={cp} must divide the world size ({world} processes from torchrun): start a "
                         f"multiple of {cp} processes (--nproc_per_node) or choose another parallel.cp")
    if dp != -1 and need != world:
        raise ValueError(f"{what} needs {need} processes, but the world size is {world}: launch with torchrun "
                         f"--nproc_per_node={need}, or set parallel.dp=-1 (world size / parallel.cp)")


def validate_parallel(cfg, env) -> None:
    """Check the parallel config (cfg.parallel) against the world size: `env` is the DistEnv, or the world size
    (int) before the process group exists, as trainer/train.py checks it."""
    world = env if isinstance(env, int) else env.world_size
    if cfg.cp_impl not in CP_IMPLS:
        raise ValueError(f"parallel.cp_impl must be one of {CP_IMPLS}, got {cfg.cp_impl!r}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    check_world_size(cfg.cp, cfg.dp, world)
    built = cfg.ulysses_degree if isinstance(env, int) else env.ulysses_degree  # the groups init_distributed made
    if cfg.cp_impl == "hybrid" and cfg.cp > 1 and built != cfg.ulysses_degree:
        raise ValueError(f"parallel.cp_impl=hybrid with parallel.ulysses_degree={cfg.ulysses_degree}, but the "
                         f"process groups were built for ulysses_degree={built}: pass "
                         f"parallel.ulysses_degree to trainer.parallelize.init_distributed")
    if cfg.zero_stage != 0 and world == 1:
        raise ValueError(f"parallel.zero_stage={cfg.zero_stage} shards weights / optimizer state over ranks, but "
                         f"the world size is 1; start several ranks (torchrun --nproc_per_node=N) or use "
                         f"parallel.zero_stage=0")


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

    def __init__(self, impl: str, groups: CPGroups, window: int = 0):
        self.impl, self.groups, self.window = impl, groups, window
        self.plan = None  # RingPlan | UlyssesPlan | HybridPlan, or None before the first forward / without ids

    def capture(self, module, args, kwargs) -> None:
        pos = kwargs["position_ids"] if "position_ids" in kwargs else (args[1] if len(args) > 1 else None)
        g = self.groups
        if pos is None:
            self.plan = None
        elif self.impl == "ring":
            self.plan = ring_plan(pos, g.cp, CP_LAYOUT, causal=True, window=self.window)
        elif self.impl == "hybrid":
            self.plan = hybrid_plan(pos, g.ulysses, g.ring, causal=True, window=self.window)
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
    its all-to-alls); Ulysses is recomputed. window > 0: model.attn_window, a causal sliding window.
    """

    def __init__(self, impl: str, groups: CPGroups, current: Optional[CurrentPlan], backend: str = "auto",
                 window: int = 0):
        super().__init__()
        assert impl in CP_IMPLS, impl
        assert impl != "hybrid" or (groups.ulysses is not None and groups.ring is not None), "hybrid needs groups"
        self.impl, self.groups, self.current, self.backend = impl, groups, current, backend
        self.window_size = sliding_window_size(window)

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
    (parallel.init_mesh(cp, ulysses_degree=u) builds them).
    """
    window = model.config.attn_window
    groups = CPGroups(group, ulysses_group, ring_group)
    current = None
    if packed_documents:
        current = CurrentPlan(impl, groups, window)
        model.register_forward_pre_hook(current.capture, with_kwargs=True)
    for block in model.layers:
        backend = getattr(block.attention.inner_attention, "backend", "auto")
        block.attention.inner_attention = ContextParallelAttention(impl, groups, current, backend, window)


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


def apply_zero(module: nn.Module, optimizer: torch.optim.Optimizer, lr_factor: Callable[[int], float], cfg,
               env: DistEnv, bf16: bool) -> Parallelized:
    """A DeepSpeed ZeRO engine over all ranks, driving our AdamW and LambdaLR(lr_factor)."""
    config = zero_config(cfg.parallel.zero_stage, cfg.data.batch_size, cfg.train.grad_accum, env.dp_size,
                         cfg.optim.grad_clip, bf16, env.device, cp=env.cp_size)
    # The chunked loss reads the lm head weight outside the head's forward; ZeRO-3 gathers it on that read.
    engine, grad_scale = init_zero_engine(module, optimizer,
                                          lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor), config)
    return Parallelized(engine, grad_scale, engine)


def parallelize(module: nn.Module, cfg, env: DistEnv, optimizer: torch.optim.Optimizer,
                lr_factor: Callable[[int], float], bf16: bool = False) -> Parallelized:
    """Apply the configured parallelism (see the module docstring for the order). cfg: the whole Config;
    module: the trainer's loss module (`.model` is the GPT). bf16: DeepSpeed's bf16 mode for ZeRO."""
    validate_parallel(cfg.parallel, env)
    if env.cp_size > 1:
        apply_context_parallel(module.model, cfg.parallel.cp_impl, env.cp_group,
                               packed_documents=not cfg.data.cross_doc_attention, ulysses_group=env.cp_ulysses_group,
                               ring_group=env.cp_ring_group)
    if cfg.parallel.zero_stage > 0:
        return apply_zero(module, optimizer, lr_factor, cfg, env, bf16)
    wrapped, grad_scale = wrap_ddp(module, env.device)
    return Parallelized(wrapped, grad_scale)
