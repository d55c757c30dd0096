"""Gluon FlashAttention backward for Hopper (sm_90): TMA loads, async warpgroup MMAs, P recomputed from the lse.

    dq, dk, dv = gluon_attn_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=0.125,
                                     window_size=(-1, -1), dlse=None)
    dq, dk, dv = gluon_attn_backward(..., deterministic=False)   # dQ's additions in any order
    dq, dk, dv = gluon_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, True, 0.125,
                                            (-1, -1), None)      # packed documents

Same contract as the Triton backward (attention/triton/bwd.py): q (B, Nq, H, D), k/v (B, Nk, Hkv, D), out/dout
like q, lse/dlse (B, H, Nq) fp32 natural log (dlse may be None) -> dq, dk, dv in the input dtype. Rows that see
no key (lse = -inf) get zero gradients. The case must be covered (plan.uncovered_reason is None).

D=64 and 128 (WS_BWD_CONFIG): the Triton preprocess (delta = rowsum(dO * O) - dlse, lse2 = lse * log2 e), then
one warp-specialized program per (key block of BLOCK_N = 128 rows, batch, kv head), FA3's layout:

    loader warp     K, V once; then Q_i, dO_i (TMA) with their rows of lse2, delta (cp.async) of every (head,
                    query block) pair of the GQA group, head-major (REVERSE: query block by query block from the
                    last, _pair), through a STAGES-deep ring (q_ready / do_ready, released by q_empty)
    consumer WG 0/1 key rows [WG * 64, WG * 64 + 64):
                        issue S^T = K Q_i^T + (-lse2_i / (scale log2 e)),  issue dP^T = V dO_i^T + (-delta_i)
                        P^T = exp2(S^T * scale * log2 e)    (masked only in edge blocks)
                        dS^T = P^T dP^T
                        issue dV += P^T dO_i,  issue dK += dS^T Q_i      (P^T, dS^T from registers)
                        dS^T -> ds_smem[i % 2] (its 64 rows); ds_ready: both warpgroups have written theirs
                        issue half of dQ_i = dS K: rows [WG * BM/2, ...) at BLOCK_M = 128 (D=64), else columns
                        [WG * D/2, ...) (dS^T permuted from shared memory; dq_box)
                        wait dV, dK; release Q_i, dO_i; wait dQ_i; dQ_i * scale -> dq_smem half WG, in the order
                        of the accumulator's fragments (dq_layouts: no bank conflict); dq_full[WG]
    dQ warp         TMA reduce-add of the two halves, as they lie, into the fp32 accumulator of dQ tiles (B, H,
                    query blocks, BLOCK_M * D); dq_empty once read.
                    deterministic: first wait until the semaphore of (b, h, query block) equals this key block's
                    rank (_dq_rank, plan_bwd.dq_rank), and after the addition is written, increment it: the
                    additions into a query block follow plan_bwd.ordered_backward_plan's launch order.
    walk            causal key blocks without a window launch heaviest first and walk their query blocks last to
                    first (REVERSE; plan_bwd.descending_walk), so that the resident ones stay on nearby query
                    blocks: always without determinism, and with it where a KV head's rows outgrow half the L2.
    launch          dense: the plan's rows for one (batch, head) pair after another, or without a mask in the
                    deterministic mode two pairs row by row (plan_bwd.head_interleave): the key blocks of one pair,
                    which add into each query block one link apart, then start twice as far apart.

    GQA split       where a group's rows outgrow the L2 (plan_bwd.split_group), one program per (key block, batch,
                    query head) instead, writing that head's dK / dV in fp32; the host sums them over the group.

dK is scaled once at the end; dK and dV go straight to global memory. plan_bwd.dq_from_tiles puts dQ back in row
order in the pass that casts it to the input dtype.

Packed documents (gluon_attn_varlen_backward, VARLEN): one program per (document, key block) of
plan.document_tiles, built on the GPU, and KV head; each document's query range as in a dense call of its
lengths, rows offset by its first row. A document's last query block runs into the next document's rows: their
part of the document's dQ tile stays zero, and its rows of lse2 / delta load as 0. The documents' query blocks
are numbered apart (plan_bwd.document_query_block): their semaphores and dQ tiles (plan_bwd.document_rows maps the
rows back); both modes walk causal key blocks last to first.


Ring reuse: a stage is refilled only once both consumer warpgroups have released it (q_empty). Rows past Nq or
Nk read as zero through TMA and are dropped on store; every (query, key) pair outside the window, or past either
sequence end, lies in a masked block and gets P = 0, so rows that see no key (lse2 = 0 there) get zero gradients,
never NaN.
"""

from __future__ import annotations

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..triton.bwd import preprocess
from ..triton.common import query_segments
from .compat import cp_async_load, reinterpret, tma_load
from .dispatch import fits_in_memory
from .fwd import descriptor, l2_bytes, plan_row
from .plan import cached_table, document_tiles, window_sides
from .plan_bwd import (backward_plan, descending_walk, document_key_order, document_rows, document_semaphores,
                       dq_from_tiles, dq_tile_bases, head_interleave, ordered_backward_plan, split_group)

