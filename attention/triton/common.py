"""Pieces shared by the Triton forward and backward kernels: masks, loop bounds, loads, launch helpers.

    from .common import key_segments, query_segments, visible, load_rows

Conventions: scores are kept in base 2 (q.k * softmax_scale * log2(e)) so the kernels use exp2; the lse
that leaves a kernel is the natural log. A document's query i sees key j iff
    i + off - left <= j <= i + off + right,   off = seqlen_k - seqlen_q   (bottom-right aligned),
with HAS_LEFT / HAS_RIGHT false meaning unbounded on that side (causal == right 0).

Every kernel walks its loop in three segments, so that the common case runs without masks:
    [lo, a) masked   -- left edge of a sliding window
    [a, b)  unmasked -- tiles where every (row, column) pair is visible and in bounds
    [b, hi) masked   -- causal diagonal, right window edge, sequence tail
Blocks outside [lo, hi) are never visited.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): natural-log scores -> base 2 (host side)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2): base-2 lse -> natural log (inside kernels)

# Triton reads TRITON_INTERPRET when a kernel is decorated, so what counts is its value at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def doc_bounds(Cu, b, seqlen, IS_VARLEN: tl.constexpr):
    """(start row, length) of document b: packed rows from cu_seqlens, or the whole dense sequence."""
    if IS_VARLEN:
        start = tl.load(Cu + b)
        length = tl.load(Cu + b + 1) - start
    else:
        start = b * 0
        length = seqlen + b * 0
    return start, length


@triton.jit
def key_segments(m0, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT: tl.constexpr,
                 HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys for query rows [m0, m0+BLOCK_M): returns (lo, a, b, hi) for the three loop segments."""
    m1 = tl.minimum(m0 + BLOCK_M, seqlen_q)  # one past the last real row
    off = seqlen_k - seqlen_q
    lo = m0 * 0
    hi = seqlen_k + m0 * 0
    full_lo = lo  # first key that every row sees
    full_hi = hi  # one past the last key that every row sees
    if HAS_LEFT:
        lo = tl.maximum(lo, m0 + off - win_left)
        full_lo = m1 - 1 + off - win_left
    if HAS_RIGHT:
        hi = tl.minimum(hi, m1 - 1 + off + win_right + 1)
        full_hi = tl.minimum(full_hi, m0 + off + win_right + 1)
    hi = tl.maximum(hi, lo)
    n_blocks = tl.cdiv(hi - lo, BLOCK_N)
    # interior block t covers [lo + t*BLOCK_N, lo + (t+1)*BLOCK_N) and must sit inside [full_lo, full_hi)
    t_a = tl.minimum(tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N), n_blocks)
    t_b = tl.maximum(tl.minimum(tl.maximum(full_hi - lo, 0) // BLOCK_N, n_blocks), t_a)
    return lo, lo + t_a * BLOCK_N, lo + t_b * BLOCK_N, hi


@triton.jit
def query_segments(n0, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ALIGNED: tl.constexpr = False):
    """Queries that see keys [n0, n0+BLOCK_N): returns (lo, a, b, hi) for the three loop segments.

    Mirror of key_segments: row i sees key j iff j - off - right <= i <= j - off + left. ALIGNED: lo rounded down
    to a multiple of BLOCK_M (plan_bwd.query_range's aligned=True; the Gluon backward's deterministic mode).
    """
    n1 = tl.minimum(n0 + BLOCK_N, seqlen_k)  # one past the last real key
    off = seqlen_k - seqlen_q
    lo = n0 * 0
    hi = seqlen_q + n0 * 0
    full_lo = lo
    full_hi = hi
    if HAS_RIGHT:
        lo = tl.maximum(lo, n0 - off - win_right)
        full_lo = n0 + BLOCK_N - 1 - off - win_right  # uses the padded block end: tail keys need the mask
    if HAS_LEFT:
        hi = tl.minimum(hi, n1 - 1 - off + win_left + 1)
        full_hi = tl.minimum(full_hi, n0 - off + win_left + 1)
    if n0 + BLOCK_N > seqlen_k:
        full_hi = lo  # a key block that runs past the end is masked everywhere
    if ALIGNED:
        lo -= lo % BLOCK_M
    hi = tl.maximum(hi, lo)
    n_blocks = tl.cdiv(hi - lo, BLOCK_M)
    t_a = tl.minimum(tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_M), n_blocks)
    t_b = tl.maximum(tl.minimum(tl.maximum(full_hi - lo, 0) // BLOCK_M, n_blocks), t_a)
    return lo, lo + t_a * BLOCK_M, lo + t_b * BLOCK_M, hi


@triton.jit
def visible(offs_m, offs_n, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT: tl.constexpr,
            HAS_RIGHT: tl.constexpr):
    """Bool (BLOCK_M, BLOCK_N): row offs_m sees key offs_n, both in bounds."""
    diag = offs_m[:, None] + (seqlen_k - seqlen_q)
    cols = offs_n[None, :]
    mask = (cols < seqlen_k) & (offs_m[:, None] < seqlen_q)
    if HAS_LEFT:
        mask = mask & (cols >= diag - win_left)
    if HAS_RIGHT:
        mask = mask & (cols <= diag + win_right)
    return mask


@triton.jit
def visible_t(offs_n, offs_m, seqlen_q, seqlen_k, win_left, win_right, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr):
    """visible() in the transposed (BLOCK_N, BLOCK_M) layout that the dK/dV kernel works in."""
    diag = offs_m[None, :] + (seqlen_k - seqlen_q)
    cols = offs_n[:, None]
    mask = (cols < seqlen_k) & (offs_m[None, :] < seqlen_q)
    if HAS_LEFT:
        mask = mask & (cols >= diag - win_left)
    if HAS_RIGHT:
        mask = mask & (cols <= diag + win_right)
    return mask


@triton.jit
def load_rows(base, rows, stride_row, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CHECK_ROWS: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= n_rows (if CHECK_ROWS) and padded columns read 0."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def load_tile(src, start, rows, stride_row, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + len(rows)) of one head: through a tensor descriptor (USE_TMA; the copy engine
    zero-fills past the descriptor's shape) or from a base pointer with load_rows."""
    if USE_TMA:
        tile = src.load([start, 0])
    else:
        tile = load_rows(src, rows, stride_row, n_rows, offs_d, HEAD_DIM, BLOCK_D, CHECK_ROWS)
    return tile


@triton.jit
def store_rows(base, rows, stride_row, n_rows, offs_d, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, value, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def atomic_add_rows(base, rows, stride_row, n_rows, offs_d, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    CHECK_ROWS: tl.constexpr):
    """Float atomic add of a (len(rows), BLOCK_D) tile; rows >= n_rows (if CHECK_ROWS) and padded columns are
    skipped. Relaxed order: only the sum matters, and nothing reads it before the kernel ends."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :]
    if CHECK_ROWS:
        tl.atomic_add(ptrs, value, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    elif BLOCK_D == HEAD_DIM:
        tl.atomic_add(ptrs, value, sem="relaxed")
    else:
        tl.atomic_add(ptrs, value, mask=(rows[:, None] >= 0) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")


# -- host side ---------------------------------------------------------------------------------------------


def window_flags(causal: bool, window_size) -> tuple[bool, bool, int, int]:
    """(HAS_LEFT, HAS_RIGHT, left, right) for the kernels; causal == window (left, 0)."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left >= 0, right >= 0, max(left, 0), max(right, 0)


# length classes: under 4K tokens, 4K to 8K, 8K and up (all multiples of 16, which Triton specialises alike)
SHORT, MID, LONG = 16, 32, 48


def length_class(max_len: int) -> int:
    """Autotune key for how long the kernels' loops run. Without it the tile timed on the first call (say 2K
    tokens: many programs, a few steps each) is kept for every later length, 1M included. Three classes, so a
    new length rarely retunes; the class adds no compile."""
    return LONG if max_len >= 8192 else MID if max_len >= 4096 else SHORT


# The autotuner times every candidate tile on the very call it is handed. At 2M tokens one dK/dV pass of one
# layer takes ~35 s on an H100 and each candidate runs ~8 times, so the first training step would spend over
# twenty minutes tuning. A call longer than STAND_IN["above"] therefore first runs the same kernels on a
# STAND_IN["len"]-token stand-in with the same autotune key (head dim, window flags, dtypes, length class);
# the long call then reuses the pick.
STAND_IN = {"above": 65536, "len": 16384, "on_cpu": False}  # on_cpu: tests drive it through the interpreter
_STOOD_IN: set = set()


def wants_stand_in(tag: tuple, max_len: int, q: torch.Tensor) -> bool:
    """True the first time (per process) a call described by `tag` is long enough to tune on a stand-in."""
    tunes = q.is_cuda and not INTERPRET
    if not (tunes or STAND_IN["on_cpu"]) or max_len <= STAND_IN["above"] or tag in _STOOD_IN:
        return False
    _STOOD_IN.add(tag)
    return True


def stand_in_qkv(q: torch.Tensor, k: torch.Tensor, varlen: bool):
    """Random q, k, v of STAND_IN["len"] tokens with q's and k's heads, head dim, dtype and device, and cu_seqlens:
    (1, n, H, D) dense with cu None, or (n, H, D) packed as one document with int32 cu [0, n]."""
    n = STAND_IN["len"]
    lead = (n,) if varlen else (1, n)
    g = torch.Generator(device=q.device).manual_seed(0)
    make = lambda t: torch.randn(*lead, *t.shape[-2:], generator=g, device=t.device).to(t.dtype)  # noqa: E731
    cu = torch.tensor([0, n], dtype=torch.int32, device=q.device) if varlen else None
    return make(q), make(k), make(k), cu


def block_d(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)


def hopper_features_ok(q: torch.Tensor) -> bool:
    """TMA descriptors need sm_90+ and a power-of-two head_dim; the interpreter runs them only on request."""
    if q.shape[-1] != block_d(q.shape[-1]):
        return False
    if INTERPRET:
        return FEATURES["interpret_tma"]
    return q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9


# "tma" turns itself off (keeping the reason) if this Triton cannot build the descriptor path;
# "interpret_tma" lets the CPU tests run the descriptor path through the interpreter;
# "tma_reduce": the atomic-dQ dK/dV kernel loads through TMA and adds its dQ tiles with TMA reduce-add
# (desc.atomic_add). Off: pointer loads and per-element atomics, which leave the shared memory for a fourth
# pipeline stage (H100, 16K, D=128: 405-427 TFLOPS backward against 353-355; docs/bench/sweep_atomic_h100_16k.json).
# The interpreter has no reduce-add: there the flag only switches the loads.
FEATURES = {"tma": True, "tma_error": None, "interpret_tma": False, "tma_reduce": False}


def _ensure_tma_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need scratch memory from Triton's allocator. It is a context variable,
    so it is set on every launch: autograd runs the backward in its own thread."""
    triton.set_allocator(_CPU_ALLOC if device.type == "cpu" else _CUDA_ALLOC)


def _CPU_ALLOC(size, align, stream):
    return torch.empty(size, dtype=torch.int8)


def _CUDA_ALLOC(size, align, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tile_configs(entries) -> list:
    """(BLOCK_M, BLOCK_N, warps, stages, warp_spec[, early_dp]) tuples -> triton.Config list. EARLY_DP is set only
    where a sixth field is given: the backward kernels default it to False, the forward kernel has no such
    parameter."""
    extra = lambda e: {"EARLY_DP": e[5]} if e[5:] else {}  # noqa: E731
    return [triton.Config({"BLOCK_M": e[0], "BLOCK_N": e[1], "WARP_SPEC": e[4], **extra(e)},
                          num_warps=e[2], num_stages=e[3]) for e in entries]


def prune_configs(configs, named_args, **kwargs):
    """Warp specialization only rides on TMA loads; at head_dim 128, 4 warps cannot hold 128x128 tiles
    (2-3x slower on H100); head_dim 256 only fits 64x64 tiles."""
    keep = [c for c in configs if kwargs["USE_TMA"] or not c.kwargs.get("WARP_SPEC", False)]
    area = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]  # noqa: E731
    if kwargs["BLOCK_D"] > 128:
        keep = [c for c in keep if area(c) <= 64 * 64]
    elif kwargs["BLOCK_D"] == 128:
        keep = [c for c in keep if c.num_warps == 8 or area(c) < 128 * 128]
    return keep or configs[-1:]


def launch(kernel, tuned, interpret_config, grid, args, kwargs, q, allow_tma: bool = True) -> None:
    """Run `tuned` (autotuned) with TMA loads where allowed and this GPU and Triton support them, else plain loads.

    Under the interpreter the plain kernel runs with one small fixed tile. `grid` takes the config dict.
    """
    use_tma = allow_tma and FEATURES["tma"] and hopper_features_ok(q)
    if use_tma:
        _ensure_tma_allocator(q.device)
    if INTERPRET:
        kernel[grid(interpret_config)](*args, **kwargs, **interpret_config, USE_TMA=use_tma)
        return
    if use_tma:
        try:
            tuned[grid](*args, **kwargs, USE_TMA=True)
            return
        except Exception as e:  # a Triton that cannot build the descriptor path: plain loads from now on
            FEATURES["tma"], FEATURES["tma_error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
            warnings.warn(f"ringflash: TMA loads unavailable, using pointer loads ({FEATURES['tma_error']})")
    tuned[grid](*args, **kwargs, USE_TMA=False)
