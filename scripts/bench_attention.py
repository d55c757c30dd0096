"""Attention benchmark: ringflash (Gluon / Triton) vs SDPA (flash, cuDNN, efficient) and FlexAttention, one process.

    python scripts/bench_attention.py                 # full grid -> docs/bench/attention_<gpu>.{json,md}
    python scripts/bench_attention.py --quick         # D=128, N in {8K, 32K}
    python scripts/bench_attention.py --extras-only   # only the 64K sliding-window and packed-document rows
    python scripts/bench_attention.py --dims 128 --rounds 3   # each case 3 times, providers interleaved: medians
    python scripts/bench_attention.py --sweep         # our kernel variants (tiles, TMA, warp spec) at N=8K

"ours" is `backend="auto"` with the deterministic backward (the default): the Gluon Hopper kernels where they
cover a case on an sm_90 GPU, the Triton ones elsewhere; "ours-triton" forces the portable Triton kernels;
"ours-atomic" is "ours" with attention.set_deterministic(False):
on an sm_90 GPU the warp-specialized Gluon backward with dQ additions in any order; elsewhere the
Triton backward with dQ accumulated inside the dK/dV kernel by per-element atomics, pointer loads;
"ours-atomic-tma" (opt-in: --providers) that Triton backward with TMA loads and whole dQ tiles added by TMA
reduce-add (triton_common.FEATURES["tma_reduce"]).

TFLOPS count 4*B*H*Nq*Nk*D per forward (visible pairs only: causal halves it, windows and packed documents
count what they attend to) and 2.5x that per backward; fwd+bwd uses the sum of the two medians. Timings
are medians of triton.testing.do_bench. B*N is held at 65536 tokens (B >= 1), 16 heads, bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import attention  # noqa: E402
from attention import flash_attn_func, flash_attn_varlen_func  # noqa: E402
from attention.triton.common import tile_configs  # noqa: E402
from scripts.provenance import source_commit  # noqa: E402

TOKENS, HEADS = 65536, 16
DEVICE, DTYPE = "cuda", torch.bfloat16  # the sweep's tensors (a CPU dry run of the script swaps them)
PRECOMPILE_N = 2048  # precompile workers run our kernels at this length (same specialisation: N % 16 == 0)
PROVIDERS = ["ours", "ours-triton", "ours-atomic", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"]
OURS = ("ours", "ours-triton", "ours-atomic", "ours-atomic-tma")  # module docstring: what each runs
SDPA = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def _our_mode(provider):
    """Set the backward our kernels run for `provider`; _our_mode("ours") restores the defaults."""
    from attention.triton import common as triton_common
    attention.set_deterministic(provider not in ("ours-atomic", "ours-atomic-tma"))
    triton_common.FEATURES["tma_reduce"] = provider == "ours-atomic-tma"
    from attention.gluon import dispatch
    dispatch.GLUON_PASSES.update({"forward", "backward"})
    dispatch.GLUON_BWD_HEAD_DIMS.update({64, 128})


def visible_pairs(n, causal, window):
    """Exact number of (query, key) pairs attended for Nq = Nk = n."""
    left, right = window
    right = 0 if causal else right
    lo = lambda i: 0 if left < 0 else max(0, i - left)  # noqa: E731
    hi = lambda i: n - 1 if right < 0 else min(n - 1, i + right)  # noqa: E731
    if left < 0 and right < 0:
        return n * n
    if left < 0 and right == 0:
        return n * n // 2  # the FlashAttention convention for causal
    return sum(hi(i) - lo(i) + 1 for i in range(n))


def bench_ms(fn, est_ms=None):
    """Median ms; shorter warm-up/repeat windows for long calls keep the whole run inside the budget."""
    if est_ms is None:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = (time.perf_counter() - t) * 1e3
    rep = max(30.0, min(300.0, 8 * est_ms))
    return triton.testing.do_bench(fn, warmup=max(10.0, 2 * est_ms), rep=rep, return_mode="median")


# -- providers: each returns (forward closure, tensors to differentiate) -------------------------------------


def _flex():
    from torch.nn.attention.flex_attention import flex_attention
    if not hasattr(_flex, "fn"):
        torch._dynamo.config.cache_size_limit = 64  # one compile per shape; never fall back to eager
        # the backward is timed repeatedly on one graph (retain_graph), which donated buffers forbid
        torch._functorch.config.donated_buffer = False
        _flex.fn = torch.compile(flex_attention, dynamic=False)
    return _flex.fn


def _flex_mask(n, causal, window, doc_ids=None):
    from torch.nn.attention.flex_attention import create_block_mask
    left, right = window

    def mask(b, h, qi, kj):
        ok = qi >= 0
        if causal or right == 0:
            ok = ok & (kj <= qi)
        elif right > 0:
            ok = ok & (kj <= qi + right)
        if left >= 0:
            ok = ok & (kj >= qi - left)
        if doc_ids is not None:
            ok = ok & (doc_ids[qi] == doc_ids[kj])
        return ok

    return create_block_mask(mask, None, None, n, n, device="cuda")


def make_call(provider, q, k, v, causal, window, doc=None):
    """q/k/v (B, N, H, D) with requires_grad; doc = (cu_seqlens, max_len, doc_ids) for packed documents."""
    n = q.shape[1]
    if provider in OURS:
        backend = "triton" if provider == "ours-triton" else "auto"
        if doc is not None:
            cu, max_len, _ = doc
            flat = [t.view(-1, *t.shape[2:]) for t in (q, k, v)]  # (B*N, H, D)
            return lambda: flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, causal=causal,
                                                  window_size=window, backend=backend)
        return lambda: flash_attn_func(q, k, v, causal=causal, window_size=window, backend=backend)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views
    if provider == "flex":
        fn = _flex()
        block_mask = None
        if causal or window != (-1, -1) or doc is not None:
            block_mask = _flex_mask(n, causal, window, None if doc is None else doc[2])
        return lambda: fn(qt, kt, vt, block_mask=block_mask)
    if doc is not None or window != (-1, -1):
        return None  # SDPA has neither packed documents nor windows without a dense N x N mask
    backend = SDPA[provider]

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    return call


def run_case(provider, B, n, D, causal, window=(-1, -1), n_docs=0):
    """One provider on one shape: fwd/bwd medians and TFLOPS, or a status ('OOM', 'n/a', 'error: ...')."""
    row = dict(provider=provider, B=B, N=n, H=HEADS, D=D, causal=causal, window=list(window), docs=n_docs)
    torch.manual_seed(0)
    _our_mode(provider)  # read when the timed backward runs
    try:
        q, k, v = (torch.randn(B, n, HEADS, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
        doc, pairs = None, visible_pairs(n, causal, window)
        if n_docs:
            doc, pairs = _packed_docs(B * n, n_docs)
        call = make_call(provider, q, k, v, causal, window, doc)
        if call is None:
            return {**row, "status": "n/a"}
        if provider == "sdpa_efficient" and n > 16384:
            return {**row, "status": "skipped"}  # 3x slower than the rest: it would dominate the run time
        out = call()
        dout = torch.randn_like(out)
        fwd_ms = bench_ms(call)
        bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        bwd_ms = bench_ms(bwd)
    except torch.OutOfMemoryError:
        return {**row, "status": "OOM"}
    except Exception as e:  # a baseline that cannot run this shape is marked, not fatal
        return {**row, "status": f"error: {type(e).__name__}: {str(e)[:160]}"}
    finally:
        _our_mode("ours")
        torch.cuda.empty_cache()
    flops = 4.0 * HEADS * D * pairs * (B if not n_docs else 1)
    if provider in OURS:
        row["tiles"] = _our_tiles()
    return {**row, "status": "ok", **_rates(flops, fwd_ms, bwd_ms)}


def _rates(flops, fwd_ms, bwd_ms):
    """Times and TFLOPS of one cell; the backward counts 2.5x the forward's FLOPs."""
    return {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_tflops": flops / fwd_ms * 1e-9,
            "bwd_tflops": 2.5 * flops / bwd_ms * 1e-9, "fwdbwd_tflops": 3.5 * flops / (fwd_ms + bwd_ms) * 1e-9}


