"""Triton FlashAttention backward: preprocess (delta, base-2 lse), a dK/dV kernel and a dQ kernel.

    dq, dk, dv = triton_attn_backward(dout, q, k, v, out, lse, causal, softmax_scale, window_size, dlse)
    dq, dk, dv = triton_attn_backward(..., dlse, deterministic=False)   # atomic dQ: one kernel fewer, run-to-run noise

P is recomputed from q, k and the saved lse (no N x N storage). dlse, the gradient flowing into lse,
enters as delta_i = rowsum(dout_i * out_i) - dlse_i.

Deterministic (default), no atomics: a dK/dV program owns one key block of one kv head and sums over the
query heads of its GQA group in a fixed order; a dQ program owns one query block of one head. That costs
7 tile GEMMs per (query block, key block) pair instead of 5, as the dQ pass recomputes QK^T and dO V^T.
deterministic=False (ATOMIC_DQ) skips the dQ kernel: the dK/dV program also forms dS K for every tile
and float-atomically adds it into a zeroed fp32 dQ buffer, so the summation order (and the last bits
of dq) varies from run to run.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .common import (FEATURES, INTERPRET, LOG2E, atomic_add_rows, block_d, doc_bounds, key_segments, launch,
                            length_class, load_rows, load_tile, prune_configs, query_segments, stand_in_qkv,
                            store_rows, tile_configs, visible, visible_t, wants_stand_in, window_flags)
from .fwd import triton_attn_forward, triton_attn_varlen_forward


@triton.jit
def _preprocess_kernel(Out, DO, Lse, DLse, Delta, Lse2, CuQ,
                       stride_ob, stride_on, stride_oh, stride_db, stride_dn, stride_dh, stride_lb, stride_lh,
                       seqlen_q_dense, n_heads,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) - dlse in fp32, and lse in base 2 with -inf replaced by 0.

    The replacement is safe: a row whose lse is -inf sees no key, so every score it meets is masked to
    p = 0; a finite lse keeps exp2(score - lse) from ever computing inf - inf.
    """
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    q_start, seqlen_q = doc_bounds(CuQ, b, seqlen_q_dense, IS_VARLEN)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if tl.program_id(0) * BLOCK_M >= seqlen_q:
        return
    offs_d = tl.arange(0, BLOCK_D)
    o_base = Out + b.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_on + h * stride_oh
    do_base = DO + b.to(tl.int64) * stride_db + q_start.to(tl.int64) * stride_dn + h * stride_dh
    row = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    in_doc = offs_m < seqlen_q
    o = load_rows(o_base, offs_m, stride_on, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = load_rows(do_base, offs_m, stride_dn, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=in_doc, other=0.0)
    lse = tl.load(Lse + row, mask=in_doc, other=0.0)
    tl.store(Delta + row, delta, mask=in_doc)
    tl.store(Lse2 + row, tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634), mask=in_doc)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_src, do_src, dq_dst, lse_base, delta_base, stride_qn, stride_dn, stride_dqn,
                start, end, offs_n, offs_d, seqlen_q, seqlen_k, qk_scale, softmax_scale, win_left, win_right,
                MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA_REDUCE: tl.constexpr,
                EARLY_DP: tl.constexpr):
    """q_src / do_src are tensor descriptors (USE_TMA) or base pointers; dq_dst (ATOMIC_DQ only) is the fp32
    dQ accumulator of this head: a descriptor (TMA_REDUCE) or a base pointer."""
    for start_m in tl.range(start, end, BLOCK_M, warp_specialize=WARP_SPEC):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(q_src, start_m, offs_m, stride_qn, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, MASKED, USE_TMA)
        if MASKED:
            lse2 = tl.load(lse_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m)
        # -- recompute P^T (keys x queries) from the saved lse: no running max needed ----
        s_t = tl.dot(k, tl.trans(q))
        if EARLY_DP:  # issue dP^T right behind S^T: its GEMM can run while exp2 works on S^T (FA2/FA3 order)
            do = load_tile(do_src, start_m, offs_m, stride_dn, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, MASKED,
                            USE_TMA)
            dp_t = tl.dot(v, tl.trans(do))
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        if MASKED:
            keep = visible_t(offs_n, offs_m, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT, HAS_RIGHT)
            p_t = tl.where(keep, p_t, 0.0)
        if not EARLY_DP:
            do = load_tile(do_src, start_m, offs_m, stride_dn, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, MASKED,
                            USE_TMA)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        if MASKED:
            delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            delta = tl.load(delta_base + offs_m)
        # -- dS^T = P^T * (dP^T - delta); dK accumulates dS^T Q (softmax scale applied once at the end) ----
        if not EARLY_DP:
            dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk)
        if ATOMIC_DQ:  # this tile's share of dQ = dS K; masked pairs have dS = 0, so they add nothing
            dq = tl.dot(tl.trans(ds_t), k) * softmax_scale
            if USE_TMA:  # (nested, not `and`: constexpr-only branches whatever this Triton does with `and`)
                if TMA_REDUCE:
                    dq_dst.atomic_add([start_m, 0], dq)  # the copy engine drops rows past the document's end
                else:
                    atomic_add_rows(dq_dst, offs_m, stride_dqn, seqlen_q, offs_d, dq, HEAD_DIM, BLOCK_D, MASKED)
            else:
                atomic_add_rows(dq_dst, offs_m, stride_dqn, seqlen_q, offs_d, dq, HEAD_DIM, BLOCK_D, MASKED)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, DQ, Lse2, Delta, CuQ, CuK,
                 stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                 stride_vb, stride_vn, stride_vh, stride_db, stride_dn, stride_dh,
                 stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                 stride_dqb, stride_dqn, stride_dqh, stride_lb, stride_lh,
                 seqlen_q_dense, seqlen_k_dense, n_kv_heads, group, qk_scale, softmax_scale, win_left, win_right,
                 len_class,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                 TMA_REDUCE: tl.constexpr, EARLY_DP: tl.constexpr = False):
    """DQ: the fp32 dQ accumulator (ATOMIC_DQ; each query head's rows get their own atomics), else unused."""
    bhk = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    q_start, seqlen_q = doc_bounds(CuQ, b, seqlen_q_dense, IS_VARLEN)
    k_start, seqlen_k = doc_bounds(CuK, b, seqlen_k_dense, IS_VARLEN)
    n0 = tl.program_id(0) * BLOCK_N
    if n0 >= seqlen_k:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + hk * stride_vh
    k = load_rows(k_base, offs_n, stride_kn, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = load_rows(v_base, offs_n, stride_vn, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, a, c, hi = query_segments(n0, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT, HAS_RIGHT,
                                  BLOCK_M, BLOCK_N)
    # GQA: the query heads of this kv head, summed here in a fixed order (dK/dV stay deterministic)
    for g in range(group):
        h = hk * group + g
        q_base = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qn + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_db + q_start.to(tl.int64) * stride_dn + h * stride_dh
        lse_base = Lse2 + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
        delta_base = Delta + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
        q_src = q_base
        do_src = do_base
        dq_dst = DQ + b.to(tl.int64) * stride_dqb + q_start.to(tl.int64) * stride_dqn + h * stride_dqh
        if USE_TMA:  # per-document shape: the copy engine zero-fills rows past the document's end
            rows_q = tl.maximum(seqlen_q, 1)
            q_src = tl.make_tensor_descriptor(q_base, [rows_q, HEAD_DIM], [stride_qn, 1], [BLOCK_M, BLOCK_D])
            do_src = tl.make_tensor_descriptor(do_base, [rows_q, HEAD_DIM], [stride_dn, 1], [BLOCK_M, BLOCK_D])
            if TMA_REDUCE:
                dq_dst = tl.make_tensor_descriptor(dq_dst, [rows_q, HEAD_DIM], [stride_dqn, 1], [BLOCK_M, BLOCK_D])
        if HAS_RIGHT:  # only a causal / right window edge puts masked query blocks before the interior
            dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, dq_dst, lse_base, delta_base, stride_qn, stride_dn,
                                 stride_dqn, lo, a, offs_n, offs_d, seqlen_q, seqlen_k, qk_scale, softmax_scale,
                                 win_left, win_right, True, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_D, BLOCK_M,
                                 USE_TMA, False, ATOMIC_DQ, TMA_REDUCE, EARLY_DP)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, dq_dst, lse_base, delta_base, stride_qn, stride_dn,
                             stride_dqn, a, c, offs_n, offs_d, seqlen_q, seqlen_k, qk_scale, softmax_scale,
                             win_left, win_right, False, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_D, BLOCK_M,
                             USE_TMA, WARP_SPEC, ATOMIC_DQ, TMA_REDUCE, EARLY_DP)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, dq_dst, lse_base, delta_base, stride_qn, stride_dn,
                             stride_dqn, c, hi, offs_n, offs_d, seqlen_q, seqlen_k, qk_scale, softmax_scale,
                             win_left, win_right, True, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_D, BLOCK_M,
                             USE_TMA, False, ATOMIC_DQ, TMA_REDUCE, EARLY_DP)
    dk_base = DK + b.to(tl.int64) * stride_dkb + k_start.to(tl.int64) * stride_dkn + hk * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + k_start.to(tl.int64) * stride_dvn + hk * stride_dvh
    store_rows(dk_base, offs_n, stride_dkn, seqlen_k, offs_d, (dk * softmax_scale).to(DK.dtype.element_ty),
               HEAD_DIM, BLOCK_D)
    store_rows(dv_base, offs_n, stride_dvn, seqlen_k, offs_d, dv.to(DV.dtype.element_ty), HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, start, end, offs_m, offs_n, offs_d,
              seqlen_q, seqlen_k, qk_scale, win_left, win_right,
              MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, EARLY_DP: tl.constexpr):
    """k_src / v_src are tensor descriptors (USE_TMA) or base pointers."""
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPEC):
        k = load_tile(k_src, start_n, start_n + offs_n, stride_kn, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED,
                       USE_TMA)
        v = load_tile(v_src, start_n, start_n + offs_n, stride_vn, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED,
                       USE_TMA)
        s = tl.dot(q, tl.trans(k))
        if EARLY_DP:
            dp = tl.dot(do, tl.trans(v))
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            keep = visible(offs_m, start_n + offs_n, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT,
                           HAS_RIGHT)
            p = tl.where(keep, p, 0.0)
        if not EARLY_DP:
            dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, Lse2, Delta, CuQ, CuK,
               stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
               stride_vb, stride_vn, stride_vh, stride_db, stride_dn, stride_dh,
               stride_dqb, stride_dqn, stride_dqh, stride_lb, stride_lh,
               seqlen_q_dense, seqlen_k_dense, n_heads, group, max_seqlen_q, qk_scale, softmax_scale,
               win_left, win_right, len_class,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, EARLY_DP: tl.constexpr = False):
    start_m = tl.cdiv(max_seqlen_q, BLOCK_M) - 1 - tl.program_id(0)  # heaviest causal blocks first
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    q_start, seqlen_q = doc_bounds(CuQ, b, seqlen_q_dense, IS_VARLEN)
    k_start, seqlen_k = doc_bounds(CuK, b, seqlen_k_dense, IS_VARLEN)
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qn + h * stride_qh
    do_base = DO + b.to(tl.int64) * stride_db + q_start.to(tl.int64) * stride_dn + h * stride_dh
    k_base = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + hk * stride_vh
    row = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    q = load_rows(q_base, offs_m, stride_qn, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = load_rows(do_base, offs_m, stride_dn, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    lse2 = tl.load(Lse2 + row, mask=offs_m < seqlen_q, other=0.0)
    delta = tl.load(Delta + row, mask=offs_m < seqlen_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, a, c, hi = key_segments(m0, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT, HAS_RIGHT,
                                BLOCK_M, BLOCK_N)
    k_src = k_base
    v_src = v_base
    if USE_TMA:
        rows_k = tl.maximum(seqlen_k, 1)  # a descriptor needs a non-empty shape even if no key is read
        k_src = tl.make_tensor_descriptor(k_base, [rows_k, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, [rows_k, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])
    if HAS_LEFT:
        dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, lo, a, offs_m, offs_n,
                       offs_d, seqlen_q, seqlen_k, qk_scale, win_left, win_right, True, HAS_LEFT, HAS_RIGHT,
                       HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA, False, EARLY_DP)
    dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, a, c, offs_m, offs_n,
                   offs_d, seqlen_q, seqlen_k, qk_scale, win_left, win_right, False, HAS_LEFT, HAS_RIGHT,
                   HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA, WARP_SPEC, EARLY_DP)
    dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, c, hi, offs_m, offs_n,
                   offs_d, seqlen_q, seqlen_k, qk_scale, win_left, win_right, True, HAS_LEFT, HAS_RIGHT,
                   HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA, False, EARLY_DP)
    dq_base = DQ + b.to(tl.int64) * stride_dqb + q_start.to(tl.int64) * stride_dqn + h * stride_dqh
    store_rows(dq_base, offs_m, stride_dqn, seqlen_q, offs_d, (dq * softmax_scale).to(DQ.dtype.element_ty),
               HEAD_DIM, BLOCK_D)


# -- configs: one list per kernel, pruned per call; tuned once per (HEAD_DIM, window flags, TMA, dtype) ----

# early_dp (the dP GEMM issued right behind S): on an H100 at D=128 it lifts dK/dV by 1-5% (64x64 w4 s2: 538 -> 557
# causal; 64x128 w8 s3: 509 -> 525 non-causal at 16K); in dQ it moves -2..+1.5%, inside the noise, so dQ keeps
# the shipped order (docs/bench/sweep_order_h100.json, sweep_bwd_h100_16k_early.json)
DKDV_CONFIGS = tile_configs([(64, 128, 8, 3, False, True), (64, 64, 4, 2, False, True), (64, 64, 4, 3, False, True)])
DQ_CONFIGS = tile_configs([(128, 64, 8, 3, False), (64, 64, 4, 3, False), (64, 64, 4, 2, False)])
# the atomic variant holds one more (BLOCK_M, D) fp32 tile per step and issues BLOCK_M*D atomics per tile pair:
# fewer, larger query blocks amortise them. With pointer loads (the default) early dP and 3-4 stages lead:
# H100, 16K, D=128: 64x128 w8 s3 355-395 -> 405-425 with early dP, s4 412-427; 128x64 ~210
# (docs/bench/sweep_atomic_h100_16k.json). Four stages do not fit beside the TMA reduce-add's staging tile.
DKDV_ATOMIC_CONFIGS = tile_configs([(64, 128, 8, 3, False, True), (64, 128, 8, 4, False, True),
                                     (64, 128, 8, 3, False), (64, 128, 8, 2, False), (64, 64, 4, 2, False)])
_KEY = ["HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "USE_TMA", "len_class"]
_PRUNE = {"early_config_prune": prune_configs}
dkdv_tuned = triton.autotune(DKDV_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_dkdv_kernel)
dq_tuned = triton.autotune(DQ_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_dq_kernel)
# autotuning launches the kernel many times: DQ is zeroed before each trial and before the real run
dkdv_atomic_tuned = triton.autotune(DKDV_ATOMIC_CONFIGS, key=_KEY + ["TMA_REDUCE"], prune_configs_by=_PRUNE,
                                     reset_to_zero=["DQ"])(_dkdv_kernel)
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "WARP_SPEC": False}
_PRE_BLOCK = 64


def _contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _qkv_strides(ts, batch_strides):
    """Flat (batch, seq, head) stride list for each tensor; batch stride 0 for packed varlen tensors."""
    out = []
    for t, sb in zip(ts, batch_strides):
        out += [sb, t.stride(-3), t.stride(-2)]
    return out


def _launch_preprocess(out, dout, lse, dlse, cu_q, seqlen_q, max_q, n_batch, varlen):
    """Run _preprocess_kernel: (delta, lse2) shaped like lse. out/dout have unit last stride, lse is contiguous;
    cu_q is any pointer-typed placeholder when not varlen."""
    delta, lse2 = torch.empty_like(lse), torch.empty_like(lse)
    n_heads, d = out.shape[-2], out.shape[-1]
    bstride = (lambda t: 0) if varlen else (lambda t: t.stride(0))  # noqa: E731
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    dlse_arg = dlse.contiguous() if dlse is not None else lse
    _preprocess_kernel[(triton.cdiv(max_q, _PRE_BLOCK), n_batch * n_heads)](
        out, dout, lse, dlse_arg, delta, lse2, cu_q, *_qkv_strides((out, dout), (bstride(out), bstride(dout))),
        *lse_strides, seqlen_q, n_heads,
        HEAD_DIM=d, BLOCK_D=block_d(d), IS_VARLEN=varlen, BLOCK_M=_PRE_BLOCK, HAS_DLSE=dlse is not None)
    return delta, lse2


def preprocess(out, dout, lse, dlse):
    """delta = rowsum(dout * out) - dlse and lse2 = lse * log2(e) (-inf -> 0), both (B, H, Nq) fp32, for dense
    out/dout (B, Nq, H, D) and lse/dlse (B, H, Nq) (dlse may be None): the first step of every backward."""
    out, dout, lse = _contig(out), _contig(dout), lse.contiguous()
    with torch.cuda.device(out.device) if out.is_cuda else nullcontext():
        return _launch_preprocess(out, dout, lse, dlse, out, out.shape[1], out.shape[1], out.shape[0], False)


def _launch_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, seqlen_q, seqlen_k, max_q, max_k, n_batch,
                causal, softmax_scale, window_size, varlen, deterministic):
    dout, q, k, v, out = (_contig(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # deterministic: the dQ kernel writes dq; else the dK/dV kernel adds into a zeroed fp32 dq_acc
    dq = torch.empty_like(q) if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    has_left, has_right, left, right = window_flags(causal, window_size)
    n_heads, d = q.shape[-2], q.shape[-1]
    n_kv = k.shape[-2]
    group = n_heads // n_kv
    bstride = (lambda t: 0) if varlen else (lambda t: t.stride(0))  # noqa: E731
    strides = lambda *ts: _qkv_strides(ts, [bstride(t) for t in ts])  # noqa: E731
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    cu_q = cu_q if varlen else q
    cu_k = cu_k if varlen else q
    consts = dict(HEAD_DIM=d, BLOCK_D=block_d(d), IS_VARLEN=varlen, HAS_LEFT=has_left, HAS_RIGHT=has_right)
    len_class = length_class(max(max_q, max_k))
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        delta, lse2 = _launch_preprocess(out, dout, lse, dlse, cu_q, seqlen_q, max_q, n_batch, varlen)
        base = strides(q, k, v, dout)
        scales = [softmax_scale * LOG2E, softmax_scale]
        dkdv_args = [q, k, v, dout, dk, dv, dq, lse2, delta, cu_q, cu_k, *base, *strides(dk, dv, dq),
                     *lse_strides, seqlen_q, seqlen_k, n_kv, group, *scales, left, right, len_class]
        # atomic dQ: pointer loads + per-element atomics unless FEATURES["tma_reduce"] (the interpreter has no
        # TMA reduce-add: there the flag only switches the loads)
        tma_reduce = not deterministic and FEATURES["tma_reduce"]
        atomic = dict(ATOMIC_DQ=not deterministic, TMA_REDUCE=tma_reduce and not INTERPRET)
        launch(_dkdv_kernel, dkdv_tuned if deterministic else dkdv_atomic_tuned, _INTERPRET_CONFIG,
               lambda m: (triton.cdiv(max_k, m["BLOCK_N"]), n_batch * n_kv), dkdv_args, {**consts, **atomic}, q,
               allow_tma=deterministic or tma_reduce)
        if not deterministic:  # dq_acc already carries softmax_scale; only the cast is left
            return (dq if q.dtype == torch.float32 else dq.to(q.dtype)), dk, dv
        dq_args = [q, k, v, dout, dq, lse2, delta, cu_q, cu_k, *base, *strides(dq), *lse_strides,
                   seqlen_q, seqlen_k, n_heads, group, max_q, *scales, left, right, len_class]
        launch(_dq_kernel, dq_tuned, _INTERPRET_CONFIG,
               lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), n_batch * n_heads), dq_args, consts, q)
    return dq, dk, dv