LOG2E = 1.4426950408889634

# the warp-specialized backward with dQ by TMA reduce-add: (BLOCK_M, BLOCK_N, STAGES) per head dim, and the
# register caps (the kernel's over its 12 warps; each consumer warpgroup's after setmaxnreg)
WS_BWD_CONFIG = {64: (128, 128, 2), 128: (64, 128, 2)}
WS_BWD_REGS = (168, 240)
# How the two consumers share dQ_i = dS K: with 128-row query blocks (D=64) each takes 64 rows and every column
# (m64 n64 MMAs), else every row and half the columns (at D=64 those would be n32 MMAs, which read the same A tile
# from shared memory as n64 ones for half the math).
DQ_BY_ROWS = True


def dq_rows(block_m: int) -> bool:
    """Whether the consumers split dQ_i by rows (64 each) rather than by columns."""
    return DQ_BY_ROWS and block_m == 128


def dq_box(block_m: int, head_dim: int) -> tuple[int, int]:
    """(rows, columns) of one consumer's half of dQ_i: the fp32 dQ descriptor's box and dq_smem's tile."""
    return (block_m // 2, head_dim) if dq_rows(block_m) else (block_m, head_dim // 2)


def dq_layouts(block_m: int, head_dim: int):
    """(dq_smem's layout, the bases of one query block's dQ tile in the accumulator): each consumer's half in the
    order of its accumulator fragments (plan_bwd.dq_tile_bases), the second half after the first (dq_smem holds
    them as rows [0, rows) and [rows, 2 * rows))."""
    rows, cols = dq_box(block_m, head_dim)
    half = dq_tile_bases(rows, cols)
    smem = gl.SharedLinearLayout(offset_bases=half + [[rows, 0]], alignment=128)
    return smem, half + [[rows, 0] if dq_rows(block_m) else [0, cols]]


def dq_descriptor(tiles: torch.Tensor, block_m: int, head_dim: int) -> TensorDescriptor:
    """The fp32 dQ accumulator (..., n_tiles, block_m * head_dim) as rows of one half's width, one half a box."""
    rows, cols = dq_box(block_m, head_dim)
    flat = tiles.view(-1, cols)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, cols], layout)


@builtin
def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Add the shared-memory tile src into the global tile of tensor_desc at coord (cp.reduce.async.bulk.tensor
    .add, completed like a TMA store: tma.store_wait). triton 3.6's Gluon builder has the op; its hopper.tma
    module has no wrapper for it."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _pair(t, n_blk, lo, group, BLOCK_M: gl.constexpr, REVERSE: gl.constexpr):
    """(g, m0): head g of the GQA group and first row m0 of the t-th (head, query block) pair of a key block, over
    its n_blk query blocks from row lo: head-major, or with REVERSE query-block-major from the last block
    (plan_bwd.query_blocks). Without a group (group == 1, a constant where the launch passes 1) no division."""
    if group == 1:
        g = t * 0
        i = t
    elif REVERSE:
        i = t // group
        g = t - i * group
    else:
        g = t // n_blk
        i = t - g * n_blk
    if REVERSE:
        m0 = lo + (n_blk - 1 - i) * BLOCK_M
    else:
        m0 = lo + i * BLOCK_M
    return g, m0


@gluon.jit
def _issue_q_do(q_desc, do_desc, Lse2, Delta, q_smem, do_smem, lse_smem, dlt_smem, q_bars, do_bars, t, n_blk, lo, b,
                hk, group, n_heads, seqlen_q, first_q, len_q, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                REVERSE: gl.constexpr):
    """Load Q with its rows of lse2, and dO with its rows of delta, of the t-th (head, query block) pair of this key
    block into stage t % STAGES: Q and dO by TMA (rows from first_q: a packed document's first row), lse2 and delta
    by cp.async (any row alignment; rows past the sequence or the packed document of len_q rows: 0). Each cp.async
    arrive adds itself to the stage's barrier before the TMA expect, so the stage completes only with all of it.
    seqlen_q: the rows of one (batch, head)."""
    g, m0 = _pair(t, n_blk, lo, group, BLOCK_M, REVERSE)
    h = hk * group + g
    s = t % STAGES
    rows = m0 + gl.arange(0, BLOCK_M, gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0]))
    base = (b * n_heads + h) * seqlen_q + first_q
    in_q = rows < len_q
    cp_async_load(lse_smem.index(s), Lse2 + base + rows, mask=in_q)
    async_copy.mbarrier_arrive(q_bars.index(s))
    cp_async_load(dlt_smem.index(s), Delta + base + rows, mask=in_q)
    async_copy.mbarrier_arrive(do_bars.index(s))
    mbarrier.expect(q_bars.index(s), q_desc.block_type.nbytes)
    tma_load(q_desc, [b, first_q + m0, h, 0], q_bars.index(s), q_smem.index(s))
    mbarrier.expect(do_bars.index(s), do_desc.block_type.nbytes)
    tma_load(do_desc, [b, first_q + m0, h, 0], do_bars.index(s), do_smem.index(s))


