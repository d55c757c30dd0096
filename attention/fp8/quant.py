"""FP8 attention forward, FlashAttention-3 style: per-block e4m3 quantization, incoherent processing, emulation.

    fq = quantize_qkv(q, k, v, Fp8Config())                        # rotated, per-block scaled float8_e4m3fn
    out, lse = emulate_fp8_attention(fq, causal=True, softmax_scale=0.125)   # fp32 oracle of the kernel
    out, lse = fp8_attn_forward(q, k, v, causal=True)              # Triton kernel on Hopper, emulation on CPU
    out = flash_attn_func(q, k, v, causal=True, fp8=True)          # the same through the public API

Quantization: each block of `block_m` query rows (`block_n` key rows) of one head shares one fp32 scale,
amax / 448, so its largest element lands on the e4m3 maximum. Incoherent processing multiplies Q and K by
one random orthogonal R = diag(s) H / sqrt(D) (random signs s, Hadamard H): (QR)(KR)^T = QK^T exactly,
while an outlier channel is spread over all D channels, so the block amax -- and with it the rounding step
of every other element -- shrinks. V is not rotated (P·V would have to be rotated back).
P = exp2(s - running max) lies in [0, 1] and is quantized with the fixed scale 448 (computed as
exp2(s - m + log2 448), so the scale costs nothing): e4m3 is floating point, so a per-block P scale would
only lift values below 3.5e-5 out of the subnormal range.
The forward is FP8; gradients (flash_attn_func(..., fp8=...)) come from the bf16 backward recomputed at the
fp8 out/lse.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..validation import check_options, check_qkv

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
LOG2_P_SCALE = math.log2(E4M3_MAX)  # P in [0, 1] is computed directly as 448 P = exp2(s - m + log2 448)
LOG2E = 1.4426950408889634
GRANULARITIES = ("block", "head", "tensor")
_TINY = torch.finfo(torch.float32).tiny  # scale of an all-zero block: quantizes to 0, never divides by 0


@dataclass(frozen=True)
class Fp8Config:
    """How Q/K/V are quantized. `flash_attn_func(..., fp8=True)` uses the defaults (FA3's choice)."""
    granularity: str = "block"  # "block": per block of rows per head; "head": per head; "tensor": one scale
    rotate: bool = True  # incoherent processing: Q, K times a seeded random Hadamard rotation along D
    seed: int = 0
    block_m: int = 128  # query rows per scale; the kernel's BLOCK_M divides it
    block_n: int = 128  # key rows per scale; the kernel's BLOCK_N divides it


@dataclass
class Fp8Qkv:
    """Quantized inputs of the fp8 kernel. Scales multiply back: x ~= x8.float() * scale of its row block."""
    q: torch.Tensor  # (B, Nq, H, D) float8_e4m3fn, rotated if config.rotate
    k: torch.Tensor  # (B, Nk, Hkv, D) float8_e4m3fn, rotated if config.rotate
    v_t: torch.Tensor  # (B, Hkv, D, Nk_pad) float8_e4m3fn: V transposed (Hopper's fp8 MMA reads it K-major),
    #                    keys zero-padded to a multiple of block_n so the kernel reads V without a mask
    q_scale: torch.Tensor  # (B, H, ceil(Nq / block_m)) fp32
    k_scale: torch.Tensor  # (B, Hkv, ceil(Nk / block_n)) fp32
    v_scale: torch.Tensor  # (B, Hkv, ceil(Nk / block_n)) fp32
    block_m: int
    block_n: int
    seqlen_k: int


# -- quantization -------------------------------------------------------------------------------------------


def _rows(scale: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """(B, H, n_blocks) block scales -> (B, n, H, 1), one per row, to broadcast against (B, N, H, D)."""
    return scale.repeat_interleave(block, dim=2)[:, :, :n].transpose(1, 2).unsqueeze(-1)


def block_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| over each block of `block` rows and all D, per head: (B, N, H, D) -> (B, H, ceil(N / block))."""
    B, n, H, D = x.shape
    nb = -(-n // block)
    a = x.abs().float()
    if nb * block != n:
        a = torch.cat([a, a.new_zeros(B, nb * block - n, H, D)], dim=1)
    return a.view(B, nb, block, H, D).amax(dim=(2, 4)).transpose(1, 2).contiguous()  # (B, H, nb)


def quantize(x: torch.Tensor, block: int, granularity: str = "block"):
    """x (B, N, H, D) -> (x8 float8_e4m3fn (B, N, H, D), scale fp32 (B, H, ceil(N / block))).

    The scale is amax / 448 over the block ("block"), the head ("head") or the whole tensor ("tensor");
    coarser granularities repeat their one value over the blocks, so the kernel reads one layout.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"quantize: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    amax = block_amax(x, block)
    if granularity == "head":
        amax = amax.amax(dim=-1, keepdim=True).expand_as(amax)
    elif granularity == "tensor":
        amax = amax.amax().expand_as(amax)
    scale = (amax / E4M3_MAX).clamp_min(_TINY).contiguous()
    x8 = (x.float() / _rows(scale, block, x.shape[1])).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return x8, scale


def dequantize(x8: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of quantize up to rounding: (B, N, H, D) fp8 and (B, H, n_blocks) scales -> fp32."""
    return x8.float() * _rows(scale, block, x8.shape[1])


def transpose_pad_keys(v8: torch.Tensor, block: int) -> torch.Tensor:
    """(B, Nk, Hkv, D) fp8 -> (B, Hkv, D, Nk_pad) fp8 with zero keys up to a multiple of `block`."""
    B, nk, hkv, D = v8.shape
    nk_pad = -(-nk // block) * block
    v_t = torch.zeros(B, hkv, D, nk_pad, dtype=torch.uint8, device=v8.device)
    v_t[..., :nk] = v8.view(torch.uint8).permute(0, 2, 3, 1)  # bytes: copies need no fp8 kernels
    return v_t.view(FP8_DTYPE)


# -- incoherent processing -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _rotation_cpu(d: int, seed: int) -> torch.Tensor:
    """fp64 (d, d): diag(s) H with entries +-1 for powers of two (scaled by 1/sqrt(d) at use), else Haar."""
    g = torch.Generator().manual_seed(seed)
    if d & (d - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:  # Sylvester: H_2n = [[H, H], [H, -H]]
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.float64) * 2 - 1
        return signs[:, None] * h
    # no Hadamard matrix of this size: a Haar-random orthogonal matrix (QR with the sign fix)
    qm, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return qm * torch.sign(torch.diagonal(r))[None, :]


def _is_hadamard(d: int) -> bool:
    return d & (d - 1) == 0


def signed_hadamard(d: int, seed: int = 0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """(d, d) diag(s) H with entries +-1 (exact in every float dtype); d must be a power of two."""
    assert _is_hadamard(d), d
    return _rotation_cpu(int(d), int(seed)).to(device=device, dtype=dtype)


def rotation_matrix(d: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """(d, d) fp32 orthogonal R: randomized Hadamard diag(s) H / sqrt(d) for powers of two, else Haar."""
    r = _rotation_cpu(int(d), int(seed))
    return (r / math.sqrt(d) if _is_hadamard(d) else r).float().to(device)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, seed: int = 0):
    """(q R, k R) in fp32 for one seeded orthogonal R along D: preserves q k^T, spreads outlier channels."""
    d = q.shape[-1]
    if not _is_hadamard(d):
        r = rotation_matrix(d, seed, q.device)
        return q.float() @ r, k.float() @ r
    s = signed_hadamard(d, seed, device=q.device)  # +-1: exact products, fp32 sums, one scaling (as the kernel)
    return (q.float() @ s) * d ** -0.5, (k.float() @ s) * d ** -0.5


def quantize_qkv(q, k, v, config: Fp8Config = Fp8Config()) -> Fp8Qkv:
    """q (B, Nq, H, D), k/v (B, Nk, Hkv, D) in any float dtype -> Fp8Qkv (rotation applied in fp32)."""
    if config.rotate:
        q, k = rotate_qk(q, k, config.seed)
    q8, q_scale = quantize(q, config.block_m, config.granularity)
    k8, k_scale = quantize(k, config.block_n, config.granularity)
    v8, v_scale = quantize(v, config.block_n, config.granularity)
    return Fp8Qkv(q8, k8, transpose_pad_keys(v8, config.block_n), q_scale, k_scale, v_scale, config.block_m,
                  config.block_n, k.shape[1])


# -- emulation: the kernel's arithmetic in fp32 torch ----------------------------------------------------------


def _dequantized_heads(fq: Fp8Qkv):
    """q (B, H, Nq, D), k and v (B, H, Nk, D) in fp32 as the kernel sees them; kv heads broadcast to H."""
    H, hkv, nk = fq.q.shape[2], fq.k.shape[2], fq.seqlen_k
    q = dequantize(fq.q, fq.q_scale, fq.block_m).transpose(1, 2)  # (B, H, Nq, D)
    k = dequantize(fq.k, fq.k_scale, fq.block_n).transpose(1, 2)  # (B, Hkv, Nk, D)
    v8 = fq.v_t[..., :nk].permute(0, 3, 1, 2)  # (B, Nk, Hkv, D) fp8
    v = dequantize(v8, fq.v_scale, fq.block_n).transpose(1, 2)  # (B, Hkv, Nk, D)
    return q, k.repeat_interleave(H // hkv, 1), v.repeat_interleave(H // hkv, 1)


def emulate_fp8_attention(fq: Fp8Qkv, causal=False, softmax_scale=None, out_dtype=torch.float32,
                          block_n=None):
    """The fp8 kernel's forward in fp32: dequantized Q/K/V, online softmax over `block_n` keys, P in fp8.

    Returns out (B, Nq, H, D) in out_dtype and lse (B, H, Nq) fp32, natural log (-inf, out 0 for a row that
    sees no key). It differs from the kernel only by fp32 summation order (which may flip an fp8 rounding).
    """
    B, nq, H, D = fq.q.shape
    nk = fq.seqlen_k
    tile = fq.block_n if block_n is None else int(block_n)
    c = (D ** -0.5 if softmax_scale is None else softmax_scale) * LOG2E  # base-2 scores, as the kernel
    q, k, v = _dequantized_heads(fq)
    dev = q.device
    m_i = torch.full((B, H, nq), -1.0e30, device=dev)  # finite start: no exp2(-inf - -inf)
    l_i = torch.zeros(B, H, nq, device=dev)
    acc = torch.zeros(B, H, nq, D, device=dev)
    rows = torch.arange(nq, device=dev)[:, None] + (nk - nq)  # bottom-right causal diagonal
    for j0 in range(0, nk, tile):
        j1 = min(nk, j0 + tile)
        s = (q @ k[:, :, j0:j1].transpose(-1, -2)) * c  # (B, H, Nq, tile)
        if causal:
            s = s.masked_fill(torch.arange(j0, j1, device=dev)[None, :] > rows, float("-inf"))
        m_new = torch.maximum(m_i, s.amax(-1))
        p = torch.exp2(s - (m_new - LOG2_P_SCALE)[..., None])  # 448 P: the e4m3 range
        alpha = torch.exp2(m_i - m_new)
        l_i = l_i * alpha + p.sum(-1)  # the row sum uses p before rounding, as the kernel
        acc = acc * alpha[..., None] + p.to(FP8_DTYPE).float() @ v[:, :, j0:j1]
        m_i = m_new
    seen = l_i > 0
    l_safe = torch.where(seen, l_i, torch.ones_like(l_i))
    out = torch.where(seen[..., None], acc / l_safe[..., None], torch.zeros_like(acc))
    lse2 = m_i + torch.log2(l_safe) - LOG2_P_SCALE  # base 2; l carries the factor 448
    lse = torch.where(seen, lse2 / LOG2E, torch.full_like(l_i, float("-inf")))
    return out.transpose(1, 2).to(out_dtype).contiguous(), lse  # (B, Nq, H, D), (B, H, Nq)


# -- entry points ------------------------------------------------------------------------------------------------


def _check(fn, q, k, v, softmax_scale, window_size, config) -> Fp8Config:
    check_qkv(q, k, v, fn)
    check_options(fn, softmax_scale, window_size)
    if config is True or config is None:
        config = Fp8Config()
    if not isinstance(config, Fp8Config):
        raise ValueError(f"{fn}: fp8 must be True or an attention.fp8.Fp8Config, got {config!r}")
    if config.granularity not in GRANULARITIES:
        raise ValueError(f"{fn}: Fp8Config.granularity must be one of {GRANULARITIES}, got {config.granularity!r}")
    for name in ("block_m", "block_n"):
        b = getattr(config, name)
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{fn}: Fp8Config.{name} must be a power of two >= 16, got {b!r}")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"{fn}: fp8 attention supports causal / non-causal only, got window_size={window_size!r}")
    return config


def fp8_attn_forward(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), backend="auto",
                     config: Fp8Config | None = None):
    """Forward-only FP8 attention: q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> (out in q.dtype, lse (B, H, Nq)).

    backend "gluon" (the "auto" choice on sm_90) runs the Triton FP8 kernel, or the Gluon Hopper one where
    attention.gluon.dispatch.GLUON_PASSES holds "fp8" and it covers the case (dispatch.route_fp8); "triton" (auto on
    other GPUs) the Triton kernel; "reference" (auto on CPU) the fp32 emulation. Nothing is recorded for autograd:
    use flash_attn_func(..., fp8=True).
    """
    fn = "fp8_attn_forward"
    config = _check(fn, q, k, v, softmax_scale, window_size, config)
    if backend != "reference":  # "auto" as attn_forward resolves it; "gluon" where the Gluon kernels cannot run raises
        from ..backends import get_backend
        backend = get_backend(backend, q.device).name
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if backend == "reference":
        with torch.no_grad():
            return emulate_fp8_attention(quantize_qkv(q, k, v, config), bool(causal), scale, q.dtype)
    if backend not in ("triton", "gluon"):
        raise ValueError(f"{fn}: fp8 attention has no {backend!r} backend; use 'gluon' or 'triton' (Hopper) or "
                         "'reference' (fp32 emulation)")
    from .kernel import check_triton_fp8_supported, triton_fp8_forward, triton_quantize_qkv
    check_triton_fp8_supported(fn, q, config)  # before quantizing: a clear ValueError, no Triton trace
    with torch.no_grad():
        # per-block scales fuse into one pass per tensor; per-head / per-tensor need a global amax first
        fq = triton_quantize_qkv(q, k, v, config) if config.granularity == "block" else quantize_qkv(q, k, v, config)
        if backend == "gluon":
            from ..gluon.dispatch import gluon_fp8_forward
            return gluon_fp8_forward(fq, bool(causal), scale, q.dtype)
        return triton_fp8_forward(fq, bool(causal), scale, q.dtype)