def _tune_on_stand_in(q, k, causal, softmax_scale, window_size, dlse, deterministic, max_len, varlen):
    """The first call of its kind above STAND_IN["above"] tokens runs a forward and backward on a stand-in first,
    so the autotuners time their tiles there (triton_common.STAND_IN). The kind: what decides the backward
    kernels' autotune keys."""
    tag = ("bwd", q.device, q.dtype, q.shape[-1], window_flags(causal, window_size)[:2], varlen, deterministic,
           FEATURES["tma_reduce"])
    if not wants_stand_in(tag, max_len, q):
        return
    qs, ks, vs, cu = stand_in_qkv(q, k, varlen)
    n = qs.shape[-3]
    if varlen:
        out, lse = triton_attn_varlen_forward(qs, ks, vs, cu, cu, n, n, causal, softmax_scale, window_size)
    else:
        out, lse = triton_attn_forward(qs, ks, vs, causal, softmax_scale, window_size)
    dout, dlse = torch.randn_like(out), None if dlse is None else torch.zeros_like(lse)
    if varlen:
        triton_attn_varlen_backward(dout, qs, ks, vs, out, lse, cu, cu, n, n, causal, softmax_scale, window_size,
                                    dlse, deterministic)
    else:
        triton_attn_backward(dout, qs, ks, vs, out, lse, causal, softmax_scale, window_size, dlse, deterministic)