def _packed_docs(total, n_docs, causal=True):
    """Deterministic uneven document lengths summing to total; returns ((cu, max_len, doc_ids), pairs)."""
    g = torch.Generator().manual_seed(1)
    w = torch.rand(n_docs, generator=g) + 0.25
    lens = (w / w.sum() * total).long()
    lens[-1] += total - int(lens.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32).to(DEVICE)
    doc_ids = torch.repeat_interleave(torch.arange(n_docs), lens).to(DEVICE)
    pairs = sum(int(n) * int(n) // 2 for n in lens)  # causal within each document
    return (cu, int(lens.max()), doc_ids), pairs


# -- grids -----------------------------------------------------------------------------------------------------


def grid_cases(ns, dims, extras):
    """(B, N, D, causal, window, n_docs) for every row of the comparison."""
    cases = [(max(1, TOKENS // n), n, D, causal, (-1, -1), 0) for D in dims for causal in (True, False) for n in ns]
    if extras:  # sliding window (Mistral-style 4K window) and packed documents, 64K tokens in one row
        cases += [(1, 65536, 128, True, (4095, 0), 0), (1, 65536, 128, True, (-1, -1), 37)]
    return cases


def precompile_grid(parts, ns, dims, providers, extras):
    """Build our autotune candidates for every case in `parts` processes at once; the timing process then
    finds them in Triton's disk cache instead of compiling them one after another. (Flex is left to the
    timing process: precompiling it in parallel ran the GPU out of memory on its 64K block masks.)"""
    import subprocess
    cmd = [sys.executable, __file__, "--ns", *map(str, ns), "--dims", *map(str, dims), "--providers", *providers]
    cmd += ([] if extras else ["--quick"]) + ([] if ns else ["--extras-only"])
    procs = [subprocess.Popen(cmd + ["--part", str(i), str(parts)]) for i in range(parts)]
    for p in procs:
        p.wait()


def _grid_worker(part, parts, ns, dims, providers, extras):
    from attention.triton import bwd as triton_bwd, common as triton_common, fwd as triton_fwd
    tuned = (triton_fwd.fwd_tuned, triton_bwd.dkdv_tuned, triton_bwd.dq_tuned, triton_bwd.dkdv_atomic_tuned)
    shipped = [t.configs for t in tuned]
    jobs = []
    for case in grid_cases(ns, dims, extras):
        jobs += [(p, case, i) for p in OURS if p in providers for i in range(max(map(len, shipped)))]
    for j, (provider, (B, n, D, causal, window, n_docs), i) in enumerate(jobs):
        if j % parts != part:
            continue
        _our_mode(provider)
        if provider in OURS:  # one candidate config per kernel; a short sequence specialises the same way
            for t, cfgs in zip(tuned, shipped):
                cfgs = triton_common.prune_configs(cfgs, None, USE_TMA=True, BLOCK_D=D)
                t.configs = [cfgs[i % len(cfgs)]]
            if not n_docs:
                B, n = 1, PRECOMPILE_N
        try:
            q, k, v = (torch.randn(B, n, HEADS, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
            doc = _packed_docs(B * n, n_docs)[0] if n_docs else None
            out = make_call(provider, q, k, v, causal, window, doc)()
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        except Exception as e:
            print(f"precompile {provider} {D} {n} {causal}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.empty_cache() if DEVICE == "cuda" else None


def main_grid(ns, dims, providers, extras, save, rounds=1):
    """Every case, `rounds` times with the providers interleaved: single timings of one kernel drift by up to
    ~8% within a process (docs/bench/fwd_paths_h100.json), so close cells are decided on the median."""
    rows = []
    for B, n, D, causal, window, n_docs in grid_cases(ns, dims, extras):
        for r in range(rounds):
            for p in providers:
                rows.append({**run_case(p, B, n, D, causal, window, n_docs), "round": r})
                _print_row(rows[-1])
                save(rows)  # after every row: a run cut short keeps what it measured (--render redraws it)
    return rows


def median_rows(rows):
    """One row per (case, provider): the median fwd / bwd time over its rounds (a failed round fails it)."""
    groups = {}
    for r in rows:
        key = (r["provider"], r["B"], r["N"], r["D"], r["causal"], tuple(r["window"]), r["docs"])
        groups.setdefault(key, []).append(r)
    merged = []
    for group in groups.values():
        bad = [r for r in group if r["status"] != "ok"]
        if bad or len(group) == 1:
            merged.append(bad[0] if bad else group[0])
            continue
        fwd, bwd = (statistics.median(r[k] for r in group) for k in ("fwd_ms", "bwd_ms"))
        first = group[0]
        flops = first["fwd_tflops"] * first["fwd_ms"] * 1e9  # rows carry times and rates; the FLOPs are their product
        merged.append({**first, "rounds": len(group), **_rates(flops, fwd, bwd),
                       "fwd_tflops_range": [min(r["fwd_tflops"] for r in group), max(r["fwd_tflops"] for r in group)],
                       "bwd_tflops_range": [min(r["bwd_tflops"] for r in group), max(r["bwd_tflops"] for r in group)]})
    return merged


def _print_row(r):
    tag = f"{r['provider']:>15} D={r['D']:<3} N={r['N']:<6} B={r['B']:<2} causal={int(r['causal'])} " \
          f"win={tuple(r['window'])} docs={r['docs']}"
    if r["status"] != "ok":
        print(f"{tag}  {r['status']}", flush=True)
    else:
        print(f"{tag}  fwd {r['fwd_tflops']:6.1f}  bwd {r['bwd_tflops']:6.1f}  fwd+bwd {r['fwdbwd_tflops']:6.1f} "
              f"TFLOPS  ({r['fwd_ms']:.3f} / {r['bwd_ms']:.3f} ms)", flush=True)


def markdown(rows, meta):
    lines = [f"# Attention benchmark — {meta['gpu']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bf16, {HEADS} heads, B*N = {TOKENS} tokens (B >= 1). "
             "TFLOPS: fwd / bwd (bwd = 2.5x fwd FLOPs; causal counts half). OOM = out of memory; "
             "n/a = the backend has no such mode; skipped = SDPA-efficient beyond 16K (too slow to time).", ""]
    rounds = max(r.get("round", 0) for r in rows) + 1
    if rounds > 1:
        lines[-2] += f" Each cell: the median of {rounds} rounds, providers interleaved."
    rows = median_rows(rows)
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    ok = lambda r: r["status"] == "ok"  # noqa: E731
    cell = lambda r: (f"{r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f}" if ok(r)  # noqa: E731
                      else r["status"] if r["status"] in ("OOM", "n/a", "skipped") else "error")
    groups = {}
    for r in rows:
        key = (r["D"], r["causal"], tuple(r["window"]), r["docs"])
        groups.setdefault(key, {}).setdefault(r["N"], {})[r["provider"]] = r
    for (D, causal, window, docs), by_n in groups.items():
        title = f"D={D}, {'causal' if causal else 'non-causal'}"
        title += f", window {window}" if window != (-1, -1) else ""
        title += f", {docs} packed documents (varlen)" if docs else ""
        lines += [f"## {title}", "", "| N | " + " | ".join(provs) + " | ours/flex fwd, bwd | ours/cuDNN fwd, bwd |",
                  "|---" * (len(provs) + 3) + "|"]
        for n, cells in sorted(by_n.items()):
            ratios = []
            for base in ("flex", "sdpa_cudnn"):
                a, b = cells.get("ours"), cells.get(base)
                ratios.append(f"{a['fwd_tflops'] / b['fwd_tflops']:.2f}, {a['bwd_tflops'] / b['bwd_tflops']:.2f}"
                              if a and b and ok(a) and ok(b) else "–")
            lines.append(f"| {n} | " + " | ".join(cell(cells[p]) if p in cells else "–" for p in provs)
                         + f" | {ratios[0]} | {ratios[1]} |")
        lines.append("")
    return "\n".join(lines)


# -- variant sweep of our kernels (tiles, TMA, warp specialization) ---------------------------------------------


def precompile(parts, dims, extra=()):
    """Compile every sweep variant in `parts` processes at once (Triton's disk cache is shared): the
    timing process then only loads them. Small inputs keep the same specialisation (all sizes % 16 == 0)."""
    import subprocess
    procs = [subprocess.Popen([sys.executable, __file__, "--sweep", "--ns", "256", "--part", str(i), str(parts),
                               "--dims", *map(str, dims), *extra]) for i in range(parts)]
    for p in procs:
        p.wait()


# candidates beyond the shipped lists: (BLOCK_M, BLOCK_N, warps, stages, warp_spec[, early_dp])
SWEEP_FWD = tile_configs([
    (128, 64, 8, 3, True), (128, 64, 8, 4, True), (128, 128, 8, 2, True), (128, 128, 8, 3, True),
    (128, 64, 8, 3, False), (128, 128, 8, 2, False), (128, 64, 4, 3, False), (64, 64, 4, 3, False),
    (128, 128, 4, 3, False)])
SWEEP_DKDV = tile_configs([
    (64, 128, 8, 2, False), (64, 128, 8, 3, False), (64, 128, 8, 2, True), (64, 128, 8, 3, True),
    (64, 128, 8, 4, False), (64, 64, 4, 2, False), (64, 64, 4, 3, False), (32, 128, 4, 3, False),
    (32, 64, 4, 3, False), (128, 128, 8, 2, False),
    (64, 128, 8, 3, False, True), (64, 128, 8, 3, True, True), (64, 64, 4, 2, False, True),
    (64, 64, 4, 3, False, True), (128, 64, 8, 3, False, True), (128, 64, 8, 2, False, True),
    (64, 128, 8, 4, False, True)])
# 8 warps over 32 queries x 128 keys: half the S^T / dP^T registers of the shipped 64x128 tile
SWEEP_DKDV += tile_configs([(32, 128, 8, 2, False, True), (32, 128, 8, 3, False, True), (32, 128, 8, 4, False, True)])
SWEEP_DKDV_ATOMIC = SWEEP_DKDV
SWEEP_DQ = tile_configs([
    (128, 64, 8, 2, False), (128, 64, 8, 3, False), (128, 64, 8, 2, True), (128, 64, 8, 3, True),
    (128, 64, 8, 4, False), (64, 64, 4, 2, False), (64, 64, 4, 3, False), (128, 32, 4, 3, False),
    (64, 128, 8, 2, False), (128, 128, 8, 2, False),
    (128, 64, 8, 3, False, True), (128, 64, 8, 4, False, True), (128, 32, 8, 3, False), (128, 32, 8, 4, False)])

# --order: the shipped lead tiles with dP issued after P (as shipped) and right behind S (EARLY_DP), each
# listed --rounds times in alternation so a few-percent difference is not drift
ORDER_DKDV = tile_configs([(64, 128, 8, 3, False, False), (64, 128, 8, 3, False, True)])
ORDER_DQ = tile_configs([(128, 64, 8, 3, False, False), (128, 64, 8, 3, False, True)])


def sweep(n, dims, kinds=("fwd", "dkdv", "dq", "atomic-bwd"), causals=(True, False), order_rounds=0):
    """Time each candidate config of each kernel alone (the others fixed), with and without TMA loads."""
    from attention.triton import bwd as triton_bwd, common as triton_common, fwd as triton_fwd
    rows = []
    B = 1 if _PART["compile_only"] else max(1, TOKENS // n)
    feats = triton_common.FEATURES
    for D in dims:
        for causal in causals:
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, n, HEADS, D, device=DEVICE, dtype=DTYPE) for _ in range(3))
            flops = 4.0 * B * HEADS * D * visible_pairs(n, causal, (-1, -1))
            ref = _sdpa_ref(q, k, v, causal)
            fwd = lambda: (triton_fwd.triton_attn_forward(q, k, v, causal, D ** -0.5, (-1, -1))[0],)  # noqa: E731
            out, lse = triton_fwd.triton_attn_forward(q, k, v, causal, D ** -0.5, (-1, -1))
            grads = lambda: triton_bwd.triton_attn_backward(ref[-1], q, k, v, out, lse, causal,  # noqa: E731
                                                            D ** -0.5, (-1, -1), None)
            dkdv = lambda: grads()[1:]  # noqa: E731
            dq = lambda: grads()[:1]  # noqa: E731
            atomic = lambda: triton_bwd.triton_attn_backward(ref[-1], q, k, v, out, lse, causal,  # noqa: E731
                                                             D ** -0.5, (-1, -1), None, deterministic=False)
            # GEMM work per kernel: forward 2 GEMMs; dK/dV 4 (QK^T, dV, dP, dK); dQ 3 (QK^T, dP, dQ);
            # dK/dV with atomic dQ 5 (the whole backward's count)
            for kind, tuned, cands, fn, work, want in (
                    ("fwd", triton_fwd.fwd_tuned, SWEEP_FWD, fwd, flops, ref[:1]),
                    ("dkdv", triton_bwd.dkdv_tuned, ORDER_DKDV * order_rounds or SWEEP_DKDV, dkdv, 2 * flops,
                     ref[2:4]),
                    ("dq", triton_bwd.dq_tuned, ORDER_DQ * order_rounds or SWEEP_DQ, dq, 1.5 * flops, ref[1:2]),
                    ("atomic-bwd", triton_bwd.dkdv_atomic_tuned, SWEEP_DKDV_ATOMIC, atomic, 2.5 * flops, ref[1:4])):
                if kind not in kinds:
                    continue
                shipped = tuned.configs
                for tma in ((True,) if order_rounds or _FILTER["tma_only"] else (False, True)):
                    for cfg in cands:
                        full_name = _cfg_name(cfg) + (" early-dP" if cfg.kwargs.get("EARLY_DP") else "")
                        if _FILTER["tiles"] and not any(t in full_name for t in _FILTER["tiles"]):
                            continue
                        if (cfg.kwargs["WARP_SPEC"] and not tma) or (D > 64 and cfg.kwargs["BLOCK_N"] == 128
                                                                    and cfg.kwargs["BLOCK_M"] == 128 and kind != "fwd"):
                            continue
                        feats.update(tma=tma, tma_error=None)
                        tuned.configs = [cfg]
                        name = ("tma+ws " if cfg.kwargs["WARP_SPEC"] else "tma " if tma else "ptr ") + _cfg_name(cfg)
                        name += " early-dP" if cfg.kwargs.get("EARLY_DP") else ""
                        with _only_kernel(triton_bwd, None if kind == "fwd" else tuned.fn):
                            rows.append(_time_variant(kind, name, D, causal, work, want, fn) | {"N": n})
                        if tma and not feats["tma"]:  # launch() fell back to pointer loads: the row timed those
                            rows[-1]["status"] += " (tma failed: " + str(feats["tma_error"])[:120] + ")"
                            rows[-1]["variant"] = "ptr (tma failed) " + rows[-1]["variant"].split(" ", 1)[1]
                            print(f"  ^ TMA build failed, timed with pointer loads: {feats['tma_error'][:100]}",
                                  flush=True)
                tuned.configs = shipped
                feats.update(tma=True, tma_error=None)
    return rows


def _our_tiles():
    """The tiles our kernels last ran with (the autotuners' picks), for the JSON."""
    from attention.triton import bwd as triton_bwd, common as triton_common, fwd as triton_fwd
    tma = "tma" if triton_common.FEATURES["tma"] else "ptr"
    tuned = dict(fwd=triton_fwd.fwd_tuned, dkdv=triton_bwd.dkdv_tuned, dq=triton_bwd.dq_tuned,
                 atomic=triton_bwd.dkdv_atomic_tuned)
    tiles = {k: f"{tma}{'+ws' if t.best_config.kwargs.get('WARP_SPEC') else ''} {_cfg_name(t.best_config)}"
                f"{' early-dP' if t.best_config.kwargs.get('EARLY_DP') else ''}"
             for k, t in tuned.items() if getattr(t, "best_config", None) is not None}
    from attention.gluon import hopper_ready
    if hopper_ready(torch.device(DEVICE))[0]:  # (BLOCK_M, BLOCK_N, STAGES) per head dim
        from attention.gluon import fwd as gluon_fwd
        tiles["gluon_fwd"] = {d: list(c) for d, c in gluon_fwd.FWD_CONFIG.items()}
    return tiles


def _cfg_name(cfg):
    return f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def _sdpa_ref(q, k, v, causal):
    """bf16 SDPA-flash out and grads (fp32 accumulation inside), plus the dout used for both."""
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    dout = torch.randn_like(o)
    grads = torch.autograd.grad(o, (qt, kt, vt), dout)
    return [o.transpose(1, 2)] + [g.transpose(1, 2) for g in grads] + [dout.transpose(1, 2).contiguous()]


class _only_kernel:
    """Within the block, the backward launches only `kernel` (plus the tiny preprocess), so each backward
    kernel is timed alone."""

    def __init__(self, module, kernel):
        self.module, self.kernel, self.real = module, kernel, module.launch

    def __enter__(self):
        if self.kernel is not None:
            real, kernel = self.real, self.kernel
            self.module.launch = lambda k, *a, **kw: real(k, *a, **kw) if k is kernel else None

    def __exit__(self, *exc):
        self.module.launch = self.real


_PART = {"part": 0, "parts": 1, "compile_only": False, "count": 0}
_FILTER = {"tiles": [], "tma_only": False}  # --tiles / --tma-only: a subset of the sweep


def _time_variant(kind, name, D, causal, flops, want, fn):
    row = dict(kind=kind, variant=name, D=D, causal=causal)
    _PART["count"] += 1
    if _PART["compile_only"]:  # a precompile worker: build its share of the variants into Triton's cache
        if _PART["count"] % _PART["parts"] == _PART["part"]:
            try:
                fn()
            except Exception as e:
                print(f"precompile {kind} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return row
    try:
        got = fn()
        row["rel_err"] = max(((g.float() - w.float()).norm() / w.float().norm()).item() for g, w in zip(got, want))
        ms = bench_ms(fn)
        row.update(status="ok", ms=ms, tflops=flops / ms * 1e-9)
    except Exception as e:
        row.update(status=f"error: {type(e).__name__}: {str(e)[:200]}")
    print(f"{kind:9} D={D:<3} causal={int(causal)} {name:24} " + (
        f"{row['tflops']:6.1f} TFLOPS  {row['ms']:.3f} ms  rel_err {row['rel_err']:.1e}" if row["status"] == "ok"
        else row["status"]), flush=True)
    return row


def meta():
    return dict(gpu=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, commit=source_commit())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="D=128, N in {8K, 32K}, no extra cases")
    ap.add_argument("--extras-only", action="store_true",
                    help="only the extra cases: a 4K sliding window and 37 packed documents, 64K tokens, D=128")
    ap.add_argument("--sweep", action="store_true", help="time our kernel variants instead of the comparison")
    ap.add_argument("--ns", type=int, nargs="*", help="sequence lengths (default 2K..128K)")
    ap.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--providers", nargs="*", default=PROVIDERS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "bench"))
    ap.add_argument("--kinds", nargs="*", default=["fwd", "dkdv", "dq", "atomic-bwd"], help="sweep: kernels to time")
    ap.add_argument("--causal", nargs="*", type=int, default=[1, 0], help="sweep: 1 causal, 0 not")
    ap.add_argument("--precompile", type=int, default=0, help="compile kernels in N processes first")
    ap.add_argument("--part", type=int, nargs=2, help=argparse.SUPPRESS)  # internal: precompile worker i of n
    ap.add_argument("--rounds", type=int, default=1, help="grid: time every case this often, interleaved")
    ap.add_argument("--order", action="store_true",
                    help="sweep: only the shipped backward tiles, dP GEMM late vs early, --rounds times alternating")
    ap.add_argument("--render", metavar="JSON", help="redraw the markdown table of an earlier run's JSON")
    ap.add_argument("--tiles", nargs="*", default=[], help="sweep: only variants whose name holds one of these "
                    "(e.g. '32x128 w8' 'early-dP')")
    ap.add_argument("--tma-only", action="store_true", help="sweep: TMA loads only (no pointer-load rows)")
    args = ap.parse_args()
    _FILTER.update(tiles=args.tiles, tma_only=args.tma_only)
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        with open(args.render[:-len(".json")] + ".md", "w") as f:
            f.write(markdown(data["rows"], data))
        return
    order_rounds = args.rounds if args.order else 0
    if args.part and args.sweep:
        _PART.update(part=args.part[0], parts=args.part[1], compile_only=True)
        sweep(args.ns[0], args.dims, args.kinds, [bool(c) for c in args.causal], order_rounds)
        return
    ns = args.ns or ([8192, 32768] if args.quick else [2048 << i for i in range(7)])
    ns = [] if args.extras_only else ns
    dims = [128] if args.quick else args.dims
    extras = args.extras_only or not args.quick
    if args.part:
        _grid_worker(args.part[0], args.part[1], ns, dims, args.providers, extras)
        return
    info = meta()
    gpu_tag = info["gpu"].replace("NVIDIA ", "").split()[0].lower()
    os.makedirs(args.out, exist_ok=True)
    if args.sweep:
        if args.precompile:
            t = time.time()
            # the workers must walk the same candidate list as this process (their share is by position)
            order = ["--order", "--rounds", str(args.rounds)] if args.order else []
            order += ["--tiles", *args.tiles] * bool(args.tiles) + ["--tma-only"] * args.tma_only
            precompile(args.precompile, args.dims,
                       ["--kinds", *args.kinds, "--causal", *map(str, args.causal), *order])
            print(f"precompiled in {time.time() - t:.0f}s", flush=True)
        rows = [r for n in (args.ns or [8192])
                for r in sweep(n, args.dims, args.kinds, [bool(c) for c in args.causal], order_rounds)]
        with open(os.path.join(args.out, f"sweep{'_order' if args.order else ''}_{gpu_tag}.json"), "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)
        return
    if args.precompile:
        t = time.time()
        precompile_grid(args.precompile, ns, dims, args.providers, extras)
        print(f"precompiled in {time.time() - t:.0f}s", flush=True)
    suffix = "_extras" if args.extras_only else "_quick" if args.quick else ""
    stem = os.path.join(args.out, f"attention_{gpu_tag}{suffix}")

    def save(rows):
        with open(stem + ".json", "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)

    rows = main_grid(ns, dims, args.providers, extras, save, args.rounds)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, info))
    print(markdown(rows, info))


if __name__ == "__main__":
    main()
