"""The attention forward alone: the Gluon forward at one or more tiles against the Triton forward and cuDNN, one GPU.

    python scripts/bench_forward.py --head-dim 64                          # -> docs/bench/forward_d64_<gpu>.json
    python scripts/bench_forward.py --head-dim 64 --tiles 128,128,3 192,128,2 --out /tmp/f64.json   # tiles to try
    python scripts/bench_forward.py --head-dim 64 --against DIR --against-commit 37e53ee --cases 0 0 2   # A/B

--tiles runs the Gluon forward (attention.gluon.fwd) at each (BLOCK_M, BLOCK_N, STAGES) given, in place of
FWD_CONFIG's entry for the head dim (FWD_VARLEN_CONFIG's for packed documents); BLOCK_M is 64 rows per consumer
warpgroup (128: two, 192: three). Without it the shipped tiles run (dense and packed documents, both in every
case). --against DIR imports the attention package of the checkout at DIR under another name and times its Gluon
forward (at its own tiles) beside this tree's on the same tensors (bench_backward's --against: the A/B of a kernel
change; meta.against names DIR's commit, or --against-commit's). --cases runs only those positions of CASES, in
the order given, repeats included; --rounds sets the interleaved rounds (3).

Per case (bf16, B*N = 65536 tokens for N <= 64K, else B = 1): cuDNN's forward (torch SDPA), the Triton forward and
the Gluon forward at each tile, timed in 3 interleaved rounds of triton.testing.do_bench; each figure is the median
round in TFLOPS (4 * B * H * D per visible (query, key) pair: causal counts half). The last case packs 37 causal
documents of uneven lengths into 64K tokens (bench_attention's), for the varlen forwards; cuDNN has none. Each row
also holds every Gluon tile's relative error of out, and the largest lse difference, against the Triton forward.
Rows are written to the JSON as they finish.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scripts.bench_attention import meta, visible_pairs  # noqa: E402
from scripts.bench_backward import (ROUNDS, add_ab_options, against_meta, check_ab_options, rel,  # noqa: E402
                                    time_rounds)

# (causal, N, heads, kv heads, packed documents)
CASES = [(True, 8192, 16, 16, 0), (True, 32768, 16, 16, 0), (False, 8192, 16, 16, 0), (False, 32768, 16, 16, 0),
         (True, 131072, 16, 16, 0), (True, 32768, 32, 8, 0), (True, 65536, 16, 16, 37)]


def tile_name(tile) -> str:
    return "gluon_" + "x".join(map(str, tile))


def bench_case(causal: bool, n: int, heads: int, kv_heads: int, n_docs: int, head_dim: int, tiles: list,
               against=None, rounds: int = ROUNDS) -> dict:
    """One case; against: another checkout's gluon.fwd module (bench_backward.load_checkout), timed as "against"."""
    if n_docs:
        return _bench_docs(causal, n, heads, kv_heads, n_docs, head_dim, tiles, against, rounds)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attention.gluon import fwd
    from attention.triton.fwd import triton_attn_forward

    D, B, sc = head_dim, max(1, 65536 // n), head_dim ** -0.5
    q = torch.randn(B, n, heads, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, n, kv_heads, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, n, kv_heads, D, device="cuda", dtype=torch.bfloat16)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=heads != kv_heads)

    fns = {"cudnn": cudnn, "triton": lambda: triton_attn_forward(q, k, v, causal, sc, (-1, -1))}
    fns.update({tile_name(t): _at_tile(fwd.FWD_CONFIG, D, t, lambda: fwd.gluon_attn_forward(q, k, v, causal, sc,
                                                                                         (-1, -1)))
                for t in tiles})
    if against is not None:
        fns["against"] = lambda: against.gluon_attn_forward(q, k, v, causal, sc, (-1, -1))
    return _finish(dict(causal=causal, N=n, B=B, H=heads, Hkv=kv_heads, D=D), fns, tiles,
                   4 * B * heads * visible_pairs(n, causal, (-1, -1)) * D, ratio_to="cudnn", rounds=rounds)


