"""The one place that decides, per call, whether a case runs on the Gluon Hopper kernels or on the Triton ones.

    out, lse = gluon_forward(q, k, v, causal, scale, window)   # backends.py registers these as backend "gluon",
    kernel, reason = route("forward", q, k, v)                   # which "auto" picks on sm_90 with triton 3.6

Every decision is logged once per (pass, kernel, reason) at INFO on the "ringflash.attention" logger, e.g.
    attention forward: gluon (dense, D=128)
    attention forward (varlen): gluon (packed documents, D=128)
"""

from __future__ import annotations

import torch

from ..backends import log_once
from . import device_props
from .plan import fp8_uncovered_reason, uncovered_reason

# Passes that `auto` routes to Gluon where a case is covered. "fp8" (the FP8 forward, flash_attn_func(fp8=...)) is
# left out: on an H200 the Gluon FP8 forward ran at 0.74-0.81x the Triton FP8 kernel (docs/results.md); adding it
# sends covered FP8 calls to Gluon.
GLUON_PASSES = {"forward", "backward"}
# Head dims at which the backward runs on Gluon: the warp-specialized kernel with dQ added by TMA reduce-add
# (bwd.WS_BWD_CONFIG; ordered by semaphores when deterministic), on an H200 1.20-1.27x the Triton backward at
# D=128 and 1.02-1.21x at D=64 (docs/results.md). Removing a head dim keeps `auto` on the Triton backward there.
GLUON_BWD_HEAD_DIMS = {64, 128}
# The Gluon backward adds dQ into an fp32 buffer the size of q (4 bytes per element, alive during the call); the
# Triton backward needs none. Where that buffer would take more than this fraction of the GPU's memory (at D=128
# and 8 heads, past ~1.2M tokens on an 80 GB GPU), `auto` keeps the Triton backward, so that the longest contexts
# that fit a GPU still do.
GLUON_BWD_MAX_DQ_FRACTION = 1 / 16
# Head dims at which the Gluon forward takes packed documents: at D=64 it measured ~6% behind the Triton varlen
# forward on an H200 (docs/results.md), at D=128 ~5% ahead.
GLUON_VARLEN_HEAD_DIMS = (128,)
# The Gluon backward of packed documents runs one program per (document, key block): with 150 documents of at
# most 700 tokens in 64K it measured 0.91x the Triton backward on an H200, with 37 of at most 2.8K 1.10x
# (docs/results.md). Below this longest document, `auto` keeps the Triton backward.
GLUON_VARLEN_BWD_MIN_SEQLEN = 1024


def route(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: bool = False,
          deterministic: bool = True, max_seqlen: int | None = None) -> tuple[str, str]:
    """("gluon" | "triton", reason) for one pass ("forward" / "backward") of a call; varlen: packed documents, the
    longest of max_seqlen query rows; deterministic: the backward's mode (named in the reason)."""
    D = q.shape[-1]
    if kind not in GLUON_PASSES:
        return "triton", f"the Gluon {kind} is switched off (dispatch.GLUON_PASSES)"
    why = uncovered_reason(q, k, v)
    if why is not None:
        return "triton", why
    if kind == "backward" and D not in GLUON_BWD_HEAD_DIMS:
        return "triton", f"D={D}: the Gluon backward is switched off there (dispatch.GLUON_BWD_HEAD_DIMS)"
    if kind == "backward":
        dq_bytes = 4 * q.numel()
        if not fits_in_memory(dq_bytes, q.device):
            return "triton", (f"the Gluon backward's fp32 dQ buffer ({dq_bytes / 2 ** 30:.1f} GiB) would exceed "
                              f"{GLUON_BWD_MAX_DQ_FRACTION:.3g} of the GPU's memory "
                              "(dispatch.GLUON_BWD_MAX_DQ_FRACTION)")
    if varlen and D not in GLUON_VARLEN_HEAD_DIMS:
        return "triton", f"packed documents at D={D}: the Triton forward measured faster"
    if varlen and kind == "backward" and max_seqlen is not None and max_seqlen < GLUON_VARLEN_BWD_MIN_SEQLEN:
        return "triton", (f"packed documents of at most {max_seqlen} rows: the Triton backward measured faster "
                          f"below {GLUON_VARLEN_BWD_MIN_SEQLEN} (dispatch.GLUON_VARLEN_BWD_MIN_SEQLEN)")
    mode = "" if kind == "forward" else (", deterministic" if deterministic else ", non-deterministic")
    return "gluon", f"{'packed documents' if varlen else 'dense'}, D={D}{mode}"


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes, None for other devices."""
    return device_props(device).total_memory if device.type == "cuda" else None


def fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """Whether a temporary of nbytes stays within GLUON_BWD_MAX_DQ_FRACTION of the device's memory (always off
    CUDA): the bound on the Gluon backward's fp32 dQ buffer, and on its fp32 dK / dV partials (bwd)."""
    memory = device_memory(device)
    return memory is None or nbytes <= GLUON_BWD_MAX_DQ_FRACTION * memory


