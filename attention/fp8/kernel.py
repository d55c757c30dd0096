"""Triton FP8 attention forward (Hopper): e4m3 Q/K/V with per-block scales, online softmax in fp32.

    fq = attention.fp8.quantize_qkv(q, k, v)
    out, lse = triton_fp8_forward(fq, causal=True, softmax_scale=0.125, out_dtype=torch.bfloat16)

fq.q (B, Nq, H, D), fq.k (B, Nk, Hkv, D) and fq.v_t (B, Hkv, D, Nk_pad) are float8_e4m3fn; out is
(B, Nq, H, D) in out_dtype, lse (B, H, Nq) fp32 natural log (base 2 inside the kernel). Per block:
  s   = dot(q8, k8^T) * (q_scale * k_scale * softmax_scale * log2 e)     -- one multiply folds every scale
  p   = exp2(s - m + log2 448) = 448 * P, P in [0, 1]: the e4m3 range, with no extra multiply
  l   = l * alpha + rowsum(p)                                           -- in fp32, before rounding
  acc = acc * alpha + dot(e4m3(p), v8) * v_scale                        -- fresh fp32 tile per block
out = acc / l (the 448 cancels) and lse = m + log2(l) - log2(448).
The fresh P·V tile (instead of accumulating inside the MMA) is what lets each K block carry its own V
scale, and it keeps Hopper's reduced-precision FP8 accumulation to one block's BLOCK_N terms.
Hopper's FP8 MMA reads its B operand K-major only, hence V transposed: v_t tiles load as (D, BLOCK_N).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext as _nullcontext

import torch
import triton
import triton.language as tl

from ..triton.common import (INTERPRET, LN2, LOG2E, key_segments, load_rows, stand_in_qkv, store_rows, visible,
                            wants_stand_in)

FP8_HEAD_DIMS = (64, 128)
E4M3_MAX: tl.constexpr = tl.constexpr(448.0)
LOG2_P_SCALE: tl.constexpr = tl.constexpr(8.807354922057604)  # log2(448): P in [0, 1] -> [0, 448]


@triton.jit
def _round_e4m3(x):
    """x >= 0 (fp32) rounded to the nearest e4m3 value, still fp32.

    Only for the interpreter: its fp32 -> fp8 cast drops the mantissa carry (1.97 * 2^-6 becomes 2^-6);
    values that are already exact e4m3 cast correctly. The GPU's cvt.rn needs none of this.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20  # round-to-nearest-even to 3 mantissa bits
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (x + 16384.0) - 16384.0  # e4m3 subnormals are multiples of 2^-9: fp32 ulp of 2^14
    return tl.where(x < 0.015625, subnormal, normal)


