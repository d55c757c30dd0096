"""Ring attention: K/V blocks rotate around the cp group while each rank keeps its own queries.

    q_local = shard_sequence(q, dim=1, group=cp_group)            # same for k, v (and position_ids)
    out_local = ring_attn_func(q_local, k_local, v_local, group=cp_group, causal=True)

q/k/v are this rank's shards (B, N_local, H|Hkv, D) in `layout` ("zigzag" or "contiguous", see
sharding.py). Forward: W steps; each starts the transfer of the next K/V (Hkv heads, batched isend/irecv),
computes the current block with the attention launcher and merges it by log-sum-exp into a running fp32
(out, lse) (in place; the same math as `attention.merge_attn_outputs`). Backward: a second ring rotates K/V
together with their fp32 dK/dV accumulators, calling the backward launcher with the final merged out/lse.
ring_attn_func checks its inputs once; the blocks then launch unchecked (attention.backends.launch_*). With causal attention only the visible chunk pairs are computed (zigzag: every step but the
diagonal one costs exactly half a block; contiguous: later ranks' blocks are skipped, so work is unbalanced).
Packed documents (`position_ids`, 0 = document start) turn each block into a varlen call whose segments are
the documents shared by the block's queries and keys; blocks sharing no document are skipped.
A causal sliding window (`window_size=(left, 0)`) splits the blocks per chunk pair and cuts each to the rows
that see one another, with the window re-expressed for that rectangle (window_rect); pairs the window does not
reach are skipped, so a rank's work per step shrinks to about chunk x window.

The plan (ring_plan.py) lists the blocks of every step. Building it needs the whole sequence's positions: an
all-gather and a host sync. A model calls the ring once per layer on the same positions, so it builds the plan
once per batch and passes it to every layer:

    plan = ring_plan(position_ids_local, group=cp_group, layout="zigzag", causal=True)   # once per batch
    out_local = ring_attn_func(q_local, k_local, v_local, group=cp_group, plan=plan)     # every layer
"""

from __future__ import annotations

from typing import Optional

import torch

from attention.backends import (Backend, check_attn_inputs, check_backward_supported, launch_backward,
                                launch_forward, launch_varlen_backward, launch_varlen_forward, softmax_scale_of)

from .comm import RingComm
from .ring_plan import NO_WINDOW, Block, RingPlan, causal_window, dense_plan, ring_plan
from .sharding import check_layout, group_rank_and_size

# -- one block ----------------------------------------------------------------------------------------------


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[2:])  # (B, n, h, D) -> (B*n, h, D)


def _block_forward(q, k, v, blk: Block, scale: float, impl: Backend):
    qb = q[blk.batch, blk.q_rows].contiguous()
    kb, vb = k[blk.batch, blk.k_rows].contiguous(), v[blk.batch, blk.k_rows].contiguous()
    if blk.varlen is None:
        return launch_forward(impl, qb, kb, vb, blk.causal, scale, blk.window_size)
    B, nq, H, _ = qb.shape
    out, lse = launch_varlen_forward(impl, _flat(qb), _flat(kb), _flat(vb), *blk.varlen, blk.causal, scale,
                                     blk.window_size)
    return out.view(qb.shape), lse.view(H, B, nq).transpose(0, 1)  # lse (H, B*nq) -> (B, H, nq)


def _block_backward(dout, q, k, v, out, lse, dlse, blk: Block, scale: float, impl: Backend):
    b, r, c = blk.batch, blk.q_rows, blk.k_rows
    dob, qb, ob = dout[b, r].contiguous(), q[b, r].contiguous(), out[b, r].contiguous()
    kb, vb = k[b, c].contiguous(), v[b, c].contiguous()
    lb = lse[b, :, r].contiguous()
    dlb = None if dlse is None else dlse[b, :, r].contiguous()
    if blk.varlen is None:
        return launch_backward(impl, dob, qb, kb, vb, ob, lb, blk.causal, scale, blk.window_size, dlse=dlb)

    def heads_first(t):  # (B, H, nq) -> (H, B*nq), the varlen lse layout
        return None if t is None else t.transpose(0, 1).reshape(t.shape[1], -1)

    dq, dk, dv = launch_varlen_backward(impl, _flat(dob), _flat(qb), _flat(kb), _flat(vb), _flat(ob),
                                        heads_first(lb), *blk.varlen, blk.causal, scale, blk.window_size,
                                        dlse=heads_first(dlb))
    return dq.view(qb.shape), dk.view(kb.shape), dv.view(vb.shape)


