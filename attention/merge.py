"""Log-sum-exp merge of partial attention results over disjoint key sets (the ring's combine step).

Each part is (out, lse) with out (B, N, H, D) and lse (B, H, N) [varlen: (T, H, D) and (H, T)], lse natural
log. Merging in fp32 gives exactly the softmax over the union of the keys. Parts whose lse is -inf contribute
nothing; if every part is -inf the merged row is out = 0, lse = -inf, and gradients stay finite.

    out, lse = merge_attn_outputs([(out_1, lse_1), (out_2, lse_2)])
"""

from __future__ import annotations

import torch


def _check_parts(parts) -> None:
    if len(parts) == 0:
        raise ValueError("merge_attn_outputs: parts is empty; pass at least one (out, lse) pair")
    out0, lse0 = parts[0]
    for i, (out, lse) in enumerate(parts):
        if out.shape != out0.shape or lse.shape != lse0.shape:
            raise ValueError(
                f"merge_attn_outputs: part {i} has out {tuple(out.shape)}, lse {tuple(lse.shape)}; "
                f"part 0 has out {tuple(out0.shape)}, lse {tuple(lse0.shape)}")
    if out0.dim() not in (3, 4) or lse0.dim() != out0.dim() - 1:
        raise ValueError(f"merge_attn_outputs: out must be (B, N, H, D) or (T, H, D) with lse (B, H, N) or "
                         f"(H, T); got out {tuple(out0.shape)}, lse {tuple(lse0.shape)}")
    if tuple(lse0.transpose(-1, -2).shape) != tuple(out0.shape[:-1]):
        raise ValueError(f"merge_attn_outputs: lse {tuple(lse0.shape)} does not match out {tuple(out0.shape)}")


def merge_attn_outputs(parts):
    """Merge [(out_i, lse_i), ...] -> (out, lse). out in parts[0]'s dtype, lse fp32. Differentiable."""
    parts = list(parts)
    _check_parts(parts)
    lses = torch.stack([lse.float() for _, lse in parts])  # (P, ..., H, N)
    m = lses.amax(0).detach()  # a pure shift: its gradient cancels exactly, so keep it out of autograd
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lses - m_safe)  # -inf parts -> 0
    total = w.sum(0)
    empty = total == 0
    total_safe = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), m_safe + torch.log(total_safe))
    weights = (w / total_safe).transpose(-1, -2).unsqueeze(-1)  # (P, ..., N, H, 1)
    out = sum(weights[i] * part_out.float() for i, (part_out, _) in enumerate(parts))
    return out.to(parts[0][0].dtype), lse