def note(kind: str, kernel: str, reason: str, varlen: bool = False) -> None:
    log_once(f"attention {kind}{' (varlen)' if varlen else ''}: {kernel} ({reason})")


def _routed(kind, q, k, v, varlen=False, deterministic=True, max_seqlen=None) -> str:
    kernel, reason = route(kind, q, k, v, varlen, deterministic, max_seqlen)
    note(kind, kernel, reason, varlen)
    return kernel


def gluon_forward(q, k, v, causal, scale, window):
    if _routed("forward", q, k, v) == "gluon":
        from .fwd import gluon_attn_forward
        return gluon_attn_forward(q, k, v, causal, scale, window)
    from ..triton.fwd import triton_attn_forward
    return triton_attn_forward(q, k, v, causal, scale, window)


def gluon_backward(dout, q, k, v, out, lse, causal, scale, window, dlse, deterministic=True):
    if _routed("backward", q, k, v, deterministic=deterministic) == "gluon":
        from .bwd import gluon_attn_backward
        return gluon_attn_backward(dout, q, k, v, out, lse, causal, scale, window, dlse, deterministic)
    from ..triton.bwd import triton_attn_backward
    return triton_attn_backward(dout, q, k, v, out, lse, causal, scale, window, dlse, deterministic)


def gluon_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window):
    if _routed("forward", q, k, v, varlen=True) == "gluon":
        from .fwd import gluon_attn_varlen_forward
        return gluon_attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window)
    from ..triton.fwd import triton_attn_varlen_forward
    return triton_attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window)


def gluon_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, window, dlse,
                          deterministic=True):
    if _routed("backward", q, k, v, varlen=True, deterministic=deterministic, max_seqlen=int(max_q)) == "gluon":
        from .bwd import gluon_attn_varlen_backward
        return gluon_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, window,
                                          dlse, deterministic)
    from ..triton.bwd import triton_attn_varlen_backward
    return triton_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, window,
                                       dlse, deterministic)


def route_fp8(fq, out_dtype: torch.dtype) -> tuple[str, str]:
    """("gluon" | "triton", reason) for the FP8 forward of quantized inputs fq (attention.fp8.Fp8Qkv)."""
    if "fp8" not in GLUON_PASSES:
        return "triton", "the Gluon FP8 forward is switched off (dispatch.GLUON_PASSES)"
    why = fp8_uncovered_reason(fq, out_dtype)
    if why is not None:
        return "triton", why
    return "gluon", f"dense, D={fq.q.shape[-1]}"


def gluon_fp8_forward(fq, causal, scale, out_dtype):
    """The FP8 forward of quantized inputs on the Gluon kernel where route_fp8 sends it, else the Triton FP8 kernel."""
    kernel, reason = route_fp8(fq, out_dtype)
    log_once(f"attention forward (fp8): {kernel} ({reason})")
    if kernel == "gluon":
        from .fwd import gluon_fp8_forward as forward
        return forward(fq, causal, scale, out_dtype)
    from ..fp8.kernel import triton_fp8_forward
    return triton_fp8_forward(fq, causal, scale, out_dtype)
