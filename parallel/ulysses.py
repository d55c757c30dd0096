"""Ulysses (DeepSpeed-style) context parallelism: all-to-all from sequence shards to head shards and back.

    out_local = ulysses_attn_func(q_local, k_local, v_local, group=cp_group, causal=True)
    out_local = ulysses_attn_func(..., window_size=(4095, 0))    # sliding window: every rank holds the whole sequence

q/k/v are this rank's sequence shards (B, N_local, H|Hkv, D) in `layout` (as produced by shard_sequence).
One all-to-all gives every rank the *whole* sequence, in true order, for H/W of the heads; local attention
runs through attention's autograd Functions (inputs checked once, at ulysses_attn_func); a second all-to-all
returns the sequence shards.
H must be divisible by W; K/V heads are replicated when Hkv is not (e.g. Hkv < W), keeping GQA groups intact.
Packed documents: the varlen segments of the full sequence need every rank's positions (an all-gather and a
host sync), so a model builds them once per batch and passes them to every layer:

    plan = ulysses_plan(position_ids_local, group=cp_group, layout="zigzag")            # once per batch
    out_local = ulysses_attn_func(q_local, k_local, v_local, group=cp_group, plan=plan)  # every layer
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attention.backends import Backend, check_attn_inputs, softmax_scale_of
from attention.interface import FlashAttnFunc, FlashAttnVarlenFunc

from .ring_plan import check_local_positions
from .sharding import (check_layout, doc_ids_from_positions, group_rank_and_size, shard_for_rank,
                       unshard_from_shards, unshard_sequence)


def _seq_to_heads(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """(B, N_local, h*W, D) sequence shard -> (B, N, h, D): the full sequence for this rank's heads."""
    _, world_size = group_rank_and_size(group)
    B, n, heads, D = x.shape
    send = x.reshape(B, n, world_size, heads // world_size, D).permute(2, 0, 1, 3, 4).contiguous()  # (W,B,n,h,D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[s]: rank s's sequence shard of my heads
    return unshard_from_shards(list(recv.unbind(0)), 1, layout)


def _heads_to_seq(y: torch.Tensor, group, layout: str) -> torch.Tensor:
    """(B, N, h, D) full sequence for my heads -> (B, N_local, h*W, D): my sequence shard of every head."""
    _, world_size = group_rank_and_size(group)
    send = torch.stack([shard_for_rank(y, 1, r, world_size, layout) for r in range(world_size)])  # (W,B,n,h,D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[s]: my sequence shard of rank s's heads
    W, B, n, h, D = recv.shape
    return recv.permute(1, 2, 0, 3, 4).reshape(B, n, W * h, D)


class _SeqToHeads(torch.autograd.Function):
    """The two all-to-alls are permutations and each other's inverse, hence each other's adjoint."""

    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.group, ctx.layout = group, layout
        return _seq_to_heads(x, group, layout)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group, ctx.layout), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, layout):
        ctx.group, ctx.layout = group, layout
        return _heads_to_seq(y, group, layout)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group, ctx.layout), None, None


def _replicate_kv(k: torch.Tensor, heads: int, world_size: int) -> torch.Tensor:
    """Repeat each kv head so that Hkv' is a multiple of W; q head h still maps to (a copy of) kv head h // G."""
    hkv = k.shape[2]
    rep = world_size // math.gcd(hkv, world_size)
    # H % W == 0 and H % Hkv == 0 imply (H / Hkv) % rep == 0, so the grouping stays valid.
    assert heads % (hkv * rep) == 0
    return k if rep == 1 else k.repeat_interleave(rep, dim=2)  # (B, n, Hkv*rep, D)


@dataclass(frozen=True)
class UlyssesPlan:
    """Packed-document segments of the full sequence, for ulysses_attn_func(..., plan=...); see ulysses_plan."""
    world_size: int
    layout: str
    n_local: int
    batch_size: int
    cu_seqlens: torch.Tensor  # (segments + 1,) int32 over the flattened (B * N) full sequence, true order
    max_seqlen: int


def ulysses_plan(position_ids: torch.Tensor, group=None, layout: str = "zigzag") -> UlyssesPlan:
    """The packed-document plan for ulysses_attn_func: build once per batch, reuse in every layer.

    position_ids (N_local,) or (B, N_local): this rank's shard (in `layout`) of the packed positions (0 starts
    a document); the plan fits q of batch size B (1 for a 1-D input). Collective over `group`: every rank calls
    it. Costs one all-gather of the int positions and one host sync.
    """
    check_layout(layout)
    _, world_size = group_rank_and_size(group)
    local_pos = check_local_positions("ulysses_plan", position_ids, layout, world_size)  # (B, N_local)
    doc_ids = doc_ids_from_positions(unshard_sequence(local_pos, 1, group, layout).cpu())  # (B, N)
    B, N = doc_ids.shape
    starts = torch.ones(B, N, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # batch rows always start a new segment
    bounds = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([B * N])])
    return UlyssesPlan(world_size, layout, local_pos.shape[1], B, bounds.to(position_ids.device, torch.int32),
                       int(bounds.diff().max()))


