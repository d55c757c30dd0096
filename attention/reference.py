"""Pure-PyTorch attention with the exact ringflash semantics: the oracle for every kernel.

q (B, Nq, H, D), k/v (B, Nk, Hkv, D); out (B, Nq, H, D) in q.dtype, lse (B, H, Nq) fp32, natural log.
Works in query/key blocks with an online softmax, so memory is O(block_q * block_k), not O(Nq * Nk).
Accumulates in fp32 (fp64 when the inputs are fp64). GQA is a broadcast over a group axis, never a repeat.

    out, lse = reference_attn_forward(q, k, v, causal=True)
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK = 512


def effective_window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """(left, right) with -1 = unbounded; causal clamps right to 0 (causal == window (left, 0))."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left, right


def key_range(q_start: int, q_end: int, nq: int, nk: int, left: int, right: int) -> tuple[int, int]:
    """Half-open range of keys that query rows [q_start, q_end) can see (bottom-right aligned)."""
    off = nk - nq
    lo = 0 if left < 0 else max(0, q_start + off - left)
    hi = nk if right < 0 else min(nk, q_end - 1 + off + right + 1)
    return lo, max(lo, hi)


def visible_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, nq: int, nk: int, left: int, right: int):
    """Bool (len(q_idx), len(k_idx)): query i sees key j iff i+off-left <= j <= i+off+right."""
    diag = (q_idx + (nk - nq))[:, None]
    j = k_idx[None, :]
    mask = torch.ones(len(q_idx), len(k_idx), dtype=torch.bool, device=q_idx.device)
    if left >= 0:
        mask &= j >= diag - left
    if right >= 0:
        mask &= j <= diag + right
    return mask


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grouped(q, k, v):
    """(B,Hkv,G,N,D) views in the accumulation dtype; k/v get a broadcast group axis of size 1."""
    B, nq, H, D = q.shape
    hkv = k.shape[2]
    acc = _acc_dtype(q)
    qg = q.to(acc).view(B, nq, hkv, H // hkv, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Nq, D)
    kg = k.to(acc).permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    vg = v.to(acc).permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    return qg, kg, vg


def reference_attn_forward(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1),
                           block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK):
    """Blocked online-softmax attention. Returns (out in q.dtype, lse fp32 (B, H, Nq))."""
    B, nq, H, D = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    left, right = effective_window(causal, window_size)
    qg, kg, vg = _grouped(q, k, v)
    acc_t = qg.dtype
    G = H // hkv
    out = torch.zeros(B, hkv, G, nq, D, dtype=acc_t, device=q.device)
    lse = torch.full((B, hkv, G, nq), float("-inf"), dtype=acc_t, device=q.device)
    ar_q = torch.arange(nq, device=q.device)
    ar_k = torch.arange(nk, device=q.device)
    for i0 in range(0, nq, block_q):
        i1 = min(nq, i0 + block_q)
        lo, hi = key_range(i0, i1, nq, nk, left, right)
        if lo >= hi:
            continue  # every row of this block sees no key: out 0, lse -inf
        qb = qg[..., i0:i1, :]
        m_i = torch.full(qb.shape[:-1], float("-inf"), dtype=acc_t, device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros_like(qb)
        for j0 in range(lo, hi, block_k):
            j1 = min(hi, j0 + block_k)
            s = (qb @ kg[..., j0:j1, :].transpose(-1, -2)) * scale  # (B, Hkv, G, bq, bk)
            s = s.masked_fill(~visible_mask(ar_q[i0:i1], ar_k[j0:j1], nq, nk, left, right), float("-inf"))
            m_new = torch.maximum(m_i, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vg[..., j0:j1, :]
            m_i = m_new
        seen = l_i > 0
        l_safe = torch.where(seen, l_i, torch.ones_like(l_i))
        out[..., i0:i1, :] = torch.where(seen[..., None], acc / l_safe[..., None], torch.zeros_like(acc))
        lse[..., i0:i1] = torch.where(seen, m_i + torch.log(l_safe), torch.full_like(l_i, float("-inf")))
    # contiguous like FlashAttention's output: callers .view() it (the reshape alone is a strided view)
    out = out.permute(0, 3, 1, 2, 4).reshape(B, nq, H, D).to(q.dtype).contiguous()  # (B, Nq, H, D)
    return out, lse.reshape(B, H, nq).float()


def reference_attn_backward(dout, q, k, v, out, lse, causal=False, softmax_scale=None, window_size=(-1, -1),
                            dlse=None, block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK):
    """Explicit FlashAttention backward: recompute P from lse; dlse enters as delta = rowsum(dO*O) - dlse.

    Returns (dq, dk, dv) in the dtypes of q, k, v; dk/dv of a kv head are summed over its query group.
    """
    B, nq, H, D = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    G = H // hkv
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    left, right = effective_window(causal, window_size)
    qg, kg, vg = _grouped(q, k, v)
    acc_t = qg.dtype
    dog = dout.to(acc_t).view(B, nq, hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Nq, D)
    og = out.to(acc_t).view(B, nq, hkv, G, D).permute(0, 2, 3, 1, 4)
    lse_g = lse.to(acc_t).view(B, hkv, G, nq)
    delta = (dog * og).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc_t).view(B, hkv, G, nq)
    lse_safe = torch.where(torch.isinf(lse_g), torch.zeros_like(lse_g), lse_g)
    dq = torch.zeros_like(qg)
    dk = torch.zeros(B, hkv, nk, D, dtype=acc_t, device=q.device)
    dv = torch.zeros_like(dk)
    ar_q = torch.arange(nq, device=q.device)
    ar_k = torch.arange(nk, device=q.device)
    for i0 in range(0, nq, block_q):
        i1 = min(nq, i0 + block_q)
        lo, hi = key_range(i0, i1, nq, nk, left, right)
        qb, dob = qg[..., i0:i1, :], dog[..., i0:i1, :]
        for j0 in range(lo, hi, block_k):
            j1 = min(hi, j0 + block_k)
            kb, vb = kg[..., j0:j1, :], vg[..., j0:j1, :]
            s = (qb @ kb.transpose(-1, -2)) * scale
            s = s.masked_fill(~visible_mask(ar_q[i0:i1], ar_k[j0:j1], nq, nk, left, right), float("-inf"))
            p = torch.exp(s - lse_safe[..., i0:i1, None])  # masked keys: exp(-inf) = 0
            dv[..., j0:j1, :] += (p.transpose(-1, -2) @ dob).sum(2)
            dp = dob @ vb.transpose(-1, -2)
            ds = p * (dp - delta[..., i0:i1, None])
            dq[..., i0:i1, :] += (ds @ kb) * scale
            dk[..., j0:j1, :] += (ds.transpose(-1, -2) @ qb).sum(2) * scale
    dq = dq.permute(0, 3, 1, 2, 4).reshape(B, nq, H, D).to(q.dtype).contiguous()
    return dq, dk.transpose(1, 2).to(k.dtype).contiguous(), dv.transpose(1, 2).to(v.dtype).contiguous()
