"""Triton FlashAttention forward: online softmax over K/V blocks, lse out, dense and varlen in one kernel.

    out, lse = triton_attn_forward(q, k, v, causal=True, softmax_scale=0.125, window_size=(-1, -1))

q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> out (B, Nq, H, D), lse (B, H, Nq) fp32 natural log. Varlen takes
packed (total, H, D) tensors with cu_seqlens and returns lse (H, total_q). One program handles BLOCK_M
query rows of one head; GQA maps query head h to kv head h // (H / Hkv) by index.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, LN2, LOG2E, LONG, MID, SHORT, block_d, doc_bounds, key_segments, launch,
                            length_class, load_rows, prune_configs, stand_in_qkv, store_rows, tile_configs,
                            visible, wants_stand_in, window_flags)

FWD_HEAD_DIMS = (32, 64, 96, 128, 256)
BWD_HEAD_DIMS = (32, 64, 96, 128)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start, end,
               offs_m, offs_n, offs_d, seqlen_q, seqlen_k, qk_scale, win_left, win_right,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr):
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPEC):
        # -- scores in base 2: scale * log2(e) is folded into one multiply ----
        if USE_TMA:
            k = k_desc.load([start_n, 0])
        else:
            k = load_rows(k_base, start_n + offs_n, stride_kn, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            keep = visible(offs_m, start_n + offs_n, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT,
                           HAS_RIGHT)
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
        else:
            # no mask: the max and the shift fuse into one FMA per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        # -- lazy rescale: the accumulator is corrected by alpha, normalised once after the loop ----
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_desc.load([start_n, 0])
        else:
            v = load_rows(v_base, start_n + offs_n, stride_vn, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, CuQ, CuK,
                stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh, stride_lb, stride_lh,
                seqlen_q_dense, seqlen_k_dense, n_heads, group, max_seqlen_q, qk_scale, win_left, win_right,
                len_class,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr):
    # heaviest causal tiles (last query blocks) first, so the tail of the grid is short work
    start_m = tl.cdiv(max_seqlen_q, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    q_start, seqlen_q = doc_bounds(CuQ, b, seqlen_q_dense, IS_VARLEN)
    k_start, seqlen_k = doc_bounds(CuK, b, seqlen_k_dense, IS_VARLEN)
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return  # varlen: this document is shorter than the longest one
    hk = h // group
    q_base = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qn + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + hk * stride_vh
    o_base = Out + b.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_on + h * stride_oh
    lse_base = Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_desc = k_base
    v_desc = v_base
    if USE_TMA:
        # per-document descriptors: the copy engine zero-fills rows past this document's end
        rows_k = tl.maximum(seqlen_k, 1)  # a descriptor needs a non-empty shape even if no key is read
        k_desc = tl.make_tensor_descriptor(k_base, [rows_k, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, [rows_k, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])
    q = load_rows(q_base, offs_m, stride_qn, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)

    # finite start for the running max: a row that sees no key never computes exp2(-inf - -inf)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, a, c, hi = key_segments(m0, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT, HAS_RIGHT,
                                BLOCK_M, BLOCK_N)
    if HAS_LEFT:  # only a left window edge can put masked blocks before the interior
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
                                   lo, a, offs_m, offs_n, offs_d, seqlen_q, seqlen_k, qk_scale, win_left,
                                   win_right, True, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_D, BLOCK_N,
                                   USE_TMA, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
                               a, c, offs_m, offs_n, offs_d, seqlen_q, seqlen_k, qk_scale, win_left,
                               win_right, False, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_D, BLOCK_N,
                               USE_TMA, WARP_SPEC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
                               c, hi, offs_m, offs_n, offs_d, seqlen_q, seqlen_k, qk_scale, win_left,
                               win_right, True, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_D, BLOCK_N,
                               USE_TMA, False)

    # -- epilogue: one division; rows that saw no key get out 0 and lse -inf ----
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    store_rows(o_base, offs_m, stride_on, seqlen_q, offs_d, out.to(Out.dtype.element_ty), HEAD_DIM, BLOCK_D)
    tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen_q)


# -- configs: one list, pruned per call; tuned once per (HEAD_DIM, window flags, TMA, dtype, length class) ----

FWD_CONFIGS = tile_configs([(128, 128, 8, 3, True), (128, 64, 8, 3, True), (128, 64, 4, 3, False),
                             (128, 128, 4, 3, False), (128, 128, 8, 2, False), (64, 64, 4, 3, False)])
# H100 sweeps (docs/bench/sweep_fwd_h100_32k.json, sweep_fwd_h100_2k_8k.json): at D=128 with TMA loads the
# 128x128 warp-specialised tile wins from 4K up, causal and not (454-503 TFLOPS); under 4K (B*N fixed, so many
# short programs) 64x64 with 4 warps wins, 496 vs 458 non-causal and 399 vs 358 causal at 2K, and is far behind
# at 4K (396 vs 486). Autotuning among near-ties picked slower tiles from run to run, hence the pins.
_FWD_D128_TMA = {LONG: dict(BLOCK_M=128, BLOCK_N=128, WARP_SPEC=True, num_warps=8, num_stages=3),
                 SHORT: dict(BLOCK_M=64, BLOCK_N=64, WARP_SPEC=False, num_warps=4, num_stages=3)}
_FWD_D128_TMA[MID] = _FWD_D128_TMA[LONG]


def _prune_fwd(configs, named_args, **kwargs):
    keep = prune_configs(configs, named_args, **kwargs)
    if kwargs["BLOCK_D"] == 128 and kwargs["USE_TMA"]:
        want = _FWD_D128_TMA[named_args["len_class"]]
        pinned = [c for c in keep if {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} == want]
        keep = pinned or keep
    return keep


fwd_tuned = triton.autotune(FWD_CONFIGS, key=["HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "USE_TMA", "len_class"],
                             prune_configs_by={"early_config_prune": _prune_fwd})(_fwd_kernel)
# the interpreter runs one small tile (it is for logic, not speed)
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "WARP_SPEC": False}


def check_triton_supported(fn_name: str, q: torch.Tensor, k: torch.Tensor) -> None:
    """ValueError (naming the argument) for inputs the Triton kernels do not handle."""
    dims = BWD_HEAD_DIMS if "backward" in fn_name else FWD_HEAD_DIMS
    d = q.shape[-1]
    if d not in dims:
        raise ValueError(f"{fn_name}: head_dim {d} (q {tuple(q.shape)}) is not supported by the triton "
                         f"backend; use one of {dims}")
    if q.is_cuda:
        if INTERPRET:
            return
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            raise ValueError(f"{fn_name}: q is on {q.device}, compute capability "
                             f"{torch.cuda.get_device_capability(q.device)}; the triton backend needs sm_80+")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{fn_name}: q dtype {q.dtype} is not supported by the triton backend on GPU; "
                             "use fp16 or bf16")
        return
    if not INTERPRET:
        raise ValueError(f"{fn_name}: q is on {q.device}; the triton backend needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before importing triton, for tests on CPU)")
    if q.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"{fn_name}: q dtype {q.dtype} is not supported by the Triton interpreter; "
                         "use fp16 or fp32 (bf16 runs on GPU only)")


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_fwd(q, k, v, out, lse, cu_q, cu_k, strides_b, lse_strides, seqlen_q, seqlen_k, max_q, max_k,
                n_batch, causal, softmax_scale, window_size):
    """Shared launcher; strides_b are the batch strides (0 for packed varlen tensors)."""
    has_left, has_right, left, right = window_flags(causal, window_size)
    n_heads, d = q.shape[-2], q.shape[-1]
    group = n_heads // k.shape[-2]
    varlen = cu_q is not None
    args = [q, k, v, out, lse, cu_q if varlen else q, cu_k if varlen else q,
            strides_b[0], q.stride(-3), q.stride(-2), strides_b[1], k.stride(-3), k.stride(-2),
            strides_b[2], v.stride(-3), v.stride(-2), strides_b[3], out.stride(-3), out.stride(-2),
            lse_strides[0], lse_strides[1], seqlen_q, seqlen_k, n_heads, group, max_q,
            softmax_scale * LOG2E, left, right, length_class(max(max_q, max_k))]
    consts = dict(HEAD_DIM=d, BLOCK_D=block_d(d), IS_VARLEN=varlen, HAS_LEFT=has_left, HAS_RIGHT=has_right)
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_batch * n_heads)  # noqa: E731
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        launch(_fwd_kernel, fwd_tuned, _INTERPRET_CONFIG, grid, args, consts, q)


def _tune_on_stand_in(q, k, causal, softmax_scale, window_size, max_len, varlen):
    """The first call of its kind above STAND_IN["above"] tokens runs on a stand-in first, so the autotuner times
    its tiles there (triton_common.STAND_IN). The kind: what decides the forward's autotune key."""
    tag = ("fwd", q.device, q.dtype, q.shape[-1], window_flags(causal, window_size)[:2], varlen)
    if not wants_stand_in(tag, max_len, q):
        return
    qs, ks, vs, cu = stand_in_qkv(q, k, varlen)
    if varlen:
        n = qs.shape[0]
        triton_attn_varlen_forward(qs, ks, vs, cu, cu, n, n, causal, softmax_scale, window_size)
    else:
        triton_attn_forward(qs, ks, vs, causal, softmax_scale, window_size)


