"""Gluon FlashAttention forward for Hopper (sm_90): TMA loads, async warpgroup MMAs, persistent tiles.

    out, lse = gluon_attn_forward(q, k, v, causal=True, softmax_scale=0.125, window_size=(-1, -1))
    out, lse = gluon_attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, True, 0.125, (-1, -1))  # packed docs
    out, lse = gluon_fp8_forward(fq, causal=True, softmax_scale=0.125)  # fq = attention.fp8 quantized q, k, v

Same contract as the Triton forward: q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> out (B, Nq, H, D), lse (B, H, Nq)
fp32 natural log (packed documents: (total, H, D) -> lse (H, total_q)); rows that see no key give lse = -inf and
out = 0. The case must be covered (plan.uncovered_reason is None); dispatch.py decides.

Warp-specialized, FA3's layout: a one-warp producer TMA-loads each work item's Q (one 64-row part per consumer)
and streams its K and V blocks through two rings of STAGES shared-memory stages, K_j ahead of V_{j-1}; each
consumer warpgroup owns 64 rows of the query tile (two over 128 rows at D=128, three over 192 at D=64:
FWD_CONFIG). K and V stages are released separately: a K stage as soon as
Q K_j^T has retired, a V stage once P.V has, so a K load runs a whole step ahead even with two stages. Every
consumer thread arrives on the "empty" mbarriers (cp.async.mbarrier.arrive.noinc): an mbarrier.arrive from one
thread would cost a warpgroup-wide bar.sync in front of it. Each consumer overlaps within itself (FA3's
intra-warpgroup overlap): while block j's softmax runs, P_{j-1}.V_{j-1} is in flight on the tensor cores, and P
feeds P.V from registers:

    S_0 = Q K_0^T;  release K_0;  P_0 = softmax(S_0)
    for j in 1..n-1:
        issue S_j = Q K_j^T,  issue O += P_{j-1} V_{j-1}      (async)
        wait S_j;  release K_j;  P_j, alpha_j = online softmax of S_j   (overlaps the P.V MMA)
        wait O;    release V_{j-1};  O *= alpha_j
    O += P_{n-1} V_{n-1};  release V_{n-1};  O /= l;  TMA store

Scores stay in base 2 (scale * log2 e folded into one multiply); masks apply only to the blocks the plan marks
(window edges, the causal diagonal, the sequence tail). A consumer whose rows all lie past the end (the last
tile's tail where Nq is not a multiple of BLOCK_M: at D=64 with 192-row tiles and 8K rows, a third of the
heaviest causal tile) releases the K/V stages unread and stores nothing.

The grid is persistent, one program per SM, walking (query tile, batch*head) work items heaviest query tile
first, a few heads at a time so that the programs reading a head's K/V at the same moment find it in L2
(plan.heads_per_chunk, plan.work_item). Each dense item goes to the program with the least work so far, counted
on the host from the plan (plan.balanced_schedule, a table per shape), as a dynamic scheduler would hand it out;
packed documents, whose tiles the host does not know, go round robin. Causal MHA at D=128 pairs the tiles
(plan.pairs_tiles, plan.forward_pairs): a work item is the i-th heaviest tile, then the i-th lightest with its key
blocks last-first, so every item costs the same and the programs stay in step.

The FP8 forward is the same kernel with FP8=True (dense, causal or not): e4m3 Q and K, V transposed (the FP8 MMA
reads its B operand K-major only), one scale per block of rows. Each block's P.V lands in a fresh fp32 tile that
joins O times V's scale, as in the Triton FP8 kernel; its tiles go one by one, each walking its keys first to last,
so that attention.fp8.emulate_fp8_attention stays its oracle.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..triton.common import key_segments
from . import device_props
from .compat import tma_load, tma_store
from .plan import (FP8_BLOCK_N, cached_schedule, cached_table, document_tiles, forward_pairs, forward_plan,
                   heads_per_chunk, pairs_tiles, persistent_grid, window_sides)

LOG2E = 1.4426950408889634
LN2: gl.constexpr = gl.constexpr(0.6931471805599453)
LOG2_P_SCALE: gl.constexpr = gl.constexpr(8.807354922057604)  # log2(448): FP8's P in [0, 1] -> [0, 448]

# (BLOCK_M, BLOCK_N, STAGES) per head dim, chosen by timing on an H200 (docs/kernels.md, docs/results.md). Each
# consumer warpgroup owns 64 rows of the query tile: BLOCK_M = 128 runs two, 192 three. Packed documents keep
# 128-row tiles at D=64, where three consumers measured slower than two.
FWD_CONFIG = {64: (192, 128, 2), 128: (128, 128, 2)}
FWD_VARLEN_CONFIG = {64: (128, 128, 3), 128: (128, 128, 2)}
# FP8 (gluon_fp8_forward): e4m3 tiles take half the bytes of bf16 ones; each consumer keeps a second fp32 tile of
# HEAD_DIM columns (each block's P.V before it joins O), hence two consumers at both head dims.
FWD_FP8_CONFIG = {64: (128, FP8_BLOCK_N, 3), 128: (128, FP8_BLOCK_N, 3)}
CONSUMER_ROWS = 64
# per number of consumer warpgroups: the kernel's register cap over all its warps (the consumers' and the
# producer's warpgroup) and each consumer's share after the producer gives its registers back (setmaxnreg)
WS_REGS = {2: (168, 240), 3: (128, 160)}


def consumers(block_m: int) -> int:
    """Consumer warpgroups of a BLOCK_M-row query tile (CONSUMER_ROWS rows each)."""
    if block_m % CONSUMER_ROWS or block_m // CONSUMER_ROWS not in WS_REGS:
        raise ValueError(f"FWD_CONFIG: BLOCK_M must be one of {[CONSUMER_ROWS * c for c in WS_REGS]}, got {block_m}")
    return block_m // CONSUMER_ROWS


@gluon.jit
def plan_row(Plan, slot):
    """Row `slot` of a plan table (plan.TilePlan.table): (tile, lo, a, b, hi)."""
    row = Plan + slot * 5
    return gl.load(row), gl.load(row + 1), gl.load(row + 2), gl.load(row + 3), gl.load(row + 4)


@gluon.jit
def _work_item(w, n_slots, n_bh, chunk):
    """(slot, bh) of work item w; plan.work_item is the host-side twin (and its docstring the rule)."""
    c = w // (chunk * n_slots)
    base = c * chunk
    g = gl.minimum(chunk, n_bh - base)
    r = w - base * n_slots
    return r // g, base + r % g


@gluon.jit
def visible(keys, diag, seqlen_k, win_left, win_right, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
    """Key index `keys` is visible from the query row whose diagonal (row + Nk - Nq) is `diag`: in bounds and inside
    the window (plan.py's rule). The two broadcast to the tile's shape, either orientation."""
    keep = keys < seqlen_k
    if HAS_LEFT:
        keep = keep & (keys >= diag - win_left)
    if HAS_RIGHT:
        keep = keep & (keys <= diag + win_right)
    return keep


@gluon.jit
def _scheduled(Sched, i, SCHEDULED: gl.constexpr):
    """The work item at position i of this program's walk: Sched[i] (plan.balanced_schedule; -1 pads) or i."""
    if SCHEDULED:
        w = gl.load(Sched + i)
    else:
        w = i
    return w


@gluon.jit
def _item(w, half, Plan, CuQ, CuK, n_slots, n_bh, chunk, n_heads, seqlen_q, seqlen_k, lse_stride, win_left,
          win_right, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
          VARLEN: gl.constexpr, PER_ITEM: gl.constexpr):
    """Tile `half` (< PER_ITEM, the plan rows per work item) of work item w, plan row PER_ITEM * slot + half:
    (b, h, tile, lo, a, bb, hi, first, first_k, len_q, len_k, lse_base).

    Dense: b is the batch index, first = first_k = 0, the tile and its bounds come from the plan table
    (plan.TilePlan.table). Packed documents (one packed sequence, b = 0, n_bh = heads): the plan row is
    (document d, tile) of plan.document_tiles; d's rows start at first = cu_q[d] and its keys at first_k = cu_k[d],
    the bounds come from the Triton kernels' key_segments, and a padding row (d = -1) gets lo = hi = -1 (skipped).
    The lse of row r is at lse_base + r. Pairs of dense tiles (PER_ITEM = 2, plan.forward_pairs) visit their
    second tile last-first: the loops pass half to _key (packed documents run PER_ITEM = 1, half = 0)."""
    slot, bh = _work_item(gl.maximum(w, 0), n_slots, n_bh, chunk)
    row = PER_ITEM * slot + half
    if VARLEN:
        h = bh
        d = gl.load(Plan + 2 * row)
        tile = gl.load(Plan + 2 * row + 1)
        dd = gl.maximum(d, 0)
        first = gl.load(CuQ + dd)
        len_q = gl.load(CuQ + dd + 1) - first
        first_k = gl.load(CuK + dd)
        len_k = gl.load(CuK + dd + 1) - first_k
        m0 = tile * BLOCK_M
        lo, a, bb, hi = key_segments(m0, len_q, len_k, win_left, win_right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
        if d < 0:
            lo = -1
            hi = -1
        b = d * 0
        lse_base = h * lse_stride + first
    else:
        h = bh % n_heads
        b = bh // n_heads
        tile, lo, a, bb, hi = plan_row(Plan, row)
        first = b * 0
        first_k = first
        len_q = seqlen_q
        len_k = seqlen_k
        lse_base = bh * seqlen_q
    if w < 0:  # a padding position of the balanced schedule: skipped like an empty row
        hi = -1
    return b, h, tile, lo, a, bb, hi, first, first_k, len_q, len_k, lse_base


@gluon.jit
def _key(lo, j, n_blocks, rev, BLOCK_N: gl.constexpr):
    """First key of the j-th of n_blocks key blocks from lo that a tile visits: first-to-last, or last-first (rev:
    the second tile of a pair, half = 1); plan.key_blocks is the twin."""
    return lo + (j + rev * (n_blocks - 1 - 2 * j)) * BLOCK_N


@gluon.jit
def _tma_store(o_desc, o_smem, out, b, row, h, WG: gl.constexpr):
    """O rows [row, row + BLOCK_M/2) of (b, h) through this consumer's o_smem half."""
    tma.store_wait(pendings=0)  # the previous work item's output has left this half's o_smem
    o_tile = o_smem.index(WG)
    o_tile.reshape(out.shape).store(out)
    fence_async_shared()
    tma_store(o_desc, [b, row, h, 0], o_tile)


@gluon.jit
def _online_softmax(s, m_i, l_i, key, lo_full, hi_full, rows, cols, seqlen_k, off, qk_scale, win_left, win_right,
                    HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, FP8: gl.constexpr):
    """One block's step of the online softmax in base 2: returns (p, m_new, l_new, alpha). FP8: p is 448 P, the
    e4m3 range (exp2(s - m + log2 448): the scale costs nothing), and l sums it before rounding."""
    P_SHIFT: gl.constexpr = LOG2_P_SCALE if FP8 else 0.0  # x - 0.0 folds away
    if (key < lo_full) | (key >= hi_full):
        keep = visible(key + cols[None, :], rows[:, None] + off, seqlen_k, win_left, win_right, HAS_LEFT, HAS_RIGHT)
        s = gl.where(keep, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = gl.exp2(s - (m_safe - P_SHIFT)[:, None])
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_safe = m_new
        p = gl.exp2(s * qk_scale - (m_safe - P_SHIFT)[:, None])
    alpha = gl.exp2(m_i - m_safe)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_new, alpha


@gluon.jit
def _release_unread(k_ready, v_ready, k_empty, v_empty, used, n_blocks, STAGES: gl.constexpr):
    """Pass over n_blocks K/V blocks of the ring from position `used` without reading them: wait for each stage to
    land (its phase must complete before this consumer counts towards the next) and release it."""
    for j in range(n_blocks):
        cur = used + j
        st = cur % STAGES
        phase = (cur // STAGES) & 1
        mbarrier.wait(k_ready.index(st), phase)
        async_copy.mbarrier_arrive(k_empty.index(st), increment_count=False)
        mbarrier.wait(v_ready.index(st), phase)
        async_copy.mbarrier_arrive(v_empty.index(st), increment_count=False)


@gluon.jit
def _ws_consumer(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, VARLEN: gl.constexpr, PER_ITEM: gl.constexpr,
                 SCHEDULED: gl.constexpr, CONSUMERS: gl.constexpr, WG: gl.constexpr, FP8: gl.constexpr,
                 QBLOCK_M: gl.constexpr, QBLOCK_N: gl.constexpr):
    """Rows [WG * R, (WG+1) * R) of every query tile, R = BLOCK_M / CONSUMERS: S = QK^T, online softmax, O += PV.

    FP8 (e4m3 Q, K and V transposed, attention.fp8.Fp8Qkv): one scale per QBLOCK_M query rows and per QBLOCK_N
    keys. Q's and K's multiply into the score scale of each block; P (448 P, see _online_softmax) is rounded to e4m3,
    and each block's P.V goes to a fresh fp32 tile that joins O times V's scale (Hopper's FP8 accumulation spans
    one block's keys, as in the Triton FP8 kernel and attention.fp8.emulate_fp8_attention)."""
    (q_desc, k_desc, v_desc, o_desc, Out, Lse, Plan, CuQ, CuK, Sched, q_smem, o_smem, k_smem, v_smem, q_ready,
     q_empty, k_ready, v_ready, k_empty, v_empty, n_work, n_slots, n_bh, chunk, n_heads, group, seqlen_q, seqlen_k,
     lse_stride, qk_scale, win_left, win_right, QScale, KScale, VScale, n_qblocks, n_kblocks) = args
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    dtype: gl.constexpr = k_desc.dtype  # of the MMA operands, P included
    out_dtype: gl.constexpr = o_desc.dtype
    INSTR_K: gl.constexpr = 32 if FP8 else 16
    K_WIDTH: gl.constexpr = 4 if FP8 else 2  # P's elements per 32-bit register
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, INSTR_K])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, INSTR_K])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=K_WIDTH)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    cols = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    used = 0  # K/V blocks consumed so far over all work items (the ring position)
    it = 0  # work items done
    for i in range(gl.program_id(0), n_work, gl.num_programs(0)):
        w = _scheduled(Sched, i, SCHEDULED)
        for half in range(PER_ITEM):
            b, h, tile, lo, lo_full, hi_full, hi, first, first_k, len_q, len_k, lse_base = _item(
                w, half, Plan, CuQ, CuK, n_slots, n_bh, chunk, n_heads, seqlen_q, seqlen_k, lse_stride, win_left,
                win_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, VARLEN, PER_ITEM)
            if hi >= 0:  # an empty row (an odd pair, a packed document's tile past its end) is skipped
                off = len_k - len_q
                m0 = tile * BLOCK_M + WG * ROWS
                n_blocks = gl.cdiv(hi - lo, BLOCK_N)
                rows = m0 + gl.arange(0, ROWS, row_s)
                m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
                l_i = gl.zeros([ROWS], gl.float32, row_s)
                acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
                s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
                c = qk_scale
                if FP8:  # a consumer's rows lie in one quantization block of Q (rows all past Nq: the last block's
                    # scale; they are never stored), a key block in one of K and V
                    q_blk = gl.minimum(m0 // QBLOCK_M, n_qblocks - 1)
                    q_c = qk_scale * gl.load(QScale + (b * n_heads + h) * n_qblocks + q_blk)
                    kv_scales = (b * (n_heads // group) + h // group) * n_kblocks
                mbarrier.wait(q_ready.index(WG), it & 1)
                q = q_smem.index(WG).reshape([ROWS, HEAD_DIM])
                if (n_blocks > 0) & (m0 >= len_q):  # every row past the end (the last tile's tail): no MMA
                    _release_unread(k_ready, v_ready, k_empty, v_empty, used, n_blocks, STAGES)
                    used += n_blocks
                elif n_blocks > 0:
                    st = used % STAGES
                    if FP8:  # issued before the waits; elsewhere the steps are as in the bf16 kernel
                        key = _key(lo, 0, n_blocks, half, BLOCK_N)
                        c = q_c * gl.load(KScale + kv_scales + key // QBLOCK_N)
                        vs = gl.load(VScale + kv_scales + key // QBLOCK_N)
                    mbarrier.wait(k_ready.index(st), (used // STAGES) & 1)
                    kt = k_smem.index(st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
                    s = warpgroup_mma(q, kt, s_zero, use_acc=False, is_async=True)
                    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
                    async_copy.mbarrier_arrive(k_empty.index(st), increment_count=False)
                    if not FP8:
                        key = _key(lo, 0, n_blocks, half, BLOCK_N)
                    p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, key, lo_full, hi_full, rows, cols, len_k, off, c,
                                                         win_left, win_right, HAS_LEFT, HAS_RIGHT, FP8)
                    pv = gl.convert_layout(p.to(dtype), p_layout)
                    for j in range(1, n_blocks):
                        cur = used + j
                        st = cur % STAGES
                        ps = (cur - 1) % STAGES
                        mbarrier.wait(k_ready.index(st), (cur // STAGES) & 1)
                        mbarrier.wait(v_ready.index(ps), ((cur - 1) // STAGES) & 1)
                        kt = k_smem.index(st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
                        s_tok = warpgroup_mma(q, kt, s_zero, use_acc=False, is_async=True)
                        if FP8:  # P_{j-1} V_{j-1} into a fresh tile; block j's scales load while the MMAs run
                            key = _key(lo, j, n_blocks, half, BLOCK_N)
                            vt = v_smem.index(ps).reshape([HEAD_DIM, BLOCK_N]).permute((1, 0))
                            pv_tok = warpgroup_mma(pv, vt, gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout),
                                                   use_acc=False, is_async=True)
                            c = q_c * gl.load(KScale + kv_scales + key // QBLOCK_N)
                            vs_next = gl.load(VScale + kv_scales + key // QBLOCK_N)
                        else:
                            pv_tok = warpgroup_mma(pv, v_smem.index(ps).reshape([BLOCK_N, HEAD_DIM]), acc,
                                                   is_async=True)
                        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
                        async_copy.mbarrier_arrive(k_empty.index(st), increment_count=False)  # done with K_j
                        if not FP8:
                            key = _key(lo, j, n_blocks, half, BLOCK_N)
                        p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, key, lo_full, hi_full, rows, cols, len_k,
                                                             off, c, win_left, win_right, HAS_LEFT, HAS_RIGHT, FP8)
                        pv_out = warpgroup_mma_wait(num_outstanding=0, deps=(pv_tok, ))
                        async_copy.mbarrier_arrive(v_empty.index(ps), increment_count=False)  # done with V_{j-1}
                        if FP8:
                            acc = (acc + pv_out * vs) * gl.convert_layout(alpha, row_o)[:, None]
                            vs = vs_next
                        else:
                            acc = pv_out * gl.convert_layout(alpha, row_o)[:, None]
                        pv = gl.convert_layout(p.to(dtype), p_layout)
                    last = used + n_blocks - 1
                    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
                    if FP8:
                        vt = v_smem.index(last % STAGES).reshape([HEAD_DIM, BLOCK_N]).permute((1, 0))
                        pv_tok = warpgroup_mma(pv, vt, gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout),
                                               use_acc=False, is_async=True)
                        acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(pv_tok, )) * vs
                    else:
                        v_last = v_smem.index(last % STAGES).reshape([BLOCK_N, HEAD_DIM])
                        acc = warpgroup_mma(pv, v_last, acc, is_async=True)
                        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                    async_copy.mbarrier_arrive(v_empty.index(last % STAGES), increment_count=False)
                    used += n_blocks
                async_copy.mbarrier_arrive(q_empty.index(WG), increment_count=False)
                it += 1
                if m0 < len_q:  # a part whose rows all lie past the end stores nothing
                    empty = l_i == 0.0
                    l_safe = gl.where(empty, 1.0, l_i)
                    out = acc / gl.convert_layout(l_safe, row_o)[:, None]
                    if FP8:  # l carries the factor 448 of P
                        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe) - LOG2_P_SCALE) * LN2)
                    else:
                        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
                    gl.store(Lse + lse_base + rows, lse, mask=rows < len_q)
                    if VARLEN:
                        if m0 + ROWS <= len_q:
                            _tma_store(o_desc, o_smem, out.to(out_dtype), b, first + m0, h, WG)
                        else:  # the document's last rows: rows past its end belong to the next document
                            o_rows = m0 + gl.arange(0, ROWS, row_o)
                            o_cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_layout))
                            ptr = Out + (first + o_rows).to(gl.int64)[:, None] * (n_heads * HEAD_DIM) + h * HEAD_DIM
                            gl.store(ptr + o_cols[None, :], out.to(out_dtype), mask=(o_rows < len_q)[:, None])
                    else:  # the descriptor drops rows past Nq
                        _tma_store(o_desc, o_smem, out.to(out_dtype), b, m0, h, WG)
    tma.store_wait(pendings=0)


@gluon.jit
def _ws_producer(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, VARLEN: gl.constexpr, PER_ITEM: gl.constexpr,
                 SCHEDULED: gl.constexpr, CONSUMERS: gl.constexpr, FP8: gl.constexpr):
    """One warp: TMA-loads each work item's Q, one part per consumer, and its K and V blocks into their rings, ahead
    of the consumers. K_j goes before V_{j-1}: a V stage frees a step later than a K stage. FP8: V is transposed,
    (B, Hkv, D, keys), and its blocks are D x BLOCK_N."""
    (q_desc, k_desc, v_desc, o_desc, Out, Lse, Plan, CuQ, CuK, Sched, q_smem, o_smem, k_smem, v_smem, q_ready,
     q_empty, k_ready, v_ready, k_empty, v_empty, n_work, n_slots, n_bh, chunk, n_heads, group, seqlen_q, seqlen_k,
     lse_stride, qk_scale, win_left, win_right, QScale, KScale, VScale, n_qblocks, n_kblocks) = args
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    issued = 0
    it = 0
    for i in range(gl.program_id(0), n_work, gl.num_programs(0)):
        w = _scheduled(Sched, i, SCHEDULED)
        for half in range(PER_ITEM):
            b, h, tile, lo, lo_full, hi_full, hi, first, first_k, len_q, len_k, lse_base = _item(
                w, half, Plan, CuQ, CuK, n_slots, n_bh, chunk, n_heads, seqlen_q, seqlen_k, lse_stride, win_left,
                win_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, VARLEN, PER_ITEM)
            if hi >= 0:
                hkv = h // group
                n_blocks = gl.cdiv(hi - lo, BLOCK_N)
                for c in gl.static_range(CONSUMERS):
                    mbarrier.wait(q_empty.index(c), (it & 1) ^ 1)  # fresh barriers pass phase 1: the first wait is free
                    mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
                    tma_load(q_desc, [b, first + tile * BLOCK_M + c * ROWS, h, 0], q_ready.index(c),
                             q_smem.index(c))
                for j in range(n_blocks + 1):  # K_j, then V_{j-1} (FA3's order)
                    if j < n_blocks:
                        st = (issued + j) % STAGES
                        mbarrier.wait(k_empty.index(st), (((issued + j) // STAGES) & 1) ^ 1)
                        key = first_k + _key(lo, j, n_blocks, half, BLOCK_N)
                        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
                        tma_load(k_desc, [b, key, hkv, 0], k_ready.index(st), k_smem.index(st))
                    if j > 0:
                        st = (issued + j - 1) % STAGES
                        mbarrier.wait(v_empty.index(st), (((issued + j - 1) // STAGES) & 1) ^ 1)
                        key = first_k + _key(lo, j - 1, n_blocks, half, BLOCK_N)
                        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
                        if FP8:
                            tma_load(v_desc, [b, hkv, 0, key], v_ready.index(st), v_smem.index(st))
                        else:
                            tma_load(v_desc, [b, key, hkv, 0], v_ready.index(st), v_smem.index(st))
                issued += n_blocks
                it += 1


@gluon.jit
def _fwd_ws_kernel(q_desc, k_desc, v_desc, o_desc, Out, Lse, Plan, CuQ, CuK, Sched, n_work, n_slots, n_bh, chunk,
                   n_heads, group, seqlen_q, seqlen_k, lse_stride, qk_scale, win_left, win_right, QScale, KScale,
                   VScale, n_qblocks, n_kblocks,
                   HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, VARLEN: gl.constexpr, PER_ITEM: gl.constexpr,
                   SCHEDULED: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, FP8: gl.constexpr,
                   QBLOCK_M: gl.constexpr, QBLOCK_N: gl.constexpr, num_warps: gl.constexpr):
    """Warp-specialized: CONSUMERS (2 or 3) consumer warpgroups (the default partition and workers) each own
    BLOCK_M / CONSUMERS rows of the query tile, and a one-warp producer streams Q and the K/V ring. q_desc / o_desc
    boxes are BLOCK_M / CONSUMERS rows. Program p runs positions p, p + programs, ... below n_work: work item w =
    position, or with SCHEDULED w = Sched[position] (plan.balanced_schedule; -1: nothing). FP8: q/k/v_desc are
    e4m3 (v_desc over V transposed) with their scales in QScale (B, H, n_qblocks) and KScale / VScale
    (B, Hkv, n_kblocks); otherwise those go unread."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    o_smem = gl.allocate_shared_memory(o_desc.dtype, [CONSUMERS] + o_desc.block_type.shape, o_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=128)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=128 * CONSUMERS)  # every thread of every consumer arrives
        mbarrier.init(v_empty.index(i), count=128 * CONSUMERS)
    args = (q_desc, k_desc, v_desc, o_desc, Out, Lse, Plan, CuQ, CuK, Sched, q_smem, o_smem, k_smem, v_smem,
            q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, n_work, n_slots, n_bh, chunk, n_heads, group,
            seqlen_q, seqlen_k, lse_stride, qk_scale, win_left, win_right, QScale, KScale, VScale, n_qblocks,
            n_kblocks)
    if CONSUMERS == 3:
        gl.warp_specialize([
            (_ws_consumer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, VARLEN, PER_ITEM,
                            SCHEDULED, 3, 0, FP8, QBLOCK_M, QBLOCK_N)),
            (_ws_consumer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, VARLEN, PER_ITEM,
                            SCHEDULED, 3, 1, FP8, QBLOCK_M, QBLOCK_N)),
            (_ws_consumer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, VARLEN, PER_ITEM,
                            SCHEDULED, 3, 2, FP8, QBLOCK_M, QBLOCK_N)),
            (_ws_producer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, VARLEN, PER_ITEM,
                            SCHEDULED, 3, FP8)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([
            (_ws_consumer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, VARLEN, PER_ITEM,
                            SCHEDULED, 2, 0, FP8, QBLOCK_M, QBLOCK_N)),
            (_ws_consumer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, VARLEN, PER_ITEM,
                            SCHEDULED, 2, 1, FP8, QBLOCK_M, QBLOCK_N)),
            (_ws_producer, (args, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, VARLEN, PER_ITEM,
                            SCHEDULED, 2, FP8)),
        ], [4, 1], [CONSUMER_REGS, 24])


# -- host side ---------------------------------------------------------------------------------------------

GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32,
             torch.float8_e4m3fn: gl.float8e4nv}


def block_layout(block_shape, dtype):
    return gl.NVMMASharedLayout.get_default_for(block_shape, GL_DTYPES[dtype])


def descriptor(t: torch.Tensor, block_rows: int, block_cols: int | None = None) -> TensorDescriptor:
    """4-D (B, N, H, D) descriptor whose box is one head's block_rows x D tile (x block_cols, if given); rows past N
    read as zero and are dropped on store."""
    block = [1, block_rows, 1, block_cols or t.shape[-1]]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, block_layout(block, t.dtype))


def num_sms(device) -> int:
    return device_props(device).multi_processor_count


def l2_bytes(device) -> int:
    return device_props(device).L2_cache_size


def fwd_config(head_dim: int, varlen: bool = False, fp8: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, STAGES) of the forward at this head dim: dense, packed documents or FP8."""
    return (FWD_FP8_CONFIG if fp8 else FWD_VARLEN_CONFIG if varlen else FWD_CONFIG)[head_dim]


def _launch(q4, k4, v4, out4, out, lse, table, cu_q, cu_k, n_bh, n_heads, group, seqlen_q, seqlen_k,
            lse_stride, causal, softmax_scale, window_size, varlen, per_item=1, make=None, fq=None):
    """One persistent launch over (table rows / per_item) x n_bh work items, per_item plan rows each;
    q4/k4/v4/out4 are (B, N, H, D) views. make: the dense table's planner (forward_plan or forward_pairs), whose
    tile costs balance the programs' work (plan.balanced_schedule); packed documents (make None) go round robin.
    FP8: fq is the attention.fp8.Fp8Qkv that q4 / k4 are, and v4 its v_t (B, Hkv, D, Nk_pad)."""
    D = q4.shape[-1]
    block_m, block_n, stages = fwd_config(D, varlen, fq is not None)
    n_wg = consumers(block_m)
    left, right = window_sides(causal, window_size)
    n_slots = table.shape[0] // per_item
    n_work = n_slots * n_bh
    programs = persistent_grid(n_work, num_sms(q4.device))
    chunk = heads_per_chunk(n_bh, seqlen_k, D, q4.element_size(), l2_bytes(q4.device))
    if fq is None:  # the scale arguments go unread
        v_desc, scales, qblocks = descriptor(v4, block_n), (table, table, table, 0, 0), (1, 1)
    else:
        block = [1, 1, D, block_n]
        v_desc = TensorDescriptor(v4, list(v4.shape), list(v4.stride()), block, block_layout(block, v4.dtype))
        scales = (fq.q_scale, fq.k_scale, fq.v_scale, fq.q_scale.shape[-1], fq.k_scale.shape[-1])
        qblocks = (fq.block_m, fq.block_n)
    sched = table
    if make is not None:
        sched = cached_schedule(make, seqlen_q, seqlen_k, causal, window_size, block_m, block_n, per_item, n_bh,
                                chunk, programs, q4.device)
    args = (out, lse, table, cu_q, cu_k, sched, sched.shape[0] if make is not None else n_work, n_slots, n_bh, chunk,
            n_heads, group, seqlen_q, seqlen_k, lse_stride, float(softmax_scale) * LOG2E, max(left, 0), max(right, 0),
            *scales)
    consts = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, HAS_LEFT=left >= 0,
                  HAS_RIGHT=right >= 0, VARLEN=varlen, PER_ITEM=per_item, SCHEDULED=make is not None,
                  CONSUMERS=n_wg, FP8=fq is not None, QBLOCK_M=qblocks[0], QBLOCK_N=qblocks[1])
    with torch.cuda.device(q4.device):  # Q and O move in parts: one per consumer warpgroup
        _fwd_ws_kernel[(programs,)](descriptor(q4, block_m // n_wg), descriptor(k4, block_n), v_desc,
                                    descriptor(out4, block_m // n_wg), *args, **consts,
                                    CONSUMER_REGS=WS_REGS[n_wg][1], num_warps=4, maxnreg=WS_REGS[n_wg][0])


def gluon_attn_forward(q, k, v, causal, softmax_scale, window_size):
    return _dense_forward(q, k, v, q.dtype, causal, softmax_scale, window_size)


def gluon_fp8_forward(fq, causal: bool, softmax_scale: float, out_dtype=torch.bfloat16):
    """FP8 forward on this pipeline: fq (attention.fp8.Fp8Qkv, covered: plan.fp8_uncovered_reason is None) ->
    (out (B, Nq, H, D) out_dtype, lse (B, H, Nq) fp32 natural log), the arithmetic of
    attention.fp8.emulate_fp8_attention (and of the Triton FP8 kernel, attention/fp8/kernel.py)."""
    return _dense_forward(fq.q, fq.k, fq.v_t, out_dtype, causal, softmax_scale, (-1, -1), fq)


def _dense_forward(q, k, v, out_dtype, causal, softmax_scale, window_size, fq=None):
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    block_m, block_n, _ = fwd_config(D, fp8=fq is not None)
    out = torch.empty((B, Nq, H, D), dtype=out_dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    # FP8 tiles go one by one: a pair's second tile walks its keys last first, which would round P at other running
    # maxima than attention.fp8.emulate_fp8_attention, the FP8 kernels' oracle
    paired = fq is None and pairs_tiles(causal, window_size, H // Hkv, D)
    make = forward_pairs if paired else forward_plan
    table = cached_table(make, Nq, Nk, causal, window_size, block_m, block_n, q.device)
    _launch(q, k, v, out, out, lse, table, table, table, B * H, H, H // Hkv, Nq, Nk, Nq, causal, softmax_scale,
            window_size, False, 2 if paired else 1, make, fq)
    return out, lse


def gluon_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                              window_size):
    """Packed documents: q (total_q, H, D), k/v (total_k, Hkv, D), cu_seqlens int32 (n_docs + 1) on the GPU ->
    (out (total_q, H, D), lse (H, total_q)). Document d is rows cu_q[d]:cu_q[d+1] against keys cu_k[d]:cu_k[d+1],
    bottom-right aligned like the dense call. The host never reads the lengths: plan.document_tiles lists the
    (document, tile) pairs on the GPU."""
    total_q, H, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    out = torch.empty((total_q, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse
    table = document_tiles(cu_seqlens_q, total_q, FWD_VARLEN_CONFIG[D][0])
    _launch(q[None], k[None], v[None], out[None], out, lse, table, cu_seqlens_q, cu_seqlens_k, H, H, H // Hkv,
            int(max_seqlen_q), total_k, total_q, causal, softmax_scale, window_size, True)
    return out, lse
