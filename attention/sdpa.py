"""SDPA backend: torch's fused attention kernels that return logsumexp, behind ringflash's low-level pair.

    out, lse = sdpa_attn_forward(q, k, v, causal, softmax_scale, window_size)
    dq, dk, dv = sdpa_attn_backward(dout, q, k, v, out, lse, causal, softmax_scale, window_size, dlse)

q (B, Nq, H, D), k/v (B, Nk, Hkv, D); lse (B, H, Nq) fp32, natural log. softmax_scale is a float.

What goes where (first match wins):
  1. window_size that still restricts keys after normalisation -> reference.py. Normalisation: causal means
     right = 0; a side that cannot exclude any key (left >= Nk-1, right >= Nq-1) becomes -1. So Nq == 1
     with causal is plain attention, and window (-1, 0) is causal.
  2. no fused kernel for this device/dtype/head_dim (table below) -> reference.py.
  3. otherwise the fused kernel, on "pieces" that are plain or square-causal (torch's is_causal is
     top-left; ours is bottom-right; they agree only on square blocks):
       non-causal             one piece: all queries x all keys
       causal, Nq == Nk       one piece: square causal
       causal, Nq > Nk        rows [0, Nq-Nk) see no key (out 0, lse -inf); rows [Nq-Nk, Nq) x all keys causal
       causal, Nq < Nk        keys [0, Nk-Nq) plain + keys [Nk-Nq, Nk) square causal, merged by lse (fp32)
     GQA: k/v are expanded to H heads for the kernel; dk/dv are summed back over each group in fp32.
     Backward runs each piece's fused backward with the *given* out and lse (the kernels recompute P from
     lse and delta from rowsum(dout*out)), which is exact for merged or ring results too.
     dlse (gradient into lse) enters by one extra head-dim column: q, k get 0, v gets 1, out gets 0 and
     dout gets dlse, so the kernel's dP gains +dlse while delta is unchanged: dS = P*(dP - delta + dlse).
     (Padded by 8 columns on CUDA, which needs head_dim % 8 == 0.)
  4. a fused kernel that raises RuntimeError (an arch or version limit we did not predict) -> the next
     kernel in the table; after the last, reference.py with a one-time warning naming the kernel and error.

Fused kernels, feature-detected on torch.ops.aten (names and signatures moved between torch releases):
  CPU   _scaled_dot_product_flash_attention_for_cpu (+ _backward): fp32, fp64, fp16, bf16, any head_dim.
  CUDA  _scaled_dot_product_cudnn_attention (+ _backward): fp16/bf16, head_dim % 8 == 0 and <= 256, sm90+,
        torch.backends.cuda.cudnn_sdp_enabled(), no dlse. On an H100 it is the fastest of the three (1.2-1.5x
        FA2, see README). Its lse is (B, H, N) or (B, H, N, 1) depending on the release, so before its first
        use per dtype and head_dim it must reproduce the flash kernel on a small case (_self_check);
        otherwise it is skipped.
        then _scaled_dot_product_flash_attention (+ _backward): fp16/bf16, head_dim % 8 == 0 and <= 256, sm80+.
        then _scaled_dot_product_efficient_attention (+ _backward): fp16/bf16/fp32, head_dim % 8 == 0.
Deterministic: the GQA sum is; the CUDA kernels' dq accumulation follows torch.use_deterministic_algorithms.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .merge import merge_attn_outputs
from .reference import effective_window, reference_attn_backward, reference_attn_forward


log = logging.getLogger(__name__)


def _aten_op(name: str):
    return getattr(torch.ops.aten, name, None)


# -- fused kernels on (B, H, N, D) tensors with equal head counts ----------------------------------------------


@dataclass(frozen=True)
class _Kernel:
    name: str
    forward: Callable  # (q, k, v, causal, scale) -> (out (B, H, Nq, D), lse (B, H, Nq) fp32)
    backward: Callable  # (dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)
    pad: int  # head-dim columns added to carry dlse (kernels needing head_dim % 8 get 8)


def _cpu_forward(q, k, v, causal, scale):
    out, lse = _aten_op("_scaled_dot_product_flash_attention_for_cpu")(q, k, v, 0.0, causal, scale=scale)
    return out, lse.float()


def _cpu_backward(dout, q, k, v, out, lse, causal, scale):
    # The kernel reads lse in its accumulation dtype (fp64 for fp64 inputs, else fp32).
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    op = _aten_op("_scaled_dot_product_flash_attention_for_cpu_backward")
    return op(dout, q, k, v, out, lse, 0.0, causal, scale=scale)


def _flash_forward(q, k, v, causal, scale):
    res = _aten_op("_scaled_dot_product_flash_attention")(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    # Without dropout the kernel never reads the RNG state, but the schema wants two tensors.
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.zeros((), dtype=torch.uint64, device=q.device)
    op = _aten_op("_scaled_dot_product_flash_attention_backward")
    return op(dout, q, k, v, out, lse.float().contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal,
              rng, unused, scale=scale)


def _efficient_forward(q, k, v, causal, scale):
    res = _aten_op("_scaled_dot_product_efficient_attention")(q, k, v, None, True, 0.0, causal, scale=scale)
    return res[0], res[1][..., :q.shape[2]]  # CUDA pads lse's last dim to a multiple of 32


def _efficient_backward(dout, q, k, v, out, lse, causal, scale):
    lse = lse.float()
    if torch.version.hip is None:
        lse = F.pad(lse, (0, -lse.shape[-1] % 32))  # the layout the forward returns
    seed = torch.zeros((), dtype=torch.int64)
    op = _aten_op("_scaled_dot_product_efficient_attention_backward")
    grads = op(dout, q, k, v, None, out, lse.contiguous(), seed, seed, 0.0, [True, True, True, False], causal,
               scale=scale)
    return grads[0], grads[1], grads[2]


_CUDNN_LSE_RANK: dict[str, int] = {}  # the rank of the lse the cuDNN forward returned: 3 or 4 (trailing 1)


def _cudnn_forward(q, k, v, causal, scale):
    res = _aten_op("_scaled_dot_product_cudnn_attention")(q, k, v, None, True, 0.0, causal, False, scale=scale)
    _CUDNN_LSE_RANK["rank"] = res[1].dim()
    return res[0], res[1].reshape(q.shape[:3]).float()


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    lse = lse.float().contiguous()
    if _CUDNN_LSE_RANK.get("rank") == 4:
        lse = lse.unsqueeze(-1)
    # cuDNN reads dout with out's strides: give both the same (contiguous) layout.
    out, dout = out.contiguous(), dout.contiguous()
    philox = torch.zeros((), dtype=torch.int64, device=q.device)  # no dropout: never read
    op = _aten_op("_scaled_dot_product_cudnn_attention_backward")
    return op(dout, q, k, v, out, lse, philox, philox, None, None, None, q.shape[2], k.shape[2], 0.0, causal,
              scale=scale)


_CPU = _Kernel("flash_attention_for_cpu", _cpu_forward, _cpu_backward, pad=1)
_FLASH = _Kernel("flash_attention (cuda)", _flash_forward, _flash_backward, pad=8)
_EFFICIENT = _Kernel("efficient_attention (cuda)", _efficient_forward, _efficient_backward, pad=8)
_CUDNN = _Kernel("cudnn_attention (cuda)", _cudnn_forward, _cudnn_backward, pad=8)


def _has(*names: str) -> bool:
    return all(_aten_op(n) is not None for n in names)


def _pick_kernels(device: torch.device, dtype: torch.dtype, head_dim: int, dlse: bool = False) -> list[_Kernel]:
    """The fused kernels for these inputs, best first; empty -> reference."""
    if device.type == "cpu":
        ok = _has("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
        return [_CPU] if ok else []
    if device.type != "cuda" or head_dim % 8 != 0:
        return []
    kernels = []
    half = dtype in (torch.float16, torch.bfloat16)
    arch = torch.cuda.get_device_capability(device)
    if (half and head_dim <= 256 and arch >= (8, 0)
            and _has("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward")):
        kernels.append(_FLASH)
    if (dtype in (torch.float16, torch.bfloat16, torch.float32)
            and _has("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward")):
        kernels.append(_EFFICIENT)
    if (half and head_dim <= 256 and arch >= (9, 0) and not dlse and torch.backends.cuda.cudnn_sdp_enabled()
            and _has("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward")
            and kernels and _self_check(_CUDNN, kernels[0], device, dtype, head_dim)):
        kernels.insert(0, _CUDNN)
    return kernels


_CHECKED: dict[tuple, bool] = {}


def _self_check(kernel: _Kernel, trusted: _Kernel, device, dtype, head_dim: int) -> bool:
    """Does `kernel` give `trusted`'s out, lse and gradients on a small causal case? Once per process, dtype and
    head_dim: it guards against an op whose layout or arguments moved in this torch release."""
    key = (kernel.name, str(device), dtype, head_dim)
    if key not in _CHECKED:
        gen = torch.Generator(device=device).manual_seed(0)
        # (B, N, H, D) storage seen as (B, H, N, D), the layout _fused_forward/_fused_backward hand over
        q, k, v, dout = (torch.randn(1, 128, 2, head_dim, generator=gen, device=device, dtype=dtype).transpose(1, 2)
                         for _ in range(4))
        try:
            results = []
            for kern in (kernel, trusted):
                out, lse = kern.forward(q, k, v, True, head_dim ** -0.5)
                results.append((out, lse, *kern.backward(dout, q, k, v, out, lse, True, head_dim ** -0.5)))
            errors = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(*results)]
            _CHECKED[key] = max(errors) < 2e-2
            reason = f"relative errors (out, lse, dq, dk, dv) {[f'{e:.1e}' for e in errors]}"
        except RuntimeError as err:
            _CHECKED[key], reason = False, str(err).splitlines()[0]
        if not _CHECKED[key]:
            log.info("sdpa backend: %s skipped for %s head_dim %d, it does not reproduce %s: %s", kernel.name, dtype,
                     head_dim, trusted.name, reason)
    return _CHECKED[key]


_WARNED: set[str] = set()


def _warn_fallback(kernel: _Kernel, err: RuntimeError) -> None:
    key = f"{kernel.name}: {err}".splitlines()[0]
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"sdpa backend: torch kernel {key}; using the reference attention instead", stacklevel=4)


# -- planning: which square-or-plain pieces express our mask ----------------------------------------------------


def _plan(nq: int, nk: int, causal: bool, window_size) -> Optional[list[tuple[int, int, int, bool]]]:
    """Pieces (q_start, k_start, k_end, causal) covering the mask, or None if a window needs the reference.

    Rows [q_start, Nq) of a piece attend keys [k_start, k_end); a causal piece is square (Nq - q_start ==
    k_end - k_start), where torch's top-left causal equals our bottom-right one.
    """
    left, right = effective_window(causal, window_size)
    if left >= nk - 1:
        left = -1  # j >= i + Nk - Nq - left holds for every key already
    if right >= nq - 1:
        right = -1  # j <= i + Nk - Nq + right holds for every key already
    if left != -1 or right not in (-1, 0):
        return None
    if right == -1:
        return [(0, 0, nk, False)]
    if nq == nk:
        return [(0, 0, nk, True)]
    if nq > nk:
        return [(nq - nk, 0, nk, True)]
    return [(0, 0, nk - nq, False), (0, nk - nq, nk, True)]


def _heads_first(t: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """(B, N, Hx, D) -> (B, Hx*groups, N, D); kv head h serves query heads h*groups .. h*groups+groups-1."""
    t = t.transpose(1, 2)  # (B, Hx, N, D) view
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fused_forward(kernel, pieces, q, k, v, scale):
    B, nq, H, D = q.shape
    groups = H // k.shape[2]
    qh, kh, vh = _heads_first(q), _heads_first(k, groups), _heads_first(v, groups)
    parts = []
    for q0, k0, k1, causal in pieces:
        o, l = kernel.forward(qh[:, :, q0:], kh[:, :, k0:k1], vh[:, :, k0:k1], causal, scale)
        if q0 > 0:  # rows before q0 see no key
            o = F.pad(o, (0, 0, q0, 0))
            l = F.pad(l, (q0, 0), value=float("-inf"))
        parts.append((o.transpose(1, 2), l))  # (B, Nq, H, D), (B, H, Nq)
    out, lse = parts[0] if len(parts) == 1 else merge_attn_outputs(parts)
    return out.contiguous(), lse.float().contiguous()


def _with_dlse_column(dout, q, k, v, out, dlse, pad):
    """Append `pad` head-dim columns so the kernel's dP gains dlse (see the module docstring)."""
    def extra(t, first):
        col = t.new_zeros(*t.shape[:-1], pad)
        if first is not None:
            col[..., 0] = first
        return torch.cat([t, col], dim=-1)

    # dout/out/q: (B, H, Nq, D); dlse (B, H, Nq) -> one value per row
    return (extra(dout, dlse.to(dout.dtype)), extra(q, None), extra(k, None), extra(v, 1.0), extra(out, None))


