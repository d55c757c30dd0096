"""Public attention functions (FlashAttention-2 compatible signatures) and their autograd Functions.

    out = flash_attn_func(q, k, v, causal=True)                    # q (B, Nq, H, D), k/v (B, Nk, Hkv, D)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)   # lse (B, H, Nq) fp32, natural log
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)   # q (total, H, D)

Gradients flow through both out and lse (the ring merges partial results by lse). The Functions only
dispatch to `backends.attn_*`; grids, kernels and tiling live below them.
"""

from __future__ import annotations

import torch

from .backends import (attn_backward, attn_forward, attn_varlen_backward, attn_varlen_forward,
                       resolve_backend_name)
from .validation import check_options, check_qkv, check_varlen


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, window_size, backend, fp8):
        # fp8: the FP8 forward; the backward stays the bf16 one, recomputing P at the fp8 out/lse
        out, lse = attn_forward(q, k, v, causal, softmax_scale, window_size, backend, fp8=fp8)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, softmax_scale, window_size)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attn_backward(dout, q, k, v, out, lse, *ctx.args, dlse=dlse, backend=ctx.backend)
        return dq, dk, dv, None, None, None, None, None


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale, window_size, backend):
        out, lse = attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale, window_size,
                                       backend)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, softmax_scale, window_size)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args, dlse=dlse,
                                          backend=ctx.backend)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), return_lse=False,
                    backend="auto", fp8=False):
    """Attention over q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> out (B, Nq, H, D) [, lse (B, H, Nq)].

    causal aligns bottom-right (query i sees key j iff j <= i + Nk - Nq); window_size=(left, right) with -1
    unbounded; softmax_scale defaults to 1/sqrt(D); Hkv may divide H (GQA/MQA).
    fp8=True (or an attention.fp8.Fp8Config) runs the FP8 forward; its gradients come from the bf16 backward.
    """
    check_qkv(q, k, v, "flash_attn_func")
    check_options("flash_attn_func", softmax_scale, window_size)
    backend = resolve_backend_name(backend, q.device)
    out, lse = FlashAttnFunc.apply(q, k, v, bool(causal), softmax_scale, tuple(window_size), backend, fp8)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           softmax_scale=None, window_size=(-1, -1), return_lse=False, backend="auto"):
    """Packed documents: q (total_q, H, D), k/v (total_k, Hkv, D), int32 cu_seqlens (batch+1,).

    Sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]; attention never crosses sequences. lse is (H, total_q).
    """
    fn = "flash_attn_varlen_func"
    check_qkv(q, k, v, fn, varlen=True)
    check_options(fn, softmax_scale, window_size)
    check_varlen(fn, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    backend = resolve_backend_name(backend, q.device)
    out, lse = FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                         int(max_seqlen_k), bool(causal), softmax_scale, tuple(window_size),
                                         backend)
    return (out, lse) if return_lse else out