def _check_ulysses_inputs(fn, q, k, world_size, layout, position_ids, plan):
    """What Ulysses needs beyond attention's own checks (check_attn_inputs)."""
    check_layout(layout)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{fn}: q and k must hold the same local tokens; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[2] % world_size != 0:
        raise ValueError(f"{fn}: q heads ({q.shape[2]}) must be divisible by the cp world size ({world_size}); "
                         f"q {tuple(q.shape)}")
    if layout == "zigzag" and world_size > 1 and q.shape[1] % 2 != 0:
        raise ValueError(f"{fn}: N_local {q.shape[1]} must be even for layout='zigzag'; q {tuple(q.shape)}")
    if position_ids is not None and plan is not None:
        raise ValueError(f"{fn}: pass position_ids or plan, not both (the plan already holds the documents)")
    if position_ids is not None and position_ids.shape not in ((q.shape[1],), (1, q.shape[1]), q.shape[:2]):
        raise ValueError(f"{fn}: position_ids must be (N_local,), (1, N_local) or (B, N_local) = "
                         f"{tuple(q.shape[:2])}; got {tuple(position_ids.shape)}")
    if plan is not None:
        if not isinstance(plan, UlyssesPlan):
            raise ValueError(f"{fn}: plan must be a UlyssesPlan (from ulysses_plan), got {type(plan).__name__}")
        if (plan.world_size, plan.layout, plan.batch_size, plan.n_local) != (world_size, layout, *q.shape[:2]):
            raise ValueError(f"{fn}: plan was built for other shards: plan (world size {plan.world_size}, layout "
                             f"{plan.layout!r}, batch {plan.batch_size}, N_local {plan.n_local}); call (world size "
                             f"{world_size}, layout {layout!r}, q {tuple(q.shape)})")


def _local_attention(q, k, v, plan, causal: bool, scale: float, window_size: tuple, impl: Backend):
    """q (B, N, h, D) full sequence for this rank's heads; with a plan, one varlen call over its segments
    (documents never mix). The inputs were checked at ulysses_attn_func."""
    if plan is None:
        return FlashAttnFunc.apply(q, k, v, causal, scale, window_size, impl, False)[0]
    B, N, h, D = q.shape
    cu, max_len = plan.cu_seqlens, plan.max_seqlen
    out, _ = FlashAttnVarlenFunc.apply(q.reshape(B * N, h, D), k.reshape(B * N, k.shape[2], D),
                                       v.reshape(B * N, v.shape[2], D), cu, cu, max_len, max_len, causal, scale,
                                       window_size, impl)  # (B*N, h, D)
    return out.view(B, N, h, D)


def ulysses_attn_func(q, k, v, group=None, causal=True, softmax_scale=None, layout="zigzag", position_ids=None,
                      backend="auto", plan=None, window_size=(-1, -1)):
    """Attention over the sequence split across `group` by head-scattering all-to-all.

    q (B, N_local, H, D), k/v (B, N_local, Hkv, D): this rank's shards in `layout`; returns out
    (B, N_local, H, D) equal to flash_attn_func on the full sequence, sharded. position_ids: this rank's
    shard of packed-document positions (0 starts a document), as for ring_attn_func; or plan=ulysses_plan(
    position_ids, group, layout), built once per batch for all layers (same result, no per-call gather).
    window_size: as in flash_attn_func, over the full sequence's (or each document's) positions.
    """
    fn = "ulysses_attn_func"
    _, world_size = group_rank_and_size(group)
    impl = check_attn_inputs(fn, q, k, v, softmax_scale, window_size, backend)
    _check_ulysses_inputs(fn, q, k, world_size, layout, position_ids, plan)
    if position_ids is not None:
        local_pos = position_ids.reshape(-1, q.shape[1]).expand(q.shape[0], -1)  # (B, N_local)
        plan = ulysses_plan(local_pos, group, layout)
    if world_size == 1:
        q_full, k_full, v_full = q, k, v
    else:
        k, v = _replicate_kv(k, q.shape[2], world_size), _replicate_kv(v, q.shape[2], world_size)
        q_full, k_full, v_full = (_SeqToHeads.apply(t, group, layout) for t in (q, k, v))  # (B, N, h, D)
    out = _local_attention(q_full, k_full, v_full, plan, bool(causal), softmax_scale_of(q, softmax_scale),
                           tuple(window_size), impl)
    return out if world_size == 1 else _HeadsToSeq.apply(out, group, layout)
