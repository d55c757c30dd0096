"""Memory-lean building blocks of the Llama block: RMSNorm, RoPE and SwiGLU as autograd Functions.

    y = rms_norm(x, weight, eps)              # saves x and one fp32 scalar per row, nothing [N, dim] more
    q = rope(q, cos, sin)                     # saves nothing but the shared cos/sin tables
    out = swiglu(x, w1, w3, w2, chunk=16384)  # never more than [chunk, ffn] alive; 0: one plain chunk

Why not plain autograd: the eager fp32 RMSNorm keeps an fp32 copy of x plus the normalised tensor (6 bytes
per hidden element per norm), eager RoPE keeps fp32 copies of q and k, and SwiGLU keeps three [N, ffn]
tensors. At 1M tokens those are tens of GiB. Each Function here keeps its input (usually already alive
for another op) and recomputes the rest in backward. `*_math` are the plain-torch twins: the oracles in
the tests and what torch.compile sees (inductor makes its own save/recompute choice for them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import recomputing


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    # What nn.Linear would run in: the autocast dtype if autocast is on for x's device, else x's dtype.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_COMPILED: dict = {}


def compiled(fn):
    """torch.compile(fn) once per function: one graph, weights passed as arguments so every layer shares it
    (no per-module guards). The first shape compiles static; a second shape recompiles with dynamic sizes,
    which then serves every later one. dynamic=False compiled once per shape and, at torch's recompile limit
    (8), fullgraph made that a hard error: an H100 passkey run died at its first eval, whose prompts come in
    more lengths than that."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=None)
    return _COMPILED[fn]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.element_size() < 4 else x


# -- RMSNorm ---------------------------------------------------------------------------------------------

def rms_norm_math(x, weight, eps: float):
    """Normalise in fp32 (bf16 mean-of-squares loses too much at dim >= 1024), gain in x's dtype."""
    xf = _at_least_fp32(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight.type_as(x)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = _at_least_fp32(x)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        y = (xf * rstd).type_as(x) * weight.type_as(x)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        n = _at_least_fp32(x) * rstd  # the normalised rows, recomputed in fp32
        dw = (_at_least_fp32(dy) * n.type_as(x).type_as(n)).flatten(0, -2).sum(0)
        dn = _at_least_fp32(dy) * weight.type_as(x).type_as(n)
        # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n)) per row
        dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        return dx.type_as(x), dw.to(weight.dtype), None


def rms_norm(x, weight, eps: float):
    return RMSNormFunction.apply(x, weight, eps)


# -- RoPE ------------------------------------------------------------------------------------------------

def rope_math(x, cos, sin):
    """Rotate x (B, N, H, D) by the half-split convention (as Hugging Face Llama); fp32 math for 16-bit x."""
    xf = _at_least_fp32(x)
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    x1, x2 = xf.chunk(2, dim=-1)  # (B, N, H, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class RoPEFunction(torch.autograd.Function):
    # A rotation: its backward is the rotation by the opposite angle, so only cos/sin (shared by every
    # layer) are kept.
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_math(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_math(dy, cos, -sin), None, None


def rope(x, cos, sin):
    return RoPEFunction.apply(x, cos, sin)


# -- SwiGLU ----------------------------------------------------------------------------------------------

def swiglu_math(x, w1, w3, w2):
    """w2(silu(w1 x) * w3 x) with F.linear, so autocast applies as in nn.Linear."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _swiglu_forward_chunk(x, w1, w3, w2):
    # x and weights already in the compute dtype; silu in fp32 like autocast would do it.
    a, b = x @ w1.T, x @ w3.T  # (C, ffn) each
    return (F.silu(_at_least_fp32(a)).to(x.dtype) * b) @ w2.T


def _swiglu_backward_chunk(dy, x, w1, w3, w2):
    """Gradients of one chunk: (dx, dw1, dw2, dw3 contributions), weights in the compute dtype."""
    a, b = x @ w1.T, x @ w3.T  # recomputed (C, ffn)
    af = _at_least_fp32(a)
    sig = torch.sigmoid(af)
    s = (af * sig).to(x.dtype)  # silu(a)
    dh = dy @ w2  # (C, ffn)
    dw2 = dy.T @ (s * b)
    ds = _at_least_fp32(dh * b)
    da = (ds * sig * (1 + af * (1 - sig))).to(x.dtype)  # silu'(a) = sig * (1 + a * (1 - sig))
    db = dh * s
    dx = da @ w1 + db @ w3
    return dx, da.T @ x, dw2, db.T @ x


class ChunkedSwiGLU(torch.autograd.Function):
    """SwiGLU over chunks of tokens: forward keeps only x; backward recomputes each chunk, then frees it.

    Inside a checkpointed block's recomputation the forward is skipped (the block output is discarded
    there, only the saved x matters), so under checkpointing the chunking costs no extra FLOPs.
    """

    @staticmethod
    def forward(ctx, x, w1, w3, w2, chunk, compile_chunks):
        dtype = compute_dtype(x)
        ctx.save_for_backward(x, w1, w3, w2)
        ctx.chunk, ctx.dtype, ctx.compile_chunks = chunk, dtype, compile_chunks
        rows = x.reshape(-1, x.shape[-1])  # (T, dim)
        out = rows.new_empty(rows.shape[0], w2.shape[0], dtype=dtype)
        if not recomputing():
            body = compiled(_swiglu_forward_chunk) if compile_chunks else _swiglu_forward_chunk
            wc = [w.to(dtype) for w in (w1, w3, w2)]
            for s in range(0, rows.shape[0], chunk):
                out[s:s + chunk] = body(rows[s:s + chunk].to(dtype), *wc)
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w1, w3, w2 = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        body = compiled(_swiglu_backward_chunk) if ctx.compile_chunks else _swiglu_backward_chunk
        rows, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        wc = [w.to(dtype) for w in (w1, w3, w2)]
        dx = torch.empty_like(rows)
        dws = [torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
               for w in (w1, w2, w3)]  # fp32 (or wider) accumulation over chunks
        for s in range(0, rows.shape[0], chunk):
            g = body(dy[s:s + chunk].to(dtype), rows[s:s + chunk].to(dtype), *wc)
            dx[s:s + chunk] = g[0]
            for acc, part in zip(dws, g[1:]):
                acc += part
        dw1, dw2, dw3 = dws
        return dx.view_as(x), dw1.to(w1.dtype), dw3.to(w3.dtype), dw2.to(w2.dtype), None, None


def swiglu(x, w1, w3, w2, chunk: int = 0, compile_chunks: bool = False):
    """chunk > 0: ChunkedSwiGLU with that many tokens per chunk (its chunk bodies torch.compiled with
    compile_chunks); 0: plain autograd (keeps [N, ffn])."""
    if chunk > 0 and torch.is_grad_enabled():
        return ChunkedSwiGLU.apply(x, w1, w3, w2, chunk, compile_chunks)
    if chunk > 0:  # inference: chunk the plain math, nothing is kept
        rows = x.reshape(-1, x.shape[-1])
        out = torch.cat([swiglu_math(rows[s:s + chunk], w1, w3, w2) for s in range(0, rows.shape[0], chunk)])
        return out.view(*x.shape[:-1], w2.shape[0])
    return swiglu_math(x, w1, w3, w2)
