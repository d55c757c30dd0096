"""Public attention functions (FlashAttention-2 compatible signatures) and their autograd Functions.

    out = flash_attn_func(q, k, v, causal=True)                    # q (B, Nq, H, D), k/v (B, Nk, Hkv, D)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)   # lse (B, H, Nq) fp32, natural log
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)   # q (total, H, D)

Gradients flow through both out and lse (the ring merges partial results by lse). The entry points check
their inputs once; the Functions then call the unchecked `backends.launch_*`; grids, kernels and tiling
live below them.
"""

from __future__ import annotations

import torch

from .backends import (Backend, check_attn_inputs, check_backward_supported, get_backend, launch_backward,
                       launch_forward, launch_varlen_backward, launch_varlen_forward, softmax_scale_of)
from .validation import check_options, check_qkv, check_varlen


class FlashAttnFunc(torch.autograd.Function):
    """Inputs checked by the caller (flash_attn_func, ulysses_attn_func): scale a float, impl a Backend."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window_size, impl: Backend, fp8):
        if fp8:  # the FP8 forward (its own checks); the backward stays the bf16 one, recomputing P at fp8 out/lse
            from .fp8 import fp8_attn_forward
            out, lse = fp8_attn_forward(q, k, v, causal, scale, window_size, impl.name, fp8)
        else:
            out, lse = launch_forward(impl, q, k, v, causal, scale, window_size)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, window_size)
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        check_backward_supported("flash_attn_func", ctx.impl, q, k)
        dq, dk, dv = launch_backward(ctx.impl, dout, q, k, v, out, lse, *ctx.args, dlse=dlse)
        return dq, dk, dv, None, None, None, None, None


class FlashAttnVarlenFunc(torch.autograd.Function):
    """Inputs checked by the caller (flash_attn_varlen_func, ulysses_attn_func with a plan)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_size, impl: Backend):
        out, lse = launch_varlen_forward(impl, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_size)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, window_size)
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        check_backward_supported("flash_attn_varlen_func", ctx.impl, q, k)
        dq, dk, dv = launch_varlen_backward(ctx.impl, dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args, dlse=dlse)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), return_lse=False,
                    backend="auto", fp8=False):
    """Attention over q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> out (B, Nq, H, D) [, lse (B, H, Nq)].

    causal aligns bottom-right (query i sees key j iff j <= i + Nk - Nq); window_size=(left, right) with -1
    unbounded; softmax_scale defaults to 1/sqrt(D); Hkv may divide H (GQA/MQA).
    fp8=True (or an attention.fp8.Fp8Config) runs the FP8 forward; its gradients come from the bf16 backward.
    """
    fn = "flash_attn_func"
    if fp8:  # fp8_attn_forward checks the rest; the backend's own limits apply to the bf16 backward only
        check_qkv(q, k, v, fn)
        check_options(fn, softmax_scale, window_size)
        impl = get_backend(backend, q.device)
    else:
        impl = check_attn_inputs(fn, q, k, v, softmax_scale, window_size, backend)
    out, lse = FlashAttnFunc.apply(q, k, v, bool(causal), softmax_scale_of(q, softmax_scale), tuple(window_size),
                                   impl, fp8)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           softmax_scale=None, window_size=(-1, -1), return_lse=False, backend="auto"):
    """Packed documents: q (total_q, H, D), k/v (total_k, Hkv, D), int32 cu_seqlens (batch+1,).

    Sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]; attention never crosses sequences. lse is (H, total_q).
    """
    fn = "flash_attn_varlen_func"
    impl = check_attn_inputs(fn, q, k, v, softmax_scale, window_size, backend, varlen=True)
    check_varlen(fn, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                         int(max_seqlen_k), bool(causal), softmax_scale_of(q, softmax_scale),
                                         tuple(window_size), impl)
    return (out, lse) if return_lse else out
