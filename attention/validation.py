"""Input checks shared by every public attention entry point: ValueErrors that name the argument and shapes."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_qkv(q, k, v, fn: str, varlen: bool = False) -> None:
    """q (B, Nq, H, D), k/v (B, Nk, Hkv, D); varlen drops the batch dim: (T, H, D)."""
    rank = 3 if varlen else 4
    layout = "(total, H, D)" if varlen else "(B, N, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{fn}: {name} must be {rank}-D {layout}, got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{fn}: {name} dtype {t.dtype} is not supported; use fp16, bf16 or fp32")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"{fn}: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k {_shape(k)} and v {_shape(v)} must have the same shape")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"{fn}: batch mismatch: q {_shape(q)} vs k {_shape(k)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{fn}: head_dim mismatch: q {_shape(q)} vs k {_shape(k)}")
    h, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"{fn}: q heads ({h}) must be a multiple of k/v heads ({hkv}); q {_shape(q)}, k {_shape(k)}")
    seq_dim = 0 if varlen else 1
    if q.shape[seq_dim] < 1 or k.shape[seq_dim] < 1:
        raise ValueError(f"{fn}: sequence lengths must be >= 1; q {_shape(q)}, k {_shape(k)}")


def check_options(fn: str, softmax_scale, window_size) -> None:
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"{fn}: softmax_scale must be a positive float or None, got {softmax_scale!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"{fn}: window_size must be (left, right) ints >= -1 (-1 = unbounded), got {window_size!r}")


def check_cu_seqlens(fn: str, name: str, cu, total: int, device) -> list[int] | None:
    """cu_seqlens: int32 (batch+1,), starts at 0, non-decreasing, ends at total.

    Values are checked (and returned as a list) only for CPU tensors: reading a CUDA tensor would put a
    host sync into every attention call of a training step.
    """
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{fn}: {name} must be a 1-D int32 tensor (batch+1,), got {_shape(cu)}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{fn}: {name} must be int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{fn}: {name} is on {cu.device} but q is on {device}")
    if cu.is_cuda:
        return None
    vals = cu.tolist()
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])) or vals[-1] != total:
        raise ValueError(f"{fn}: {name} must start at 0, be non-decreasing and end at {total} "
                         f"(the packed length); got {vals[:8]}{'...' if len(vals) > 8 else ''}")
    return vals


def check_varlen(fn, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    cq = check_cu_seqlens(fn, "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = check_cu_seqlens(fn, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{fn}: cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel() - 1}")
    if cq is None:
        return
    for name, cu, mx in (("max_seqlen_q", cq, max_seqlen_q), ("max_seqlen_k", ck, max_seqlen_k)):
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        if not isinstance(mx, int) or mx < longest:
            raise ValueError(f"{fn}: {name}={mx!r} is smaller than the longest sequence ({longest})")