def _fused_backward(kernel, pieces, dout, q, k, v, out, lse, dlse, scale):
    B, nq, H, D = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    groups = H // hkv
    qh, kh, vh = _heads_first(q), _heads_first(k, groups), _heads_first(v, groups)
    douth, outh = _heads_first(dout), _heads_first(out)
    if dlse is not None:
        douth, qh, kh, vh, outh = _with_dlse_column(douth, qh, kh, vh, outh, dlse, kernel.pad)
    grads = [kernel.backward(douth[:, :, q0:], qh[:, :, q0:], kh[:, :, k0:k1], vh[:, :, k0:k1], outh[:, :, q0:],
                             lse[:, :, q0:], causal, scale) for q0, k0, k1, causal in pieces]
    if len(pieces) == 1 and pieces[0][0] == 0:
        dq, dk, dv = (g[..., :D] for g in grads[0])  # (B, H, N, D) each
    else:  # pieces overlap in rows (dq) or split rows: accumulate in fp32
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(B, H, nq, D, dtype=acc, device=q.device)
        dk = torch.zeros(B, H, nk, D, dtype=acc, device=q.device)
        dv = torch.zeros_like(dk)
        for (q0, k0, k1, _), g in zip(pieces, grads):
            dq[:, :, q0:] += g[0][..., :D]
            dk[:, :, k0:k1] += g[1][..., :D]
            dv[:, :, k0:k1] += g[2][..., :D]
    if groups > 1:  # sum each kv head's query group, in fp32: (B, H, Nk, D) -> (B, Hkv, Nk, D)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dk = dk.to(acc).view(B, hkv, groups, nk, D).sum(2)
        dv = dv.to(acc).view(B, hkv, groups, nk, D).sum(2)
    return (dq.transpose(1, 2).to(q.dtype).contiguous(), dk.transpose(1, 2).to(k.dtype).contiguous(),
            dv.transpose(1, 2).to(v.dtype).contiguous())