# -- the two rings ------------------------------------------------------------------------------------------


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """In place: (out, lse) <- merge_attn_outputs([(out, lse), (block_out, block_lse)]), out kept in fp32.

    Same math as attention.merge_attn_outputs (tests check one against the other), but without its stacked
    copies: at 128K local tokens x 32 heads x 128 the fp32 accumulator alone is 2 GB. out (B, n, H, D) fp32,
    lse (B, H, n) fp32; rows where both sides are -inf stay out = 0, lse = -inf.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    shift = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)  # -inf only if both are
    w_old = torch.exp(lse - shift).transpose(1, 2).unsqueeze(-1)  # (B, n, H, 1)
    w_new = torch.exp(block_lse - shift).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).addcmul_(block_out, w_new)
    lse.copy_(new_lse)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def ring_attn_forward(comm: Optional[RingComm], q, k, v, plan: list, scale: float, impl: Backend,
                      overlap: bool = True):
    """Returns out (B, N_local, H, D) in q.dtype and lse (B, H, N_local) fp32 over the whole sequence."""
    B, n, H, D = q.shape
    out = torch.zeros(B, n, H, D, dtype=_acc_dtype(q), device=q.device)
    lse = torch.full((B, H, n), float("-inf"), dtype=torch.float32, device=q.device)
    last = len(plan) - 1
    for step, blocks in enumerate(plan):
        if step < last:  # start moving the next K/V now, so it travels while this block computes
            next_k, next_v = comm.send_recv(k), comm.send_recv(v)
            comm.commit()
            if not overlap:
                comm.wait()
        for blk in blocks:
            block_out, block_lse = _block_forward(q, k, v, blk, scale, impl)
            merge_into(out[blk.batch, blk.q_rows], lse[blk.batch, :, blk.q_rows], block_out, block_lse)
        if step < last:
            if overlap:
                comm.wait()
            k, v = next_k, next_v
    return out.to(q.dtype), lse


def ring_attn_backward(kv_comm: Optional[RingComm], d_kv_comm: Optional[RingComm], dout, dlse, q, k, v, out,
                       lse, plan: list, scale: float, impl: Backend, overlap: bool = True):
    """dq, dk, dv for the local shards. dK/dV accumulators travel with their K/V block and end at home."""
    acc = _acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    last = len(plan) - 1
    for step, blocks in enumerate(plan):
        if step < last:
            next_k, next_v = kv_comm.send_recv(k), kv_comm.send_recv(v)
            kv_comm.commit()
            if not overlap:
                kv_comm.wait()
        # Step 1: this rank's queries' contribution to the K/V block it holds now.
        block_dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        block_dv = torch.zeros_like(block_dk)
        for blk in blocks:
            dq_b, dk_b, dv_b = _block_backward(dout, q, k, v, out, lse, dlse, blk, scale, impl)
            dq[blk.batch, blk.q_rows] += dq_b
            block_dk[blk.batch, blk.k_rows] += dk_b
            block_dv[blk.batch, blk.k_rows] += dv_b
        # Step 2: add what the previous ranks accumulated for this block, pass the sum on.
        if step > 0:
            if overlap:
                d_kv_comm.wait()
            block_dk += next_dk
            block_dv += next_dv
        if last > 0:
            next_dk, next_dv = d_kv_comm.send_recv(block_dk), d_kv_comm.send_recv(block_dv)
            d_kv_comm.commit()
            if not overlap:
                d_kv_comm.wait()
        if step < last:
            if overlap:
                kv_comm.wait()
            k, v = next_k, next_v
    if last == 0:
        dk, dv = block_dk, block_dv
    else:  # Step 3: the final send brought this rank's own, complete dK/dV home.
        if overlap:
            d_kv_comm.wait()
        dk, dv = next_dk, next_dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttnFunc(torch.autograd.Function):
    """Inputs checked by the caller (ring_attn_unchecked's callers); impl: the Backend they returned."""

    @staticmethod
    def forward(ctx, q, k, v, group, plan, scale, impl, overlap):
        comm = RingComm(group) if len(plan) > 1 else None
        out, lse = ring_attn_forward(comm, q, k, v, plan, scale, impl, overlap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, plan, scale, impl, overlap)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, plan, scale, impl, overlap = ctx.args
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        check_backward_supported("ring_attn_func", impl, q, k)  # the same on every rank: fails on all of them
        kv_comm, d_kv_comm = (RingComm(group), RingComm(group)) if len(plan) > 1 else (None, None)
        dq, dk, dv = ring_attn_backward(kv_comm, d_kv_comm, dout, dlse, q, k, v, out, lse, plan, scale, impl,
                                        overlap)
        return dq, dk, dv, None, None, None, None, None


# -- public entry point -------------------------------------------------------------------------------------


def _check_ring_inputs(fn, q, k, layout, position_ids, plan):
    """What the ring needs beyond attention's own checks (check_attn_inputs)."""
    check_layout(layout)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{fn}: q and k must hold the same local tokens (self-attention); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if layout == "zigzag" and q.shape[1] % 2 != 0:
        raise ValueError(f"{fn}: N_local {q.shape[1]} must be even for layout='zigzag' (two chunks per rank); "
                         f"q {tuple(q.shape)}")
    if position_ids is not None and plan is not None:
        raise ValueError(f"{fn}: pass position_ids or plan, not both (the plan already holds the documents)")
    if position_ids is not None:
        B, n = q.shape[:2]
        if position_ids.shape not in ((n,), (1, n), (B, n)):
            raise ValueError(f"{fn}: position_ids must be (N_local,), (1, N_local) or (B, N_local) = ({B}, {n}); "
                             f"got {tuple(position_ids.shape)}")


def _check_plan(fn, plan: RingPlan, q, layout: str, causal: bool, rank: int, world_size: int,
                window_size: tuple) -> None:
    if not isinstance(plan, RingPlan):
        raise ValueError(f"{fn}: plan must be a RingPlan (from ring_plan), got {type(plan).__name__}")
    B, n = q.shape[:2]
    seen = (f"plan (rank {plan.rank}/{plan.world_size}, N_local {plan.n_local}, batch {plan.batch_size}, "
            f"layout {plan.layout!r}, causal {plan.causal}, window_size {plan.window_size}); call (rank "
            f"{rank}/{world_size}, q {tuple(q.shape)}, layout {layout!r}, causal {causal}, window_size "
            f"{window_size})")
    if (plan.rank, plan.world_size, plan.n_local) != (rank, world_size, n) or plan.batch_size not in (None, B):
        raise ValueError(f"{fn}: plan was built for other shards: {seen}")
    if (plan.layout, plan.causal, plan.window_size) != (layout, causal, window_size):
        raise ValueError(f"{fn}: plan was built for another layout or mask: {seen}")


def ring_attn_unchecked(fn, q, k, v, group, causal: bool, scale: float, layout: str, position_ids, plan,
                        impl: Backend, overlap: bool, window_size: tuple):
    """The ring once its caller has checked q/k/v (check_attn_inputs) and the ring's own inputs
    (_check_ring_inputs), with window_size from causal_window: builds or checks the plan, runs the ring.
    Returns (out, lse). ring_attn_func and hybrid_attn_func each check once and call this.
    """
    causal = causal or window_size != NO_WINDOW
    rank, world_size = group_rank_and_size(group)
    if position_ids is not None:
        local_pos = position_ids.reshape(-1, q.shape[1]).expand(q.shape[0], -1)  # (B, N_local)
        plan = ring_plan(local_pos, group, layout, causal, window_size)
    elif plan is None:
        plan = dense_plan(rank, world_size, q.shape[1], layout, causal, window_size)
    _check_plan(fn, plan, q, layout, causal, rank, world_size, window_size)
    return RingAttnFunc.apply(q, k, v, group, plan.steps, scale, impl, bool(overlap))


def ring_attn_func(q, k, v, group=None, causal=True, softmax_scale=None, layout="zigzag", return_lse=False,
                   position_ids=None, backend="auto", overlap=True, plan=None, window_size=(-1, -1)):
    """Ring attention over the sequence split across `group` (None = default group; no group = one rank).

    q (B, N_local, H, D), k/v (B, N_local, Hkv, D): this rank's shards in `layout`. Returns out
    (B, N_local, H, D) [and lse (B, H, N_local) fp32], equal to flash_attn_func on the full sequence, sharded.
    position_ids (B|1, N_local): this rank's shard of packed-document positions (0 starts a document);
    attention then stays inside documents. Each such call all-gathers them and syncs with the host; a model
    calling the ring in every layer passes plan=ring_plan(position_ids, group, layout, causal) instead, built
    once per batch (same result). `overlap=False` waits for each transfer before computing (for benchmarking
    the overlap). window_size=(left, 0): a causal sliding window over global positions (a plan must then be
    built with the same window_size).
    """
    fn = "ring_attn_func"
    impl = check_attn_inputs(fn, q, k, v, softmax_scale, window_size, backend)
    _check_ring_inputs(fn, q, k, layout, position_ids, plan)
    window_size = causal_window(bool(causal), window_size)
    out, lse = ring_attn_unchecked(fn, q, k, v, group, bool(causal), softmax_scale_of(q, softmax_scale), layout,
                                   position_ids, plan, impl, overlap, window_size)
    return (out, lse) if return_lse else out
