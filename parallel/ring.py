"""Ring attention: K/V blocks rotate around the cp group while each rank keeps its own queries.

    q_local = shard_sequence(q, dim=1, group=cp_group)            # same for k, v (and position_ids)
    out_local = ring_attn_func(q_local, k_local, v_local, group=cp_group, causal=True)

q/k/v are this rank's shards (B, N_local, H|Hkv, D) in `layout` ("zigzag" or "contiguous", see
sharding.py). Forward: W steps; each starts the transfer of the next K/V (Hkv heads, batched isend/irecv),
computes the current block with `attention.attn_forward` and merges it by log-sum-exp into a running fp32
(out, lse) (in place; the same math as `attention.merge_attn_outputs`). Backward: a second ring rotates K/V
together with their fp32 dK/dV accumulators, calling `attention.attn_backward` with the final merged
out/lse. With causal attention only the visible chunk pairs are computed (zigzag: every step but the
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

from attention import attn_backward, attn_forward, attn_varlen_backward, attn_varlen_forward
from attention.backends import resolve_backend_name
from attention.validation import check_options, check_qkv

from .comm import RingComm
from .ring_plan import NO_WINDOW, Block, RingPlan, dense_plan, ring_plan
from .sharding import check_layout, group_rank_and_size

# -- one block ----------------------------------------------------------------------------------------------


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[2:])  # (B, n, h, D) -> (B*n, h, D)


def _block_forward(q, k, v, blk: Block, scale: float, backend: str):
    qb = q[blk.batch, blk.q_rows].contiguous()
    kb, vb = k[blk.batch, blk.k_rows].contiguous(), v[blk.batch, blk.k_rows].contiguous()
    if blk.varlen is None:
        return attn_forward(qb, kb, vb, blk.causal, scale, blk.window, backend)
    B, nq, H, _ = qb.shape
    out, lse = attn_varlen_forward(_flat(qb), _flat(kb), _flat(vb), *blk.varlen, blk.causal, scale, blk.window,
                                   backend)
    return out.view(qb.shape), lse.view(H, B, nq).transpose(0, 1)  # lse (H, B*nq) -> (B, H, nq)


def _block_backward(dout, q, k, v, out, lse, dlse, blk: Block, scale: float, backend: str):
    b, r, c = blk.batch, blk.q_rows, blk.k_rows
    dob, qb, ob = dout[b, r].contiguous(), q[b, r].contiguous(), out[b, r].contiguous()
    kb, vb = k[b, c].contiguous(), v[b, c].contiguous()
    lb = lse[b, :, r].contiguous()
    dlb = None if dlse is None else dlse[b, :, r].contiguous()
    if blk.varlen is None:
        return attn_backward(dob, qb, kb, vb, ob, lb, blk.causal, scale, blk.window, dlse=dlb, backend=backend)

    def heads_first(t):  # (B, H, nq) -> (H, B*nq), the varlen lse layout
        return None if t is None else t.transpose(0, 1).reshape(t.shape[1], -1)

    dq, dk, dv = attn_varlen_backward(_flat(dob), _flat(qb), _flat(kb), _flat(vb), _flat(ob), heads_first(lb),
                                      *blk.varlen, blk.causal, scale, blk.window, dlse=heads_first(dlb),
                                      backend=backend)
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


def ring_attn_forward(comm: Optional[RingComm], q, k, v, plan: list, scale: float, backend: str,
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
            block_out, block_lse = _block_forward(q, k, v, blk, scale, backend)
            merge_into(out[blk.batch, blk.q_rows], lse[blk.batch, :, blk.q_rows], block_out, block_lse)
        if step < last:
            if overlap:
                comm.wait()
            k, v = next_k, next_v
    return out.to(q.dtype), lse


def ring_attn_backward(kv_comm: Optional[RingComm], d_kv_comm: Optional[RingComm], dout, dlse, q, k, v, out,
                       lse, plan: list, scale: float, backend: str, overlap: bool = True):
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
            dq_b, dk_b, dv_b = _block_backward(dout, q, k, v, out, lse, dlse, blk, scale, backend)
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
    @staticmethod
    def forward(ctx, q, k, v, group, plan, scale, backend, overlap):
        comm = RingComm(group) if len(plan) > 1 else None
        out, lse = ring_attn_forward(comm, q, k, v, plan, scale, backend, overlap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, plan, scale, backend, overlap)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, plan, scale, backend, overlap = ctx.args
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        kv_comm, d_kv_comm = (RingComm(group), RingComm(group)) if len(plan) > 1 else (None, None)
        dq, dk, dv = ring_attn_backward(kv_comm, d_kv_comm, dout, dlse, q, k, v, out, lse, plan, scale, backend,
                                        overlap)
        return dq, dk, dv, None, None, None, None, None


# -- public entry point -------------------------------------------------------------------------------------


def causal_window_length(causal: bool, window_size) -> int:
    """window_size -> the causal sliding window's length in keys (0: none); the ring takes (left, 0) windows."""
    left, right = window_size
    if (left, right) == NO_WINDOW or (causal and (left, right) == (-1, 0)):
        return 0
    if left < 0 or not (right == 0 or (right == -1 and causal)):
        raise ValueError(f"ring / hybrid attention: window_size must be a causal sliding window (left >= 0, 0) or "
                         f"(-1, -1); got {tuple(window_size)} with causal={causal}")
    return left + 1


def _check_ring_inputs(q, k, v, layout, softmax_scale, position_ids, plan, window_size):
    fn = "ring_attn_func"
    check_qkv(q, k, v, fn)
    check_options(fn, softmax_scale, window_size)
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


def _check_plan(plan: RingPlan, q, layout: str, causal: bool, rank: int, world_size: int, window: int) -> None:
    fn = "ring_attn_func"
    if not isinstance(plan, RingPlan):
        raise ValueError(f"{fn}: plan must be a RingPlan (from ring_plan), got {type(plan).__name__}")
    B, n = q.shape[:2]
    seen = (f"plan (rank {plan.rank}/{plan.world_size}, N_local {plan.n_local}, batch {plan.batch_size}, "
            f"layout {plan.layout!r}, causal {plan.causal}, window {plan.window}); call (rank {rank}/{world_size}, "
            f"q {tuple(q.shape)}, layout {layout!r}, causal {bool(causal)}, window {window})")
    if (plan.rank, plan.world_size, plan.n_local) != (rank, world_size, n) or plan.batch_size not in (None, B):
        raise ValueError(f"{fn}: plan was built for other shards: {seen}")
    if (plan.layout, plan.causal, plan.window) != (layout, bool(causal), window):
        raise ValueError(f"{fn}: plan was built for another layout or mask: {seen}")


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
    built with ring_plan(..., window=left + 1)).
    """
    _check_ring_inputs(q, k, v, layout, softmax_scale, position_ids, plan, window_size)
    window = causal_window_length(bool(causal), window_size)
    causal = bool(causal) or window > 0
    rank, world_size = group_rank_and_size(group)
    backend = resolve_backend_name(backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if position_ids is not None:
        local_pos = position_ids.reshape(-1, q.shape[1]).expand(q.shape[0], -1)  # (B, N_local)
        plan = ring_plan(local_pos, group, layout, causal, window)
    elif plan is None:
        plan = dense_plan(rank, world_size, q.shape[1], layout, causal, window)
    _check_plan(plan, q, layout, causal, rank, world_size, window)
    out, lse = RingAttnFunc.apply(q, k, v, group, plan.steps, scale, backend, bool(overlap))
    return (out, lse) if return_lse else out