def triton_attn_forward(q, k, v, causal, softmax_scale, window_size):
    """q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> (out (B, Nq, H, D), lse (B, H, Nq) fp32, natural log)."""
    _tune_on_stand_in(q, k, causal, softmax_scale, window_size, max(q.shape[1], k.shape[1]), False)
    q, k, v = _contig(q), _contig(k), _contig(v)
    B, nq, H, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, nq, dtype=torch.float32, device=q.device)
    _launch_fwd(q, k, v, out, lse, None, None, (q.stride(0), k.stride(0), v.stride(0), out.stride(0)),
                (lse.stride(0), lse.stride(1)), nq, k.shape[1], nq, k.shape[1], B, causal, softmax_scale, window_size)
    return out, lse


def triton_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                               softmax_scale, window_size):
    """Packed q (total_q, H, D), k/v (total_k, Hkv, D) -> (out (total_q, H, D), lse (H, total_q))."""
    _tune_on_stand_in(q, k, causal, softmax_scale, window_size, max(int(max_seqlen_q), int(max_seqlen_k)), True)
    q, k, v = _contig(q), _contig(k), _contig(v)
    total_q, H, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    n_batch = cu_seqlens_q.numel() - 1
    _launch_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, (0, 0, 0, 0), (0, lse.stride(0)), 0, 0,
                int(max_seqlen_q), int(max_seqlen_k), n_batch, causal, softmax_scale, window_size)
    return out, lse