@triton.jit
def _fp8_inner(acc, l_i, m_i, q, k_base, vt_base, k_desc, vt_desc, ks_base, vs_base, stride_kn, stride_vd,
               start, end, offs_m, offs_n, offs_d, seqlen_q, seqlen_k, qk_scale,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               QBLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, ROUND_P: tl.constexpr):
    for start_n in tl.range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)  # no left window: every segment starts on a block edge
        # -- scores in base 2; q/k scales and softmax_scale * log2(e) are one scalar per block ----
        if USE_TMA:
            k = k_desc.load([start_n, 0])
        else:
            k = load_rows(k_base, start_n + offs_n, stride_kn, seqlen_k, offs_d, HEAD_DIM, HEAD_DIM, MASKED)
        c = qk_scale * tl.load(ks_base + start_n // QBLOCK_N)
        v_scale = tl.load(vs_base + start_n // QBLOCK_N)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            keep = visible(offs_m, start_n + offs_n, seqlen_q, seqlen_k, 0, 0, False, IS_CAUSAL)
            qk = tl.where(keep, qk * c, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - (m_new - LOG2_P_SCALE)[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * c)  # c > 0: the max commutes with the scale
            p = tl.math.exp2(qk * c - (m_new - LOG2_P_SCALE)[:, None])
        # -- lazy rescale; the row sum uses p (= 448 P) before rounding ----
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if ROUND_P:
            p = _round_e4m3(p)
        # -- P·V in FP8; v_t is zero-padded to whole blocks, so its loads need no mask ----
        if USE_TMA:
            vt = vt_desc.load([0, start_n])
        else:
            vt = tl.load(vt_base + offs_d[:, None].to(tl.int64) * stride_vd + (start_n + offs_n)[None, :])
        pv = tl.dot(p.to(vt.dtype), tl.trans(vt))
        acc = acc * alpha[:, None] + pv * v_scale
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fp8_fwd_kernel(Q, K, Vt, QScale, KScale, VScale, Out, Lse,
                    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vh,
                    stride_vd, stride_ob, stride_on, stride_oh, stride_sb, stride_sh, stride_kvsb, stride_kvsh,
                    seqlen_q, seqlen_k, nk_pad, n_heads, group, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    QBLOCK_M: tl.constexpr, QBLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    USE_TMA: tl.constexpr, ROUND_P: tl.constexpr):
    # heaviest causal tiles (last query blocks) first, so the tail of the grid is short work
    start_m = tl.cdiv(seqlen_q, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    m0 = start_m * BLOCK_M
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    vt_base = Vt + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    o_base = Out + b.to(tl.int64) * stride_ob + h * stride_oh
    lse_base = Lse + bh.to(tl.int64) * seqlen_q  # lse is contiguous (B, H, Nq)
    ks_base = KScale + b * stride_kvsb + hk * stride_kvsh
    vs_base = VScale + b * stride_kvsb + hk * stride_kvsh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_desc = k_base
    vt_desc = vt_base
    if USE_TMA:
        # rows past seqlen_k are zero-filled by the copy engine; v_t is padded, so its shape is exact
        k_desc = tl.make_tensor_descriptor(k_base, [seqlen_k, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM])
        vt_desc = tl.make_tensor_descriptor(vt_base, [HEAD_DIM, nk_pad], [stride_vd, 1], [HEAD_DIM, BLOCK_N])
    q = load_rows(q_base, offs_m, stride_qn, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM, True)
    qk_scale = qk_scale * tl.load(QScale + b * stride_sb + h * stride_sh + m0 // QBLOCK_M)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a row with no key never sees -inf - -inf
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    _, a, c, hi = key_segments(m0, seqlen_q, seqlen_k, 0, 0, False, IS_CAUSAL, BLOCK_M, BLOCK_N)
    # no left window, so the first segment is empty: the interior (no masks) then the causal diagonal / sequence tail
    acc, l_i, m_i = _fp8_inner(acc, l_i, m_i, q, k_base, vt_base, k_desc, vt_desc, ks_base, vs_base,
                               stride_kn, stride_vd, a, c, offs_m, offs_n, offs_d, seqlen_q, seqlen_k,
                               qk_scale, False, IS_CAUSAL, HEAD_DIM, BLOCK_N, QBLOCK_N, USE_TMA, ROUND_P)
    acc, l_i, m_i = _fp8_inner(acc, l_i, m_i, q, k_base, vt_base, k_desc, vt_desc, ks_base, vs_base,
                               stride_kn, stride_vd, c, hi, offs_m, offs_n, offs_d, seqlen_q, seqlen_k,
                               qk_scale, True, IS_CAUSAL, HEAD_DIM, BLOCK_N, QBLOCK_N, USE_TMA, ROUND_P)

    # -- epilogue: one division; rows that saw no key get out 0 and lse -inf ----
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe) - LOG2_P_SCALE) * LN2, float("-inf"))
    store_rows(o_base, offs_m, stride_on, seqlen_q, offs_d, out.to(Out.dtype.element_ty), HEAD_DIM, HEAD_DIM)
    tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen_q)


# -- fused quantization: one pass from bf16 to e4m3 + per-block scale (rotation included) ----------------


@triton.jit
def _quant_kernel(X, S, Y, Scale, stride_xb, stride_xn, stride_xh, stride_yb, stride_yn, stride_yh, stride_yd,
                  stride_sb, stride_sh, seqlen, n_out, n_heads, inv_sqrt_d,
                  HEAD_DIM: tl.constexpr, QBLOCK: tl.constexpr, ROTATE: tl.constexpr, IEEE: tl.constexpr,
                  ROUND: tl.constexpr):
    """One (QBLOCK rows, one head) block: y = x (S / sqrt(D) if ROTATE), scale = amax / 448, y / scale -> e4m3.

    Rows past seqlen read 0: storing rows up to n_out zero-fills the key padding of a transposed output (v_t).
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    rows = blk * QBLOCK + tl.arange(0, QBLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    x = load_rows(X + b.to(tl.int64) * stride_xb + h * stride_xh, rows, stride_xn, seqlen, offs_d, HEAD_DIM,
                  HEAD_DIM, True)
    if ROTATE:  # S holds +-1 in x's dtype: exact products, fp32 sums
        s = tl.load(S + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
        if IEEE:
            x = tl.dot(x, s, input_precision="ieee") * inv_sqrt_d
        else:
            x = tl.dot(x, s) * inv_sqrt_d
    else:
        x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) / E4M3_MAX, 1.1754943508222875e-38)
    y = tl.minimum(tl.maximum(x / scale, -E4M3_MAX), E4M3_MAX)
    if ROUND:  # interpreter only, see _round_e4m3
        y = tl.where(y < 0, -_round_e4m3(-y), _round_e4m3(y))
    y_ptrs = (Y + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh + rows[:, None].to(tl.int64) * stride_yn
              + offs_d[None, :] * stride_yd)
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=rows[:, None] < n_out)
    tl.store(Scale + b * stride_sb + h * stride_sh + blk, scale)


# -- configs: tuned per (HEAD_DIM, causal, quantization blocks, TMA), never per length ----------------------

FP8_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    # no register spills on sm_90 at D=128 (checked in the cubin); 4 warps on 128-row tiles spill
    for bm, bn, w, s in [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 4, 3),
                         (64, 64, 4, 3)]
]


def _prune(configs, named_args, **kwargs):
    """A tile must sit inside one quantization block, so that one scale covers it."""
    keep = [c for c in configs
            if kwargs["QBLOCK_M"] % c.kwargs["BLOCK_M"] == 0 and kwargs["QBLOCK_N"] % c.kwargs["BLOCK_N"] == 0]
    return keep or configs[-1:]


fp8_tuned = triton.autotune(FP8_CONFIGS, key=["HEAD_DIM", "IS_CAUSAL", "QBLOCK_M", "QBLOCK_N", "USE_TMA"],
                             prune_configs_by={"early_config_prune": _prune})(_fp8_fwd_kernel)

_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}  # the interpreter checks logic on small tiles
_FEATURES = {"tma": True, "tma_error": None}  # "tma" turns itself off (with the reason) if it cannot build


def check_triton_fp8_supported(fn_name: str, q: torch.Tensor, config=None) -> None:
    """ValueError (never a Triton trace) for inputs the fp8 kernel does not handle."""
    d = q.shape[-1]
    if d not in FP8_HEAD_DIMS:
        raise ValueError(f"{fn_name}: head_dim {d} (q {tuple(q.shape)}) is not supported by the fp8 kernel; "
                         f"use one of {FP8_HEAD_DIMS}")
    if not q.is_cuda:
        if not INTERPRET:
            raise ValueError(f"{fn_name}: q is on {q.device}; the fp8 kernel needs a Hopper GPU (use "
                             "backend='reference' for the fp32 emulation on CPU)")
        return
    if INTERPRET:
        return
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{fn_name}: q dtype {q.dtype} is not supported by the fp8 path; use bf16, fp16 or fp32")
    cap = torch.cuda.get_device_capability(q.device)
    if cap < (9, 0):
        raise ValueError(f"{fn_name}: q is on {q.device} (sm_{cap[0]}{cap[1]}); the fp8 kernel needs Hopper "
                         "(sm_90) or newer; use backend='reference' for the fp32 emulation")
    if config is not None and min(config.block_m, config.block_n) < 64:
        raise ValueError(f"{fn_name}: the fp8 kernel on GPU needs Fp8Config.block_m/block_n >= 64 (its tiles "
                         f"are 64-128 rows), got {config.block_m}/{config.block_n}")


def _scratch_cpu(size, align, stream):
    return torch.empty(size, dtype=torch.int8)


def _scratch_cuda(size, align, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_tma_allocator(device: torch.device) -> None:
    """Device-side descriptors take scratch memory from Triton's allocator, a context variable: set it per
    launch (autograd may call from another thread)."""
    triton.set_allocator(_scratch_cpu if device.type == "cpu" else _scratch_cuda)


def _tma_ok(fq) -> bool:
    """TMA needs sm_90+, a compiled kernel and 16-byte aligned rows (fp8: row strides in bytes)."""
    if INTERPRET or not fq.q.is_cuda or not _FEATURES["tma"]:
        return False
    return torch.cuda.get_device_capability(fq.q.device)[0] >= 9 and fq.k.stride(1) % 16 == 0


def _quantize(x, block, rotate_s, transpose):
    """x (B, N, H, D) -> (fp8 (B, N, H, D), or (B, H, D, N_pad) if transpose, scales (B, H, n_blocks))."""
    B, n, H, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    nb = triton.cdiv(n, block)
    scale = torch.empty(B, H, nb, dtype=torch.float32, device=x.device)
    if transpose:
        y = torch.empty(B, H, D, nb * block, dtype=torch.float8_e4m3fn, device=x.device)
        y_strides = (y.stride(0), y.stride(3), y.stride(1), y.stride(2))  # (b, row, head, d)
    else:
        y = torch.empty(B, n, H, D, dtype=torch.float8_e4m3fn, device=x.device)
        y_strides = (y.stride(0), y.stride(1), y.stride(2), y.stride(3))
    s = x if rotate_s is None else rotate_s.to(x.dtype)
    grid = (nb, B * H)
    kwargs = dict(HEAD_DIM=D, QBLOCK=block, ROTATE=rotate_s is not None, IEEE=x.dtype == torch.float32,
                  ROUND=INTERPRET, num_warps=8 if block * D >= 128 * 128 else 4)
    with torch.cuda.device(x.device) if x.is_cuda else _nullcontext():
        _quant_kernel[grid](x, s, y, scale, x.stride(0), x.stride(1), x.stride(2), *y_strides,
                            scale.stride(0), scale.stride(1), n, y.shape[-1] if transpose else n, H, D ** -0.5,
                            **kwargs)
    return y, scale


def triton_quantize_qkv(q, k, v, config):
    """attention.fp8.quantize_qkv in three fused passes (one per tensor); granularity "block" only."""
    from .quant import Fp8Qkv, signed_hadamard
    assert config.granularity == "block"
    s = signed_hadamard(q.shape[-1], config.seed, device=q.device) if config.rotate else None
    q8, q_scale = _quantize(q, config.block_m, s, False)
    k8, k_scale = _quantize(k, config.block_n, s, False)
    v_t, v_scale = _quantize(v, config.block_n, None, True)
    return Fp8Qkv(q8, k8, v_t, q_scale, k_scale, v_scale, config.block_m, config.block_n, k.shape[1])


def _fwd_args(fq, causal, softmax_scale, out_dtype):
    """Kernel arguments (positional list, constexpr dict) and the output tensors for one call."""
    B, nq, H, D = fq.q.shape
    assert fq.q.stride(-1) == 1 and fq.k.stride(-1) == 1 and fq.v_t.is_contiguous()
    assert fq.q_scale.is_contiguous() and fq.k_scale.stride() == fq.v_scale.stride()
    out = torch.empty(B, nq, H, D, dtype=out_dtype, device=fq.q.device)
    lse = torch.empty(B, H, nq, dtype=torch.float32, device=fq.q.device)
    args = [fq.q, fq.k, fq.v_t, fq.q_scale, fq.k_scale, fq.v_scale, out, lse,
            fq.q.stride(0), fq.q.stride(1), fq.q.stride(2), fq.k.stride(0), fq.k.stride(1), fq.k.stride(2),
            fq.v_t.stride(0), fq.v_t.stride(1), fq.v_t.stride(2), out.stride(0), out.stride(1), out.stride(2),
            fq.q_scale.stride(0), fq.q_scale.stride(1), fq.k_scale.stride(0), fq.k_scale.stride(1),
            nq, fq.seqlen_k, fq.v_t.shape[-1], H, H // fq.k.shape[2], softmax_scale * LOG2E]
    consts = dict(HEAD_DIM=D, QBLOCK_M=fq.block_m, QBLOCK_N=fq.block_n, IS_CAUSAL=bool(causal))
    return args, consts, out, lse


def triton_fp8_forward(fq, causal: bool, softmax_scale: float, out_dtype=torch.bfloat16, use_tma=None):
    """fq: attention.fp8.Fp8Qkv -> (out (B, Nq, H, D) out_dtype, lse (B, H, Nq) fp32, natural log).

    use_tma=None picks TMA descriptors where they work (falling back, with a warning, if they do not build).
    """
    tag = ("fp8", fq.q.device, fq.q.shape[-1], bool(causal), fq.block_m, fq.block_n, use_tma, out_dtype)
    if wants_stand_in(tag, max(fq.q.shape[1], fq.seqlen_k), fq.q):  # autotune on 16K tokens, not on this call
        triton_fp8_forward(_stand_in(fq), causal, softmax_scale, out_dtype, use_tma)
    args, consts, out, lse = _fwd_args(fq, causal, softmax_scale, out_dtype)
    B, nq, H, _ = fq.q.shape
    if INTERPRET:
        if use_tma:
            _set_tma_allocator(fq.q.device)
        grid = (triton.cdiv(nq, _INTERPRET_CONFIG["BLOCK_M"]), B * H)
        _fp8_fwd_kernel[grid](*args, **consts, **_INTERPRET_CONFIG, USE_TMA=bool(use_tma), ROUND_P=True)
        return out, lse
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), B * H)  # noqa: E731
    with torch.cuda.device(fq.q.device):
        if _tma_ok(fq) if use_tma is None else use_tma:
            _set_tma_allocator(fq.q.device)
            try:
                fp8_tuned[grid](*args, **consts, USE_TMA=True, ROUND_P=False)
                return out, lse
            except Exception as e:  # a Triton that cannot build the TMA path: pointer loads from now on
                if use_tma:
                    raise
                _FEATURES["tma"], _FEATURES["tma_error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
                warnings.warn(f"ringflash: TMA fp8 forward unavailable, using pointer loads ({_FEATURES['tma_error']})")
        fp8_tuned[grid](*args, **consts, USE_TMA=False, ROUND_P=False)
    return out, lse


def _stand_in(fq):
    """Quantized random inputs of triton_common.STAND_IN["len"] tokens with fq's heads, head dim and blocks."""
    from .quant import Fp8Qkv
    like = lambda t: torch.empty(1, 1, *t.shape[-2:], dtype=torch.bfloat16, device=t.device)  # noqa: E731
    q, k, v, _ = stand_in_qkv(like(fq.q), like(fq.k), False)
    q8, q_scale = _quantize(q, fq.block_m, None, False)
    k8, k_scale = _quantize(k, fq.block_n, None, False)
    v_t, v_scale = _quantize(v, fq.block_n, None, True)
    return Fp8Qkv(q8, k8, v_t, q_scale, k_scale, v_scale, fq.block_m, fq.block_n, k.shape[1])


def launch_config(fq, causal, softmax_scale, config: triton.Config, use_tma: bool, out_dtype=torch.bfloat16):
    """One launch with an explicit config, bypassing the autotuner (scripts/bench_fp8.py --sweep)."""
    args, consts, out, lse = _fwd_args(fq, causal, softmax_scale, out_dtype)
    grid = (triton.cdiv(fq.q.shape[1], config.kwargs["BLOCK_M"]), fq.q.shape[0] * fq.q.shape[2])
    if use_tma:
        _set_tma_allocator(fq.q.device)
    _fp8_fwd_kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps,
                          num_stages=config.num_stages, USE_TMA=use_tma, ROUND_P=INTERPRET)
    return out, lse