@gluon.jit
def _issue_st_dpt(k, v, q2, do2, lse_s, dlt_s, q_bars, do_bars, s, phase, rz, inv_qk_scale, qry_l: gl.constexpr):
    """Issue S^T = K Q_i^T and dP^T = V dO_i^T (async, each once its operand has landed), with lse2 and delta (from
    the stage's lse_s / dlt_s) entering through the accumulators: S^T starts at -lse2 / qk_scale and dP^T at
    -delta, so that P^T = exp2(acc * qk_scale) and dS^T = P^T * acc, and no column vector (16 registers per thread
    each) stays live across the MMAs. (rz, a per-row zero, keeps the two rows of a thread that share a column in
    distinct registers: with one register feeding two accumulator slots, ptxas serialises S^T and dP^T with an
    injected warpgroup.wait.)"""
    mbarrier.wait(q_bars.index(s), phase)
    st_init = rz - (lse_s.load(qry_l) * inv_qk_scale)[None, :]
    st_tok = warpgroup_mma(k, q2.permute((1, 0)), st_init, is_async=True)
    mbarrier.wait(do_bars.index(s), phase)
    dpt_init = rz - dlt_s.load(qry_l)[None, :]
    dpt_tok = warpgroup_mma(v, do2.permute((1, 0)), dpt_init, is_async=True)
    return st_tok, dpt_tok


@gluon.jit
def _probs_t(st, m0, lo_full, hi_full, keys, off, seqlen_q, seqlen_k, qk_scale, win_left, win_right,
             BLOCK_M: gl.constexpr, qry_l: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
    """P^T = exp2(S^T * qk_scale) of query block m0 against `keys`, masked only in edge blocks (window sides,
    sequence tails of rows or keys): visible() transposed, rows checked too."""
    if (m0 < lo_full) | (m0 >= hi_full):
        qrows = m0 + gl.arange(0, BLOCK_M, qry_l)
        diag = qrows[None, :] + off
        keep = (keys[:, None] < seqlen_k) & (qrows < seqlen_q)[None, :]
        if HAS_LEFT:
            keep = keep & (keys[:, None] >= diag - win_left)
        if HAS_RIGHT:
            keep = keep & (keys[:, None] <= diag + win_right)
        pt = gl.exp2(gl.where(keep, st * qk_scale, float("-inf")))
    else:
        pt = gl.exp2(st * qk_scale)
    return pt


@gluon.jit
def _issue_dv_dk(pt, dpt_tok, q2, do2, dv, dk, a_layout: gl.constexpr):
    """dS^T = P^T dP^T once dP^T has retired (before the dV MMA: P^T in fp32, dP^T and the bf16 copies of P^T are
    never all live at once), then issue dV += P^T dO_i and dK += dS^T Q_i with P^T and dS^T from registers.
    Returns dS^T in the input dtype, the two register operands (pinned until their MMAs retire) and the tokens."""
    dtype: gl.constexpr = q2.dtype
    dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt_tok, ))
    dst = (pt * dpt).to(dtype)
    pt_a = gl.convert_layout(pt.to(dtype), a_layout)
    ds_a = gl.convert_layout(dst, a_layout)
    dv_tok = warpgroup_mma(pt_a, do2, dv, is_async=True)
    dk_tok = warpgroup_mma(ds_a, q2, dk, is_async=True)
    return dst, pt_a, ds_a, dv_tok, dk_tok


@gluon.jit
def _launch_slot(INTERLEAVE: gl.constexpr):
    """(plan row, batch * head pair) of this program: the grid is (rows * INTERLEAVE, pairs / INTERLEAVE), so that
    the launch order takes INTERLEAVE pairs at a time, row by row (plan_bwd.launch_slot, plan_bwd.head_interleave)."""
    pid = gl.program_id(0)
    return pid // INTERLEAVE, gl.program_id(1) * INTERLEAVE + pid % INTERLEAVE


