"""fp64 oracle with gradients for the attention tests: naive softmax(QK^T)V through autograd.

    out, lse, dq, dk, dv = oracle(q, k, v, dout, dlse, causal=True, softmax_scale=None, window_size=(-1, -1))

Rows that see no key: out 0, lse -inf; dlse on such rows is ignored (the lse there is a constant -inf).
"""

import torch

from helpers import naive_attention


def oracle(q, k, v, dout, dlse=None, causal=False, softmax_scale=None, window_size=(-1, -1)):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(qd, kd, vd, causal, softmax_scale, window_size)
    loss = (out * dout.double()).sum()
    if dlse is not None:
        # logsumexp over an all -inf row has a NaN gradient; its lse is constant, so leave it out of the loss
        seen = ~torch.isinf(lse).detach()
        loss = loss + (torch.where(seen, lse, torch.zeros_like(lse)) * dlse.double()).sum()
    dq, dk, dv = torch.autograd.grad(loss, (qd, kd, vd), allow_unused=True)
    return out.detach(), lse.detach(), dq, dk, dv


def rand_qkv(B, nq, nk, H, hkv, D, dtype=torch.float32, requires_grad=False):
    q = torch.randn(B, nq, H, D, dtype=dtype)
    k = torch.randn(B, nk, hkv, D, dtype=dtype)
    v = torch.randn(B, nk, hkv, D, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]