def triton_attn_backward(dout, q, k, v, out, lse, causal, softmax_scale, window_size, dlse, deterministic=True):
    """Gradients of attention for q (B, Nq, H, D), k/v (B, Nk, Hkv, D); lse/dlse (B, H, Nq) fp32.

    deterministic=False: atomic dQ accumulation (one kernel fewer, run-to-run variation in dq's last bits)."""
    B, nq = q.shape[:2]
    nk = k.shape[1]
    _tune_on_stand_in(q, k, causal, softmax_scale, window_size, dlse, deterministic, max(nq, nk), False)
    return _launch_bwd(dout, q, k, v, out, lse, dlse, None, None, nq, nk, nq, nk, B, causal, softmax_scale,
                       window_size, varlen=False, deterministic=deterministic)


def triton_attn_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                causal, softmax_scale, window_size, dlse, deterministic=True):
    """Packed-document gradients: q (total_q, H, D), k/v (total_k, Hkv, D), lse/dlse (H, total_q)."""
    n_batch = cu_seqlens_q.numel() - 1
    _tune_on_stand_in(q, k, causal, softmax_scale, window_size, dlse, deterministic,
                      max(int(max_seqlen_q), int(max_seqlen_k)), True)
    return _launch_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, 0, 0, int(max_seqlen_q),
                       int(max_seqlen_k), n_batch, causal, softmax_scale, window_size, varlen=True,
                       deterministic=deterministic)