@gluon.jit
def _ws_item(Plan, CuQ, CuK, n_kv_heads, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, VARLEN: gl.constexpr,
             INTERLEAVE: gl.constexpr):
    """(b, hk, n0, lo, lo_full, hi_full, n_blk, first_q, first_k, len_q, len_k, qblk) of this program's key block.

    Dense: a row of plan_bwd.backward_plan or ordered_backward_plan (the table), first_q = first_k = qblk = 0 and
    len_q, len_k the sequence lengths. Packed documents (b = 0): the row is (document d, key block) of
    plan.document_tiles, d's query rows start at first_q = cu_q[d] and its keys at first_k = cu_k[d], the query
    range is the Triton kernels' query_segments (aligned, as plan_bwd.query_range) and a padding row (d = -1) is
    empty. Row m0 of the document is in query block qblk + m0 // BLOCK_M of its (batch, head): qblk = first_q //
    BLOCK_M + d numbers the documents' blocks apart (plan_bwd.document_query_block)."""
    if VARLEN:
        bhk = gl.program_id(1)
        row = gl.program_id(0)
        d = gl.load(Plan + 2 * row)
        tile = gl.maximum(gl.load(Plan + 2 * row + 1), 0)
        dd = gl.maximum(d, 0)
        first_q = gl.load(CuQ + dd)
        len_q = gl.load(CuQ + dd + 1) - first_q
        first_k = gl.load(CuK + dd)
        len_k = gl.load(CuK + dd + 1) - first_k
        if d < 0:
            len_k = len_k * 0
        lo, lo_full, hi_full, hi = query_segments(tile * BLOCK_N, len_q, len_k, win_left, win_right, HAS_LEFT,
                                                  HAS_RIGHT, BLOCK_M, BLOCK_N, True)
        if d < 0:
            hi = lo
        qblk = first_q // BLOCK_M + dd
    else:
        row, bhk = _launch_slot(INTERLEAVE)
        tile, lo, lo_full, hi_full, hi = plan_row(Plan, row)
        first_q = tile * 0
        first_k = first_q
        len_q = seqlen_q + first_q
        len_k = seqlen_k + first_q
        qblk = first_q
    return (bhk // n_kv_heads, bhk % n_kv_heads, tile * BLOCK_N, lo, lo_full, hi_full, gl.cdiv(hi - lo, BLOCK_M),
            first_q, first_k, len_q, len_k, qblk)


@gluon.jit
def _ws_consumer(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, REVERSE: gl.constexpr, VARLEN: gl.constexpr,
                 INTERLEAVE: gl.constexpr, WG: gl.constexpr):
    """Key rows [WG * BLOCK_N/2, (WG+1) * BLOCK_N/2) of the key block: S^T, dP^T, dV, dK for them, and one half of
    every dQ_i (over all BLOCK_N keys, from the dS^T both warpgroups put in shared memory): rows
    [WG * BLOCK_M/2, (WG+1) * BLOCK_M/2) where dq_desc's box is BLOCK_M/2 rows (dq_box), else columns
    [WG * D/2, (WG+1) * D/2)."""
    (q_desc, k_desc, v_desc, do_desc, dq_desc, DK, DV, Lse2, Delta, Plan, Sem, CuQ, CuK, q_smem, do_smem,
     lse_smem, dlt_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar, q_ready, do_ready, q_empty, ds_ready, dq_full,
     dq_empty, n_kv_heads, n_heads, group, kv_group, seqlen_q, seqlen_k, sem_stride, qk_scale, inv_qk_scale,
     softmax_scale, win_left, win_right) = args
    HALF: gl.constexpr = BLOCK_N // 2
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    DQ_M: gl.constexpr = dq_desc.block_type.shape[0]  # one consumer's half of dQ_i (dq_box)
    DQ_N: gl.constexpr = dq_desc.block_type.shape[1]
    DQ_ROWS: gl.constexpr = DQ_M < BLOCK_M
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_N, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    key_l: gl.constexpr = gl.SliceLayout(1, st_layout)
    qry_l: gl.constexpr = gl.SliceLayout(0, st_layout)

    b, hk, n0, lo, lo_full, hi_full, n_blk, first_q, first_k, len_q, len_k, qblk = _ws_item(
        Plan, CuQ, CuK, n_kv_heads, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
        VARLEN, INTERLEAVE)
    total = n_blk * group  # (head, query block) pairs, in _pair's order
    off = len_k - len_q
    keys = n0 + WG * HALF + gl.arange(0, HALF, key_l)
    rz = (keys.to(gl.float32) * 0.0)[:, None]
    dk = gl.zeros([HALF, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([HALF, HEAD_DIM], gl.float32, kv_layout)
    dq_zero = gl.zeros([DQ_M, DQ_N], gl.float32, dq_layout)
    k_all = k_smem.reshape([BLOCK_N, HEAD_DIM])
    k_wg = k_all.slice(WG * HALF, HALF, dim=0)
    v_wg = v_smem.reshape([BLOCK_N, HEAD_DIM]).slice(WG * HALF, HALF, dim=0)
    if DQ_ROWS:  # dQ's B operand: every key, every column (row halves) or this warpgroup's columns
        k_dq = k_all
    else:
        k_dq = k_all.slice(WG * DQ_N, DQ_N, dim=1)
    if total > 0:
        mbarrier.wait(kv_bar, 0)
        for t in range(total):
            g, m0 = _pair(t, n_blk, lo, group, BLOCK_M, REVERSE)
            s = t % STAGES
            phase = (t // STAGES) & 1
            q2 = q_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
            do2 = do_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
            st_tok, dpt_tok = _issue_st_dpt(k_wg, v_wg, q2, do2, lse_smem.index(s), dlt_smem.index(s), q_ready,
                                            do_ready, s, phase, rz, inv_qk_scale, qry_l)
            st = warpgroup_mma_wait(num_outstanding=1, deps=(st_tok, ))
            pt = _probs_t(st, m0, lo_full, hi_full, keys, off, len_q, len_k, qk_scale, win_left, win_right,
                          BLOCK_M, qry_l, HAS_LEFT, HAS_RIGHT)
            dst, pt_a, ds_a, dv_tok, dk_tok = _issue_dv_dk(pt, dpt_tok, q2, do2, dv, dk, a_layout)
            # dS^T goes to buffer t % 2, this warpgroup's rows; once both warpgroups have written theirs, each
            # forms its columns of dQ_i = dS K. A buffer is rewritten two blocks later, after both have passed
            # the next block's ds_ready, by which time both have retired this block's dQ MMA.
            db = t % 2
            ds_smem.index(db).slice(WG * HALF, HALF, dim=0).store(dst)
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(db), count=1)
            mbarrier.wait(ds_ready.index(db), (t // 2) & 1)
            if DQ_ROWS:  # dS: this warpgroup's query rows (columns of dS^T), or all of them
                ds_dq = ds_smem.index(db).slice(WG * DQ_M, DQ_M, dim=1).permute((1, 0))
            else:
                ds_dq = ds_smem.index(db).permute((1, 0))
            dq_tok = warpgroup_mma(ds_dq, k_dq, dq_zero, use_acc=False, is_async=True)
            dv, dk, pt_a, ds_a = warpgroup_mma_wait(num_outstanding=1, deps=(dv_tok, dk_tok, pt_a, ds_a))
            async_copy.mbarrier_arrive(q_empty.index(s), increment_count=False)  # Q_i, dO_i: read by nothing more
            dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ))
            # the dQ warp adds the tile into global memory by TMA; the buffer is free once that has read it
            mbarrier.wait(dq_empty.index(WG), (t & 1) ^ 1)  # fresh barriers pass phase 1: the first wait is free
            dq_smem.slice(WG * DQ_M, DQ_M).store(dq * softmax_scale)
            fence_async_shared()
            mbarrier.arrive(dq_full.index(WG), count=1)

    # dK, dV rows of this warpgroup straight to global memory (K is still read by the other warpgroup's dQ MMA)
    rows = n0 + WG * HALF + gl.arange(0, HALF, gl.SliceLayout(1, kv_layout))
    cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, kv_layout))
    ptr = ((b * seqlen_k + first_k + rows).to(gl.int64) * n_kv_heads + hk) * HEAD_DIM
    ptr = ptr[:, None] + cols[None, :]
    in_k = (rows < len_k)[:, None]
    gl.store(DK + ptr, (dk * softmax_scale).to(DK.dtype.element_ty), mask=in_k)
    gl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=in_k)


