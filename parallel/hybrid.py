"""Hybrid context parallelism (USP): Ulysses all-to-all inside, ring attention outside.

    mesh = init_mesh(cp=8, ulysses_degree=2)                     # cp = u x r = 2 x 4
    q_local = hybrid_shard_for_rank(q, 1, mesh.cp_rank, 2, 8)    # same for k, v, labels, positions
    out_local = hybrid_attn_func(q_local, k_local, v_local, mesh.cp_ulysses_group, mesh.cp_ring_group)

Ulysses alone is capped by the head count (cp <= H, GQA kv heads replicated beyond Hkv) and the ring pays
for every K/V rotation; the hybrid splits cp = u x r. Layout: the full sequence is zigzag-sharded over the r
ring ranks, and each ring shard is split contiguously over the u ranks of a Ulysses group, so cp rank
c = o*u + i holds piece i of ring shard o (sharding.hybrid_shard_for_rank). Per call:
  1. all-to-all over the Ulysses group (layout "contiguous"): (B, N/cp, H, D) -> (B, N/r, H/u, D), i.e. this
     ring rank's zigzag shard for H/u heads (ulysses.py's Functions; K/V heads replicated if Hkv % u != 0);
  2. ring_attn_func over the ring group, layout "zigzag", on those heads;
  3. all-to-all back: (B, N/r, H/u, D) -> (B, N/cp, H, D).
Autograd composes: the all-to-alls are each other's adjoint, the ring has its own backward.
Packed documents: the ring's plan needs the ring shard's positions (an all-gather over the Ulysses group),
then ring_plan over the ring group; build it once per batch and pass it to every layer:

    plan = hybrid_plan(position_ids_local, ulysses_group, ring_group)                          # once per batch
    out_local = hybrid_attn_func(q_local, k_local, v_local, ulysses_group, ring_group, plan=plan)  # every layer
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from attention.backends import check_attn_inputs, softmax_scale_of
from attention.validation import check_options

from .ring import ring_attn_unchecked
from .ring_plan import NO_WINDOW, RingPlan, causal_window, check_local_positions, ring_plan
from .sharding import group_rank_and_size, unshard_sequence
from .ulysses import _HeadsToSeq, _replicate_kv, _SeqToHeads

_INNER_LAYOUT = "contiguous"  # how a ring shard is split over its Ulysses group
_RING_LAYOUT = "zigzag"  # how the sequence is split over the ring


@dataclass(frozen=True)
class HybridPlan:
    """Packed-document plan for hybrid_attn_func(..., plan=...); see hybrid_plan."""
    ulysses_degree: int
    n_local: int  # tokens per cp rank; the ring sees n_local * ulysses_degree
    batch_size: int
    ring: RingPlan  # the ring's plan over the ring shard (B, n_local * u)


def _check_groups(fn: str, ulysses_group, ring_group) -> tuple[int, int]:
    """(u, r); ValueError when the two groups cannot be the inner / outer split of one cp group."""
    _, u = group_rank_and_size(ulysses_group)
    _, r = group_rank_and_size(ring_group)
    if u > 1 and r > 1:
        inner = dist.get_process_group_ranks(ulysses_group)
        outer = dist.get_process_group_ranks(ring_group)
        if set(inner) & set(outer) != {dist.get_rank()}:
            raise ValueError(f"{fn}: ulysses_group {inner} and ring_group {outer} must share exactly this rank "
                             f"({dist.get_rank()}); build them with init_mesh(cp=..., ulysses_degree=...)")
    return u, r


def hybrid_plan(position_ids: torch.Tensor, ulysses_group=None, ring_group=None, causal: bool = True,
                window_size: tuple = NO_WINDOW) -> HybridPlan:
    """The packed-document plan for hybrid_attn_func: build once per batch, reuse in every layer.

    position_ids (N_local,) or (B, N_local): this rank's hybrid shard of the packed positions (0 starts a
    document). Collective over both groups (every rank calls it): an all-gather over the Ulysses group gives
    the ring shard's positions, then ring_plan over the ring group (one more all-gather and a host sync).
    window_size: the one hybrid_attn_func gets, (left, 0) for a causal sliding window.
    """
    u, _ = _check_groups("hybrid_plan", ulysses_group, ring_group)
    check_options("hybrid_plan", None, window_size)
    window_size = causal_window(bool(causal), window_size)  # before any collective: fails on every rank
    local_pos = check_local_positions("hybrid_plan", position_ids, _INNER_LAYOUT, u)  # (B, N_local)
    ring_pos = unshard_sequence(local_pos, 1, ulysses_group, _INNER_LAYOUT)  # (B, N_local * u), true order
    ring = ring_plan(ring_pos, ring_group, _RING_LAYOUT, causal, window_size)
    return HybridPlan(u, local_pos.shape[1], local_pos.shape[0], ring)


def _check_hybrid_inputs(fn, q, k, u, position_ids, plan):
    """What the hybrid needs beyond attention's own checks; covers the ring's checks of its ring shard too."""
    B, n, H = q.shape[:3]
    if k.shape[1] != n:
        raise ValueError(f"{fn}: q and k must hold the same local tokens; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if H % u != 0:
        raise ValueError(f"{fn}: q heads ({H}) must be divisible by the Ulysses group size ({u}); q {tuple(q.shape)}")
    if (n * u) % 2 != 0:
        raise ValueError(f"{fn}: the ring shard N_local * u = {n} * {u} must be even (zigzag: two chunks per ring "
                         f"rank); q {tuple(q.shape)}")
    if position_ids is not None and plan is not None:
        raise ValueError(f"{fn}: pass position_ids or plan, not both (the plan already holds the documents)")
    if position_ids is not None and position_ids.shape not in ((n,), (1, n), (B, n)):
        raise ValueError(f"{fn}: position_ids must be (N_local,), (1, N_local) or (B, N_local) = ({B}, {n}); "
                         f"got {tuple(position_ids.shape)}")
    if plan is not None:
        if not isinstance(plan, HybridPlan):
            raise ValueError(f"{fn}: plan must be a HybridPlan (from hybrid_plan), got {type(plan).__name__}")
        if (plan.ulysses_degree, plan.batch_size, plan.n_local) != (u, B, n):
            raise ValueError(f"{fn}: plan was built for other shards: plan (ulysses degree {plan.ulysses_degree}, "
                             f"batch {plan.batch_size}, N_local {plan.n_local}); call (ulysses degree {u}, "
                             f"q {tuple(q.shape)})")


def hybrid_to_heads(q, k, v, ulysses_group):
    """Step 1: this rank's pieces (B, N_local, H|Hkv, D) -> its ring shard (B, N_local*u, H/u | Hkv'/u, D).

    Differentiable. K/V heads are replicated first when Hkv % u != 0 (q head h keeps its kv head h // G).
    """
    _, u = group_rank_and_size(ulysses_group)
    if u == 1:
        return q, k, v
    k, v = _replicate_kv(k, q.shape[2], u), _replicate_kv(v, q.shape[2], u)
    return tuple(_SeqToHeads.apply(t, ulysses_group, _INNER_LAYOUT) for t in (q, k, v))


def hybrid_to_sequence(x, ulysses_group):
    """Step 3: (B, N_local*u, H/u, D) ring shard for my heads -> (B, N_local, H, D) my piece for every head."""
    _, u = group_rank_and_size(ulysses_group)
    return x if u == 1 else _HeadsToSeq.apply(x, ulysses_group, _INNER_LAYOUT)


def hybrid_attn_func(q, k, v, ulysses_group=None, ring_group=None, causal=True, softmax_scale=None,
                     return_lse=False, position_ids=None, backend="auto", overlap=True, plan=None,
                     window_size=(-1, -1)):
    """Attention over a sequence split over u x r ranks: Ulysses all-to-all inside, ring attention outside.

    q (B, N_local, H, D), k/v (B, N_local, Hkv, D): this rank's hybrid shards (hybrid_shard_for_rank).
    Returns out (B, N_local, H, D) [and lse (B, H, N_local) fp32], equal to flash_attn_func on the full
    sequence, sharded the same way. position_ids: this rank's shard of packed-document positions (0 starts a
    document); or plan=hybrid_plan(position_ids, ulysses_group, ring_group, causal), built once per batch.
    overlap: as in ring_attn_func. window_size=(left, 0): a causal sliding window; the ring runs it over the
    whole sequence (hybrid_plan then needs the same window_size). Inputs are checked here, once: the ring in
    the middle runs unchecked.
    """
    fn = "hybrid_attn_func"
    u, _ = _check_groups(fn, ulysses_group, ring_group)
    impl = check_attn_inputs(fn, q, k, v, softmax_scale, window_size, backend)
    _check_hybrid_inputs(fn, q, k, u, position_ids, plan)
    window_size = causal_window(bool(causal), window_size)  # before any collective: a bad window fails everywhere
    if position_ids is not None:
        local_pos = position_ids.reshape(-1, q.shape[1]).expand(q.shape[0], -1)  # (B, N_local)
        plan = hybrid_plan(local_pos, ulysses_group, ring_group, causal, window_size)
    qh, kh, vh = hybrid_to_heads(q, k, v, ulysses_group)  # (B, N_local*u, H/u, D)
    out, lse = ring_attn_unchecked(fn, qh, kh, vh, ring_group, bool(causal), softmax_scale_of(q, softmax_scale),
                                   _RING_LAYOUT, None, None if plan is None else plan.ring, impl, overlap,
                                   window_size)
    out = hybrid_to_sequence(out, ulysses_group)
    if not return_lse:
        return out
    # lse (B, H/u, N_ring) moves like a head-dim-1 tensor: (B, N_ring, H/u, 1) -> (B, N_local, H, 1).
    lse = hybrid_to_sequence(lse.transpose(1, 2).unsqueeze(-1), ulysses_group)
    return out, lse.squeeze(-1).transpose(1, 2)