# -- the backend pair --------------------------------------------------------------------------------------------


def _run(kernels: list[_Kernel], fused):
    """fused(kernel) with the first kernel that does not raise; None when all did (the last one warns)."""
    for i, kernel in enumerate(kernels):
        try:
            return fused(kernel)
        except RuntimeError as err:
            if i == len(kernels) - 1:
                _warn_fallback(kernel, err)
            else:
                log.info("sdpa backend: %s failed (%s); trying %s", kernel.name, str(err).splitlines()[0],
                         kernels[i + 1].name)
    return None


def sdpa_attn_forward(q, k, v, causal, softmax_scale, window_size):
    """(out (B, Nq, H, D) in q.dtype, lse (B, H, Nq) fp32) via torch's fused kernel where it fits."""
    pieces = _plan(q.shape[1], k.shape[1], causal, window_size)
    kernels = _pick_kernels(q.device, q.dtype, q.shape[-1]) if pieces is not None else []
    result = _run(kernels, lambda kernel: _fused_forward(kernel, pieces, q, k, v, softmax_scale))
    return result if result is not None else reference_attn_forward(q, k, v, causal, softmax_scale, window_size)


def sdpa_attn_backward(dout, q, k, v, out, lse, causal, softmax_scale, window_size, dlse=None):
    """(dq, dk, dv) in the dtypes of q, k, v; P is recomputed from the given lse, dlse enters delta."""
    pieces = _plan(q.shape[1], k.shape[1], causal, window_size)
    kernels = _pick_kernels(q.device, q.dtype, q.shape[-1]) if pieces is not None else []
    if kernels and dlse is not None:  # the dlse column widens the head dim by the pad (one per device)
        kernels = _pick_kernels(q.device, q.dtype, q.shape[-1] + kernels[0].pad, dlse=True)
    result = _run(kernels, lambda kernel: _fused_backward(kernel, pieces, dout, q, k, v, out, lse, dlse, softmax_scale))
    if result is not None:
        return result
    return reference_attn_backward(dout, q, k, v, out, lse, causal, softmax_scale, window_size, dlse)