@gluon.jit
def _ws_loader(args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_LEFT: gl.constexpr,
               HAS_RIGHT: gl.constexpr, REVERSE: gl.constexpr, VARLEN: gl.constexpr, INTERLEAVE: gl.constexpr):
    """One warp: K and V of the key block once, then Q_i and dO_i with their rows of lse2 / delta through the
    STAGES-deep ring."""
    (q_desc, k_desc, v_desc, do_desc, dq_desc, DK, DV, Lse2, Delta, Plan, Sem, CuQ, CuK, q_smem, do_smem,
     lse_smem, dlt_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar, q_ready, do_ready, q_empty, ds_ready, dq_full,
     dq_empty, n_kv_heads, n_heads, group, kv_group, seqlen_q, seqlen_k, sem_stride, qk_scale, inv_qk_scale,
     softmax_scale, win_left, win_right) = args
    b, hk, n0, lo, lo_full, hi_full, n_blk, first_q, first_k, len_q, len_k, qblk = _ws_item(
        Plan, CuQ, CuK, n_kv_heads, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
        VARLEN, INTERLEAVE)
    total = n_blk * group
    if total > 0:
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
        hkv = hk // kv_group  # hk is a query head where the GQA group is split over programs
        tma_load(k_desc, [b, first_k + n0, hkv, 0], kv_bar, k_smem)
        tma_load(v_desc, [b, first_k + n0, hkv, 0], kv_bar, v_smem)
    for t in range(total):
        mbarrier.wait(q_empty.index(t % STAGES), ((t // STAGES) & 1) ^ 1)
        _issue_q_do(q_desc, do_desc, Lse2, Delta, q_smem, do_smem, lse_smem, dlt_smem, q_ready, do_ready, t, n_blk,
                    lo, b, hk, group, n_heads, seqlen_q, first_q, len_q, BLOCK_M, STAGES, REVERSE)


@gluon.jit
def _dq_rank(tile, m0, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, REVERSE: gl.constexpr):
    """How many key blocks add into query block m0 // BLOCK_M before this one: plan_bwd.dq_rank's twin."""
    off = seqlen_k - seqlen_q
    if HAS_RIGHT and not REVERSE:
        rank = gl.minimum(gl.cdiv(seqlen_k, BLOCK_N) - 1, (m0 + BLOCK_M - 1 + off + win_right) // BLOCK_N) - tile
    elif HAS_LEFT:
        rank = tile - gl.maximum(m0 + off - win_left, 0) // BLOCK_N
    else:
        rank = tile
    return rank


@gluon.jit
def _bulk_wait_written():
    """Wait until this thread's TMA stores and reductions have written global memory (tma.store_wait only waits
    until they have read shared memory), and order those writes before the generic proxy's next accesses."""
    x = gl.full([32], 0, gl.int32, gl.BlockedLayout([1], [32], [1], [0]))
    gl.inline_asm_elementwise("cp.async.bulk.wait_group 0;\n\tfence.proxy.async.global;\n\tmov.b32 $0, $1;", "=r,r",
                              [x], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _ws_dq_writer(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DET: gl.constexpr, REVERSE: gl.constexpr,
                  VARLEN: gl.constexpr, INTERLEAVE: gl.constexpr):
    """One warp: adds each dQ_i tile (two halves, one per consumer: row or column halves, as dq_desc's box says)
    into the fp32 dQ accumulator by TMA reduce-add: tile (batch, head, query block) of sem_stride per head, each
    half DQ_M * DQ_N contiguous floats in dq_smem's order (plan_bwd.dq_tile_bases), which the host puts back
    in row order. A packed document's query blocks are tiles of their own (qblk). DET: query block i's additions
    are ordered by a semaphore per (batch, head, query block): this key block waits until dq_rank earlier ones
    have added theirs, adds, waits until the addition is written, and counts itself in."""
    (q_desc, k_desc, v_desc, do_desc, dq_desc, DK, DV, Lse2, Delta, Plan, Sem, CuQ, CuK, q_smem, do_smem,
     lse_smem, dlt_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar, q_ready, do_ready, q_empty, ds_ready, dq_full,
     dq_empty, n_kv_heads, n_heads, group, kv_group, seqlen_q, seqlen_k, sem_stride, qk_scale, inv_qk_scale,
     softmax_scale, win_left, win_right) = args
    DQ_M: gl.constexpr = dq_desc.block_type.shape[0]  # one consumer's half of dQ_i (dq_box)
    DQ_N: gl.constexpr = dq_desc.block_type.shape[1]
    # the halves as the TMA reads them: rows of DQ_N floats, dq_smem's fragment order unchanged
    flat = reinterpret(dq_smem, gl.float32, [2 * DQ_M, DQ_N],
                       gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))
    b, hk, n0, lo, lo_full, hi_full, n_blk, first_q, first_k, len_q, len_k, qblk = _ws_item(
        Plan, CuQ, CuK, n_kv_heads, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
        VARLEN, INTERLEAVE)
    for t in range(n_blk * group):
        g, m0 = _pair(t, n_blk, lo, group, BLOCK_M, REVERSE)
        h = hk * group + g
        tile = (b * n_heads + h) * sem_stride + qblk + m0 // BLOCK_M
        if DET:
            lock = Sem + tile
            rank = _dq_rank(n0 // BLOCK_N, m0, len_q, len_k, win_left, win_right, BLOCK_M, BLOCK_N, HAS_LEFT,
                            HAS_RIGHT, REVERSE)
            while gl.atomic_add(lock, 0, sem="acquire", scope="gpu") != rank:
                pass
        for c in gl.static_range(2):
            mbarrier.wait(dq_full.index(c), t & 1)
            tma_reduce_add(dq_desc, [(2 * tile + c) * DQ_M, 0], flat.slice(c * DQ_M, DQ_M))
        if DET:
            _bulk_wait_written()
            gl.atomic_add(lock, 1, sem="release", scope="gpu")
            mbarrier.arrive(dq_empty.index(0), count=1)
            mbarrier.arrive(dq_empty.index(1), count=1)
        else:
            tma.store_wait(pendings=1)
            mbarrier.arrive(dq_empty.index(0), count=1)
            tma.store_wait(pendings=0)
            mbarrier.arrive(dq_empty.index(1), count=1)


@gluon.jit
def _bwd_ws_kernel(q_desc, k_desc, v_desc, do_desc, dq_desc, DK, DV, Lse2, Delta, Plan, Sem, CuQ, CuK, n_kv_heads,
                   n_heads, group, kv_group, seqlen_q, seqlen_k, sem_stride, qk_scale, inv_qk_scale, softmax_scale,
                   win_left, win_right, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DET: gl.constexpr,
                   REVERSE: gl.constexpr, VARLEN: gl.constexpr, INTERLEAVE: gl.constexpr, DQ_SMEM: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Warp-specialized dK/dV with dQ in the same pass: two consumer warpgroups (the default partition and a
    worker), a loader warp and a dQ warp. dq_desc: the fp32 accumulator of dQ tiles as (rows, DQ_N), its box one
    consumer's half of dQ_i (dq_box: BLOCK_M/2 x D, half of the rows, or BLOCK_M x D/2, half of the columns);
    DQ_SMEM: the two halves' shared-memory layout (dq_layouts).
    DET: Plan is plan_bwd.ordered_backward_plan's and Sem a zeroed int32 (B * H * cdiv(Nq, BLOCK_M)) semaphore
    per query block. INTERLEAVE: the dense grid is (rows * INTERLEAVE, pairs / INTERLEAVE) (_launch_slot).
    REVERSE: every key block walks its query blocks last to first (plan_bwd.descending_walk).
    The GQA group: either each program walks its KV head's `group` query heads (kv_group = 1, DK / DV like K / V),
    or the group is split over programs (plan_bwd.split_group: group = 1, kv_group the GQA group, n_kv_heads the
    query heads, DK / DV fp32 (B, Nk, H, D) partials that the host sums over each group)."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    rows_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], rows_layout)
    dlt_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], rows_layout)
    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M],
                                        gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
    dq_smem = gl.allocate_shared_memory(gl.float32, [2 * dq_desc.block_type.shape[0], dq_desc.block_type.shape[1]],
                                        DQ_SMEM)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=256)  # every thread of both consumer warpgroups arrives
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)  # one arrive per consumer warpgroup
        mbarrier.init(dq_full.index(i), count=1)
        mbarrier.init(dq_empty.index(i), count=1)
    args = (q_desc, k_desc, v_desc, do_desc, dq_desc, DK, DV, Lse2, Delta, Plan, Sem, CuQ, CuK, q_smem, do_smem,
            lse_smem, dlt_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar, q_ready, do_ready, q_empty, ds_ready,
            dq_full, dq_empty, n_kv_heads, n_heads, group, kv_group, seqlen_q, seqlen_k, sem_stride, qk_scale,
            inv_qk_scale, softmax_scale, win_left, win_right)
    gl.warp_specialize([
        (_ws_consumer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, REVERSE, VARLEN, INTERLEAVE, 0)),
        (_ws_consumer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, REVERSE, VARLEN, INTERLEAVE, 1)),
        (_ws_loader, (args, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, REVERSE, VARLEN, INTERLEAVE)),
        (_ws_dq_writer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, DET, REVERSE, VARLEN, INTERLEAVE)),
    ], [4, 1, 1], [CONSUMER_REGS, 24, 24])


