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


# The eager norm and RoPE work through a long sequence in chunks of about this many elements (128 MiB per fp32
# temporary), so their fp32 temporaries are a chunk's, not the whole sequence's. Unchunked, a bf16 RMSNorm
# backward peaked at 11 bf16 [N, dim] units (dx and five fp32 temporaries), more than the rest of a checkpointed
# block's backward; chunked, 1.2. Sequences up to one chunk take the plain path.
CHUNK_ELEMENTS = 1 << 25


def _rows_per_chunk(row_elements: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(row_elements, 1))


def _row_chunks(*ts: torch.Tensor):
    """Matching row chunks (over every dim but the last) of same-shaped tensors."""
    flat = [t.reshape(-1, t.shape[-1]) for t in ts]
    step = _rows_per_chunk(flat[0].shape[1])
    for start in range(0, flat[0].shape[0], step):
        yield tuple(f[start:start + step] for f in flat)


def _rms_forward(x, w, eps):
    xf = _at_least_fp32(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
    return (xf * rstd).type_as(x) * w, rstd


def _rms_backward(x, dy, rstd, w):
    """(dx, dw) of rows x; w the gain in rstd's dtype."""
    n = _at_least_fp32(x) * rstd  # the normalised rows, recomputed in fp32
    dyf = _at_least_fp32(dy)
    dw = (dyf * n.type_as(x).type_as(n)).flatten(0, -2).sum(0)
    dn = dyf * w
    del dyf  # an fp32 copy of dy for 16-bit rows: not held through the rest
    # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n)) per row
    return (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).type_as(x), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        w = weight.type_as(x)
        if x.numel() <= CHUNK_ELEMENTS:
            y, rstd = _rms_forward(x, w, eps)
        else:  # contiguous outputs, filled chunk by chunk
            y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            stat_dtype = torch.float32 if x.element_size() < 4 else x.dtype
            rstd = torch.empty(x.shape[:-1] + (1,), dtype=stat_dtype, device=x.device)
            for xc, yc, rc in _row_chunks(x, y, rstd):
                out, stat = _rms_forward(xc, w, eps)
                yc.copy_(out)
                rc.copy_(stat)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        w = weight.type_as(x).type_as(rstd)
        if x.numel() <= CHUNK_ELEMENTS:
            dx, dw = _rms_backward(x, dy, rstd, w)
        else:
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            dw = torch.zeros(weight.shape, dtype=rstd.dtype, device=weight.device)
            for xc, dyc, rc, dxc in _row_chunks(x, dy, rstd, dx):
                grad, dw_chunk = _rms_backward(xc, dyc, rc, w)
                dxc.copy_(grad)
                dw += dw_chunk
        return dx, dw.to(weight.dtype), None


def rms_norm(x, weight, eps: float):
    return RMSNormFunction.apply(x, weight, eps)


# -- RoPE ------------------------------------------------------------------------------------------------

def rope_math(x, cos, sin):
    """Rotate x (B, N, H, D) by the half-split convention (as Hugging Face Llama); fp32 math for 16-bit x."""
    xf = _at_least_fp32(x)
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    x1, x2 = xf.chunk(2, dim=-1)  # (B, N, H, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def _rope_chunked(x, cos, sin):
    """rope_math over chunks of tokens (CHUNK_ELEMENTS each): the fp32 temporaries are a chunk's. x (B, N, H, D);
    cos/sin (B or 1, N, 1, D/2)."""
    if x.numel() <= CHUNK_ELEMENTS:
        return rope_math(x, cos, sin)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    step = _rows_per_chunk(x.shape[2] * x.shape[3])  # tokens per chunk
    cos, sin = cos.expand(x.shape[0], -1, -1, -1), sin.expand(x.shape[0], -1, -1, -1)
    for b in range(x.shape[0]):
        for start in range(0, x.shape[1], step):
            rows = slice(start, start + step)
            y[b, rows] = rope_math(x[b, rows], cos[b, rows], sin[b, rows])
    return y


class RoPEFunction(torch.autograd.Function):
    # A rotation: its backward is the rotation by the opposite angle, so only cos/sin (shared by every
    # layer) are kept.
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_chunked(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_chunked(dy, cos, -sin), None, None


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
