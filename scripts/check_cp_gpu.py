"""Multi-GPU correctness of context-parallel attention: ring, Ulysses and (on 4+ ranks) the Ulysses x ring
hybrid (NCCL, Triton, bf16) against single-GPU attention on the full sequence. Every rank builds the same
full inputs, runs full attention on its own GPU (the oracle), shards them as the trainer does, runs the CP
attention, and compares out, dq, dk, dv by relative error ||x - ref|| / ||ref||. Prints a table and JSON.

    torchrun --nproc_per_node=2 scripts/check_cp_gpu.py --seq-lens 16384,65536 --out docs/bench
    torchrun --nproc_per_node=2 scripts/check_cp_gpu.py --cpu --seq-lens 512 --heads 4 --kv-heads 2 --head-dim 32
(--cpu: gloo + the reference backend in fp32, a smoke run of the same script without GPUs; --impls hybrid: that
implementation only.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import flash_attn_func  # noqa: E402
from parallel import (hybrid_attn_func, hybrid_shard_for_rank, init_distributed, init_mesh,  # noqa: E402
                      ring_attn_func, shard_for_rank, ulysses_attn_func)
from trainer.model import sliding_window_size  # noqa: E402

REL_TOL = 2e-2  # bf16 inputs, fp32 accumulation: relative Frobenius error well under 1e-2 when correct


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def packed_positions(n: int, gen: torch.Generator, device) -> torch.Tensor:
    """Documents of random length (some crossing shard boundaries); position restarts at each document."""
    pos, start = torch.empty(n, dtype=torch.long), 0
    while start < n:
        length = int(torch.randint(n // 16, n // 3 + 2, (1,), generator=gen))
        pos[start:start + length] = torch.arange(min(length, n - start))
        start += length
    return pos[None].to(device)


def run_case(impl, n, heads, kv_heads, d, causal, packed, rank, world, device, dtype, layout="zigzag", mesh=None,
             window=0):
    """window > 0: causal sliding window, each query sees itself and the window - 1 keys before it."""
    gen = torch.Generator().manual_seed(1234 + n)
    shape_q, shape_kv = (1, n, heads, d), (1, n, kv_heads, d)
    q, k, v, dout = (torch.randn(s, generator=gen).to(device, dtype)
                     for s in (shape_q, shape_kv, shape_kv, shape_q))
    pos = packed_positions(n, gen, device) if packed else None
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ws = sliding_window_size(window)
    if packed:  # oracle: varlen over the documents of the full sequence
        from attention import flash_attn_varlen_func
        starts = torch.nonzero(pos[0] == 0).flatten().tolist() + [n]
        cu = torch.tensor(starts, dtype=torch.int32, device=device)
        mx = max(b - a for a, b in zip(starts, starts[1:]))
        out = flash_attn_varlen_func(full[0][0], full[1][0], full[2][0], cu, cu, mx, mx, causal=causal,
                                     window_size=ws)[None]
    else:
        out = flash_attn_func(*full, causal=causal, window_size=ws)
    out.backward(dout)

    def shard(t):
        if impl == "hybrid":
            return hybrid_shard_for_rank(t, 1, rank, mesh.ulysses_degree, world)
        return shard_for_rank(t, 1, rank, world, layout)

    local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
    pos_l = None if pos is None else shard(pos)
    if impl == "hybrid":
        out_l = hybrid_attn_func(*local, mesh.cp_ulysses_group, mesh.cp_ring_group, causal=causal, position_ids=pos_l,
                                 window_size=ws)
    else:
        fn = ring_attn_func if impl == "ring" else ulysses_attn_func
        out_l = fn(*local, causal=causal, layout=layout, position_ids=pos_l, window_size=ws)
    out_l.backward(shard(dout))
    errs = {"out": rel_err(out_l, shard(out))}
    for name, loc, ref in zip(("dq", "dk", "dv"), local, full):
        errs[name] = rel_err(loc.grad, shard(ref.grad))
    worst = torch.tensor(max(errs.values()), device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return errs, worst.item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-lens", default="16384,65536")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--cpu", action="store_true", help="gloo + reference backend in fp32 (smoke run)")
    p.add_argument("--impls", default="ring,ulysses,hybrid", help="which of ring, ulysses, hybrid to check")
    p.add_argument("--no-window", dest="window_rows", action="store_false",
                   help="skip the sliding-window rows (causal, window of N/5 + 7 tokens, dense and packed)")
    args = p.parse_args()
    if args.cpu:
        os.environ["ATTN_BACKEND"] = "reference"
    rank, world = init_distributed("gloo" if args.cpu else None)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dtype = torch.float32 if args.cpu else torch.bfloat16
    # hybrid: Ulysses over pairs of consecutive ranks x ring over the rest, where the heads allow it
    hybrid = world >= 4 and world % 2 == 0 and args.heads % 2 == 0
    mesh = init_mesh(cp=world, ulysses_degree=2) if hybrid else None
    rows = []
    for n in (int(s) for s in args.seq_lens.split(",")):
        for impl in [i for i in args.impls.split(",") if hybrid or i != "hybrid"]:
            # a window of n/5 + 7 tokens reaches across several chunks of the zigzag layout, never a multiple of them
            win = n // 5 + 7 if args.window_rows else 0
            cases = ((True, False, 0), (False, False, 0), (True, True, 0)) + (((True, False, win), (True, True, win))
                                                                               if win else ())
            for causal, packed, window in cases:
                try:
                    errs, worst = run_case(impl, n, args.heads, args.kv_heads, args.head_dim, causal, packed,
                                           rank, world, device, dtype, mesh=mesh, window=window)
                    row = dict(impl=impl, n=n, causal=causal, packed=packed, window=window, worst_rel_err=worst,
                               ok=worst < REL_TOL, **{f"rank0_{k}": v for k, v in errs.items()})
                except Exception as e:  # one failure must not lose the other rows
                    row = dict(impl=impl, n=n, causal=causal, packed=packed, window=window,
                               error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
    if rank == 0:
        gpu = "cpu" if args.cpu else torch.cuda.get_device_name(0)
        result = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), gpu=gpu, world_size=world,
                      heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=str(dtype),
                      backend=os.environ.get("ATTN_BACKEND", "auto"), rows=rows)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"cp_correctness_{'cpu' if args.cpu else 'gpu'}_w{world}.json").write_text(json.dumps(result, indent=1))
        print("\n| impl | N | causal | packed | window | worst rel err (all ranks; out,dq,dk,dv) | ok |\n"
              "|---|---|---|---|---|---|---|")
        for r in rows:
            err = f"{r['worst_rel_err']:.2e}" if "worst_rel_err" in r else r["error"]
            print(f"| {r['impl']} | {r['n']} | {r['causal']} | {r['packed']} | {r['window'] or '-'} | {err} "
                  f"| {r.get('ok', False)} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