# -- host side ---------------------------------------------------------------------------------------------


def _k_descriptor(k: torch.Tensor, block_n: int) -> TensorDescriptor:
    """K's descriptor for the warp-specialized kernel: each consumer's dQ MMA reads half of K's columns as its B
    operand, so the swizzle must not span more than half a row: 128 bytes at D=128, 64 at D=64."""
    block = [1, block_n, 1, k.shape[-1]]
    swizzle = min(128, k.shape[-1] // 2 * k.element_size())
    layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=8 * k.element_size(), rank=4)
    return TensorDescriptor(k, list(k.shape), list(k.stride()), block, layout)


def _launch_ws(q, k, v, dout, dq, dk, dv, lse2, delta, table, sem, cu_q, cu_k, batch, seqlen_q, seqlen_k, sem_stride,
               causal, softmax_scale, window_size, deterministic, reverse, varlen, split=False):
    """_bwd_ws_kernel over (table rows, batch * KV heads) programs, or with split (plan_bwd.split_group) over (table
    rows, batch * query heads), dk / dv then the fp32 (B, Nk, H, D) partials; dense grids launch two pairs row by
    row where plan_bwd.head_interleave says so: q / k / v / dout (B, N, H, D), dq the
    zeroed fp32 accumulator of dQ tiles (B, H, sem_stride, BLOCK_M * D), sem_stride the semaphores and tiles per
    (batch, head). Dense: cu_q / cu_k are unused, seqlen_q / seqlen_k the lengths; packed documents (varlen,
    B = 1): seqlen_q / seqlen_k the totals."""
    H, D, Hkv = q.shape[2], q.shape[3], k.shape[2]
    bm, bn, stages = WS_BWD_CONFIG[D]
    left, right = window_sides(causal, window_size)
    qk_scale = float(softmax_scale) * LOG2E
    heads, group, kv_group = (H, 1, H // Hkv) if split else (Hkv, H // Hkv, 1)
    pairs = batch * heads
    interleave = 1 if varlen else head_interleave(causal, window_size, deterministic, pairs)
    with torch.cuda.device(q.device):
        _bwd_ws_kernel[(table.shape[0] * interleave, pairs // interleave)](
            descriptor(q, bm), _k_descriptor(k, bn), descriptor(v, bn), descriptor(dout, bm),
            dq_descriptor(dq, bm, D), dk, dv, lse2, delta, table, sem, cu_q, cu_k, heads, H, group, kv_group,
            seqlen_q, seqlen_k, sem_stride, qk_scale, 1.0 / qk_scale, float(softmax_scale), max(left, 0),
            max(right, 0), HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, DET=deterministic, REVERSE=reverse,
            VARLEN=varlen, INTERLEAVE=interleave, DQ_SMEM=dq_layouts(bm, D)[0], CONSUMER_REGS=WS_BWD_REGS[1],
            num_warps=4, maxnreg=WS_BWD_REGS[0], HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0)


def _dq_in_rows(tiles: torch.Tensor, block_m: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The dQ accumulator's tiles (B, H, n_tiles, block_m * head_dim) back in row order, (B, n_tiles * block_m, H,
    head_dim) in dtype, in one pass (plan_bwd.dq_from_tiles)."""
    B, H, n_tiles, _ = tiles.shape
    out = torch.empty((B, n_tiles * block_m, H, head_dim), dtype=dtype, device=tiles.device)
    return dq_from_tiles(tiles, dq_layouts(block_m, head_dim)[1], out)


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself if TMA can read it (unit last stride, 16-byte aligned strides and base), else a contiguous copy."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0
                                                              for s in t.stride()[:-1])
    return t if ok else t.contiguous()


def gluon_attn_backward(dout, q, k, v, out, lse, causal, softmax_scale, window_size, dlse, deterministic=True):
    """Gradients of attention for q (B, Nq, H, D), k/v (B, Nk, Hkv, D); lse/dlse (B, H, Nq) fp32.

    deterministic=False: dQ's additions in any order (no semaphores; run-to-run variation in dq's last bits)."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    dout, out = _tma_ready(dout), _tma_ready(out)
    delta, lse2 = preprocess(out, dout, lse, dlse)
    bm, bn, _ = WS_BWD_CONFIG[D]
    n_qb = triton.cdiv(Nq, bm)
    dq = torch.zeros((B, H, n_qb, bm * D), dtype=torch.float32, device=q.device)
    l2 = l2_bytes(q.device)
    split = split_group(group, Nq, D, l2, deterministic) and fits_in_memory(8 * B * Nk * H * D, q.device)
    reverse = descending_walk(causal, window_size, Nq, 1 if split else group, D, l2, deterministic)
    if deterministic:
        table = cached_table(ordered_backward_plan, Nq, Nk, causal, window_size, bm, bn, q.device, reverse)
        sem = torch.zeros(B * H * n_qb, dtype=torch.int32, device=q.device)
    else:
        table = cached_table(backward_plan, Nq, Nk, causal, window_size, bm, bn, q.device)
        sem = table  # unused
    if split:  # each query head's dK / dV in fp32, summed over the group below in a fixed order
        dk = torch.empty((B, Nk, H, D), dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
    else:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch_ws(q, k, v, dout, dq, dk, dv, lse2, delta, table, sem, table, table, B, Nq, Nk, n_qb, causal,
               softmax_scale, window_size, deterministic, reverse, varlen=False, split=split)
    if split:
        dk = dk.view(B, Nk, Hkv, group, D).sum(3).to(k.dtype)
        dv = dv.view(B, Nk, Hkv, group, D).sum(3).to(v.dtype)
    dq = _dq_in_rows(dq, bm, D, q.dtype)
    return (dq if n_qb * bm == Nq else dq[:, :Nq].contiguous()), dk, dv


def gluon_attn_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               causal, softmax_scale, window_size, dlse, deterministic=True):
    """Packed-document gradients (WS_BWD_CONFIG): q (total_q, H, D), k/v (total_k, Hkv, D), out/dout like
    q, lse/dlse (H, total_q) fp32 (dlse may be None), cu_seqlens int32 (n_docs + 1) on the GPU -> dq, dk, dv.
    The warp-specialized kernel with one program per (document, key block) of plan.document_tiles (built on the
    GPU: the host never reads the lengths) and KV head; each document's query range as in the dense call. Rows and
    keys outside every document get zero gradients."""
    total_q, H, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    n_docs = cu_seqlens_q.numel() - 1
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if total_q == 0 or total_k == 0:
        return torch.zeros_like(q), dk, dv
    dout, out = _tma_ready(dout), _tma_ready(out)
    delta, lse2 = preprocess(out[None], dout[None], lse[None], None if dlse is None else dlse[None])
    bm, bn, _ = WS_BWD_CONFIG[D]
    # both modes walk causal key blocks last to first, as the non-deterministic mode does everywhere: their
    # documents' key blocks then launch heaviest first (plan_bwd.document_key_order)
    reverse = descending_walk(causal, window_size, int(max_seqlen_q), H // Hkv, D, l2_bytes(q.device),
                              deterministic=False)
    table = document_tiles(cu_seqlens_k, total_k, bn, document_key_order(causal, window_size, deterministic,
                                                                        reverse))
    sem_stride = document_semaphores(total_q, n_docs, bm)
    sem = torch.zeros(H * sem_stride if deterministic else 1, dtype=torch.int32, device=q.device)
    dq = torch.zeros((1, H, sem_stride, bm * D), dtype=torch.float32, device=q.device)
    _launch_ws(q[None], k[None], v[None], dout[None], dq, dk, dv, lse2, delta, table, sem, cu_seqlens_q, cu_seqlens_k,
               1, total_q, total_k, sem_stride, causal, softmax_scale, window_size, deterministic, reverse,
               varlen=True)
    return _dq_in_rows(dq, bm, D, q.dtype)[0].index_select(0, document_rows(cu_seqlens_q, total_q, bm)), dk, dv
