"""Backend dispatch: one signature for every attention implementation ("gluon", "triton", "sdpa", "reference").

The low-level pair, for custom autograd (each call checks its inputs):

    out, lse = attn_forward(q, k, v, causal, softmax_scale, window_size, backend="auto")
    dq, dk, dv = attn_backward(dout, q, k, v, out, lse, causal, softmax_scale, window_size, dlse=None)

A caller that launches many blocks of one call (the ring) checks once and then launches unchecked:

    impl = check_attn_inputs("ring_attn_func", q, k, v, softmax_scale, window_size, backend)
    out, lse = launch_forward(impl, q_blk, k_blk, v_blk, causal, scale, window_size)   # per block

q (B, Nq, H, D), k/v (B, Nk, Hkv, D), lse (B, H, Nq) fp32 natural log. The varlen pair takes packed
(total, H, D) tensors with int32 cu_seqlens and returns lse (H, total_q). `backend="auto"` means the
`ATTN_BACKEND` environment variable if set, else "gluon" on an sm_90 GPU with the triton the Gluon kernels are
written for (attention/gluon/: Hopper kernels where a case is covered, the Triton ones for the rest), "triton"
on other GPUs, and the reference on CPU.

Backward determinism: `deterministic=None` (the default of both backward functions) follows the global
default, `set_deterministic(flag)` / `get_deterministic()`; it starts True unless the environment sets
RINGFLASH_DETERMINISTIC=0. False lets dq's additions land in any order: the Gluon backward's TMA reduce-adds
skip their semaphores, the Triton backward adds dq with float atomics in its dK/dV kernel instead of running a dQ
kernel; dq then varies in its last bits from run to run (docs/attention.md). `torch.use_deterministic_algorithms
(True)` always wins.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .reference import reference_attn_backward, reference_attn_forward
from .validation import check_options, check_qkv, check_varlen


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable  # (q, k, v, causal, scale, window) -> (out, lse)
    backward: Callable  # (dout, q, k, v, out, lse, causal, scale, window, dlse) -> (dq, dk, dv)
    varlen_forward: Optional[Callable] = None  # (q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window)
    varlen_backward: Optional[Callable] = None  # (dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, ..., dlse)
    check: Optional[Callable] = None  # (fn_name, q, k) -> None; raises ValueError for unsupported input
    nondeterministic_backward: bool = False  # both backwards take deterministic=; the others are always so


def _reference() -> Backend:
    return Backend("reference", reference_attn_forward, reference_attn_backward)


def _triton() -> Backend:
    # Imported lazily: triton is optional on CPU-only machines (the interpreter needs TRITON_INTERPRET=1).
    from .triton.bwd import triton_attn_backward, triton_attn_varlen_backward
    from .triton.fwd import check_triton_supported, triton_attn_forward, triton_attn_varlen_forward
    return Backend("triton", triton_attn_forward, triton_attn_backward, triton_attn_varlen_forward,
                   triton_attn_varlen_backward, check_triton_supported, nondeterministic_backward=True)


def _gluon() -> Backend:
    from .gluon.dispatch import gluon_backward, gluon_forward, gluon_varlen_backward, gluon_varlen_forward
    from .triton.fwd import check_triton_supported
    return Backend("gluon", gluon_forward, gluon_backward, gluon_varlen_forward, gluon_varlen_backward,
                   check_triton_supported, nondeterministic_backward=True)


def _sdpa() -> Backend:
    from .sdpa import sdpa_attn_backward, sdpa_attn_forward
    return Backend("sdpa", sdpa_attn_forward, sdpa_attn_backward)


_LOADERS: dict[str, Callable[[], Backend]] = {"reference": _reference, "triton": _triton, "gluon": _gluon,
                                              "sdpa": _sdpa}
_CACHE: dict[str, Backend] = {}


_DETERMINISTIC = [os.environ.get("RINGFLASH_DETERMINISTIC", "1").strip().lower() not in ("0", "false", "no", "off")]


def set_deterministic(flag: bool) -> None:
    """Global default for attn_backward / attn_varlen_backward(deterministic=None), hence for autograd."""
    if not isinstance(flag, bool):
        raise ValueError(f"set_deterministic: flag must be a bool, got {flag!r}")
    _DETERMINISTIC[0] = flag


def get_deterministic() -> bool:
    """The backward's default determinism: set_deterministic's flag, forced True by
    torch.use_deterministic_algorithms(True)."""
    return _DETERMINISTIC[0] or torch.are_deterministic_algorithms_enabled()


def _resolve_deterministic(fn, deterministic) -> bool:
    if deterministic is None:
        return get_deterministic()
    if not isinstance(deterministic, bool):
        raise ValueError(f"{fn}: deterministic must be None or a bool, got {deterministic!r}")
    return deterministic or torch.are_deterministic_algorithms_enabled()


def _determinism_kw(fn, impl, deterministic) -> dict:
    det = _resolve_deterministic(fn, deterministic)
    return {"deterministic": det} if impl.nondeterministic_backward else {}


def available_backends() -> list[str]:
    return ["auto", *_LOADERS]


def resolve_backend_name(backend: str, device: torch.device) -> str:
    if backend == "auto":
        backend = os.environ.get("ATTN_BACKEND", "auto") or "auto"
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        from .gluon import hopper_ready
        ready, why = hopper_ready(device)
        if not ready:
            log_once(f"attention backend auto: triton (the Gluon kernels do not run here: {why})")
        return "gluon" if ready else "triton"
    if backend not in _LOADERS:
        raise ValueError(f"backend must be one of {available_backends()}, got {backend!r}")
    return backend


_NOTED: set = set()


def log_once(message: str) -> None:
    """INFO on the "ringflash.attention" logger, once per distinct message per process."""
    if message not in _NOTED:
        _NOTED.add(message)
        logging.getLogger("ringflash.attention").info(message)


def get_backend(backend: str, device: torch.device) -> Backend:
    name = resolve_backend_name(backend, device)
    if name == "gluon":
        from .gluon import hopper_ready
        ready, why = hopper_ready(device)
        if not ready:
            raise ValueError(f"attention backend 'gluon' is not available here: {why}; use 'auto' or 'triton'")
    if name not in _CACHE:
        try:
            _CACHE[name] = _LOADERS[name]()
        except ImportError as e:
            raise ValueError(f"attention backend {name!r} is not available here: {e}") from e
    return _CACHE[name]


def check_attn_inputs(fn, q, k, v, softmax_scale, window_size, backend="auto", varlen=False) -> Backend:
    """Every check of a public entry point, run once per call: q/k/v, softmax_scale / window_size, and what the
    backend supports (its forward). Returns the backend; the launch_* functions then run without checking again.
    """
    check_qkv(q, k, v, fn, varlen=varlen)
    check_options(fn, softmax_scale, window_size)
    impl = get_backend(backend, q.device)
    if impl.check is not None:
        impl.check(fn, q, k)
    return impl


def check_backward_supported(fn, impl: Backend, q, k) -> None:
    """The backend's limits for the backward (Triton's backward takes fewer head dims than its forward)."""
    if impl.check is not None:
        impl.check(f"{fn} backward", q, k)


def softmax_scale_of(q, softmax_scale) -> float:
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


# -- unchecked launchers: for callers that validated once at their own entry point (interface.py, parallel/) --
# They take a Backend from check_attn_inputs, a float scale and a (left, right) tuple, and check nothing: a
# ring step launches many blocks of one validated call.


def launch_forward(impl: Backend, q, k, v, causal, scale, window_size):
    return impl.forward(q, k, v, causal, scale, window_size)


def launch_backward(impl: Backend, dout, q, k, v, out, lse, causal, scale, window_size, dlse=None,
                    deterministic=None):
    return impl.backward(dout, q, k, v, out, lse, causal, scale, window_size, dlse,
                         **_determinism_kw("attn_backward", impl, deterministic))


def launch_varlen_forward(impl: Backend, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_size):
    if impl.varlen_forward is not None:
        return impl.varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_size)
    return _varlen_forward_by_docs(impl, q, k, v, cu_q, cu_k, causal, scale, window_size)


def launch_varlen_backward(impl: Backend, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale,
                           window_size, dlse=None, deterministic=None):
    det_kw = _determinism_kw("attn_varlen_backward", impl, deterministic)
    if impl.varlen_backward is not None:
        return impl.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, window_size,
                                    dlse, **det_kw)
    return _varlen_backward_by_docs(impl, dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, window_size, dlse)


# -- the checked low-level pairs (DESIGN.md): check, then launch -------------------------------------------


def attn_forward(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), backend="auto", fp8=False):
    if fp8:  # FP8 forward (True or an attention.fp8.Fp8Config): Hopper kernel, or its fp32 emulation on CPU
        from .fp8 import fp8_attn_forward
        return fp8_attn_forward(q, k, v, causal, softmax_scale, window_size, resolve_backend_name(backend, q.device),
                                fp8)
    impl = check_attn_inputs("attn_forward", q, k, v, softmax_scale, window_size, backend)
    return launch_forward(impl, q, k, v, causal, softmax_scale_of(q, softmax_scale), tuple(window_size))


def attn_backward(dout, q, k, v, out, lse, causal=False, softmax_scale=None, window_size=(-1, -1),
                  dlse=None, backend="auto", deterministic=None):
    impl = check_attn_inputs("attn_backward", q, k, v, softmax_scale, window_size, backend)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"attn_backward: dout {tuple(dout.shape)} and out {tuple(out.shape)} must match "
                         f"q {tuple(q.shape)}")
    expected_lse = (q.shape[0], q.shape[2], q.shape[1])
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is not None and tuple(t.shape) != expected_lse:
            raise ValueError(f"attn_backward: {name} must be (B, H, Nq) = {expected_lse}, got {tuple(t.shape)}")
    return launch_backward(impl, dout, q, k, v, out, lse, causal, softmax_scale_of(q, softmax_scale),
                           tuple(window_size), dlse, deterministic)


# -- varlen: native where the backend has it, else one dense call per document ------------------------------


def _doc_slices(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(slice(a, b), slice(c, d)) for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])]


def _varlen_forward_by_docs(impl, q, k, v, cu_q, cu_k, causal, scale, window):
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for sq, sk in _doc_slices(cu_q, cu_k):
        if sq.stop == sq.start or sk.stop == sk.start:
            continue  # no queries, or no keys: out 0, lse -inf
        o, l = impl.forward(q[sq][None], k[sk][None], v[sk][None], causal, scale, window)
        out[sq], lse[:, sq] = o[0], l[0]
    return out, lse


def _varlen_backward_by_docs(impl, dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, window, dlse):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for sq, sk in _doc_slices(cu_q, cu_k):
        if sq.stop == sq.start or sk.stop == sk.start:
            continue
        dl = None if dlse is None else dlse[:, sq][None]
        g = impl.backward(dout[sq][None], q[sq][None], k[sk][None], v[sk][None], out[sq][None],
                          lse[:, sq][None], causal, scale, window, dl)
        dq[sq], dk[sk], dv[sk] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                        softmax_scale=None, window_size=(-1, -1), backend="auto"):
    fn = "attn_varlen_forward"
    impl = check_attn_inputs(fn, q, k, v, softmax_scale, window_size, backend, varlen=True)
    check_varlen(fn, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return launch_varlen_forward(impl, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                 softmax_scale_of(q, softmax_scale), tuple(window_size))


def attn_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal=False, softmax_scale=None, window_size=(-1, -1), dlse=None, backend="auto",
                         deterministic=None):
    fn = "attn_varlen_backward"
    impl = check_attn_inputs(fn, q, k, v, softmax_scale, window_size, backend, varlen=True)
    check_varlen(fn, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return launch_varlen_backward(impl, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, causal, softmax_scale_of(q, softmax_scale), tuple(window_size),
                                  dlse, deterministic)