def _bench_docs(causal: bool, n: int, heads: int, kv_heads: int, n_docs: int, D: int, tiles: list, against=None,
                rounds: int = ROUNDS) -> dict:
    """n tokens in n_docs packed documents (bench_attention's lengths): the Triton and Gluon varlen forwards."""
    from attention.gluon import fwd
    from attention.triton.fwd import triton_attn_varlen_forward
    from scripts.bench_attention import _packed_docs

    q = torch.randn(n, heads, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, kv_heads, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, kv_heads, D, device="cuda", dtype=torch.bfloat16)
    (cu, longest, _), pairs = _packed_docs(n, n_docs, causal)
    args = (q, k, v, cu, cu, longest, longest, causal, D ** -0.5, (-1, -1))
    fns = {"triton": lambda: triton_attn_varlen_forward(*args)}
    fns.update({tile_name(t): _at_tile(fwd.FWD_VARLEN_CONFIG, D, t, lambda: fwd.gluon_attn_varlen_forward(*args))
                for t in tiles})
    if against is not None:
        fns["against"] = lambda: against.gluon_attn_varlen_forward(*args)
    return _finish(dict(causal=causal, N=n, B=1, H=heads, Hkv=kv_heads, D=D, docs=n_docs, longest=longest), fns,
                   tiles, 4 * heads * pairs * D, ratio_to="triton", rounds=rounds)


def _at_tile(config: dict, D: int, tile: tuple, call):
    """call() with config[D] (fwd.FWD_CONFIG or FWD_VARLEN_CONFIG) set to tile for its duration."""
    def run():
        shipped = config[D]
        config[D] = tile
        try:
            return call()
        finally:
            config[D] = shipped
    return run


def _finish(row: dict, fns: dict, tiles: list, flops: float, ratio_to: str, rounds: int = ROUNDS) -> dict:
    """Errors of each tile (and of fns["against"], another checkout's forward) against fns["triton"], then TFLOPS of
    the median of interleaved rounds (time_rounds) and each tile's ratio to fns[ratio_to] (and to "against")."""
    ref_out, ref_lse = fns["triton"]()
    row["err_vs_triton"] = {}
    compared = [tile_name(t) for t in tiles] + (["against"] if "against" in fns else [])
    for name in compared:
        out, lse = fns[name]()
        row["err_vs_triton"][name] = [round(rel(out, ref_out), 5), round((lse - ref_lse).abs().max().item(), 5)]
    del ref_out, ref_lse
    time_rounds(row, fns, flops, rounds)
    for t in tiles:
        row[f"{tile_name(t)}/{ratio_to}"] = round(row[tile_name(t)] / row[ratio_to], 3)
        if "against" in fns:
            row[f"{tile_name(t)}/against"] = round(row[tile_name(t)] / row["against"], 3)
    return row


def parse_tile(text: str) -> tuple:
    try:
        tile = tuple(int(x) for x in text.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 3 or tile[0] not in (128, 192) or tile[1] not in (64, 128) or not 1 <= tile[2] <= 4:
        raise argparse.ArgumentTypeError(f"BLOCK_M,BLOCK_N,STAGES with BLOCK_M 128 or 192, BLOCK_N 64 or "
                                         f"128 and 1-4 stages, got {text!r}")
    return tile


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default docs/bench/forward_d<D>_<gpu>.json)")
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--tiles", type=parse_tile, nargs="+", metavar="BM,BN,STAGES",
                    help="Gluon forward tiles to time (default: the shipped FWD_CONFIG entry)")
    add_ab_options(ap, "forward")
    args = ap.parse_args(argv)
    against = check_ab_options(args, CASES, "CASES", "gluon.fwd")
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_forward.py needs a CUDA GPU (cuDNN and the Gluon kernels)")
    from attention.gluon import fwd, hopper_ready
    ready, why = hopper_ready(torch.device("cuda"))
    if not ready:
        raise SystemExit(f"error: the Gluon kernels cannot run here: {why}")
    shipped = {"dense": fwd.FWD_CONFIG[args.head_dim], "packed documents": fwd.FWD_VARLEN_CONFIG[args.head_dim]}
    tiles = args.tiles or sorted(set(shipped.values()))
    info = dict(meta(), head_dim=args.head_dim, tiles=tiles, shipped=shipped, rounds=args.rounds)
    if against is not None:
        info["against"] = against_meta(args)
    out = Path(args.out or f"docs/bench/forward_d{args.head_dim}_{info['gpu'].split()[-1].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in [CASES[i] for i in args.cases] if args.cases else CASES:
        rows.append(bench_case(*case, head_dim=args.head_dim, tiles=tiles, against=against, rounds=args.rounds))
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps(dict(meta=info, rows=rows), indent=1))
        torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
