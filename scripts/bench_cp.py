"""Context-parallel attention benchmark: ring (with and without comm/compute overlap) and Ulysses vs local
attention, per training step (forward + backward), printed as a table and written as JSON.

    python scripts/bench_cp.py --world-size 2                              # CPU: spawns gloo ranks
    torchrun --nproc_per_node=8 scripts/bench_cp.py --seq-lens 65536,262144 --dtype bf16

Rows per (sequence length, layout):
  local      attention on this rank's N/W tokens only (no communication: the per-rank compute floor)
  full/W     full-sequence attention timed on rank 0 alone, divided by W (perfect scaling)
  ring       ring_attn_func; `vs full/W` is the ring's overhead, `overlap gain` = no-overlap / overlap time
  ring-noovl ring_attn_func(overlap=False): each K/V transfer is waited for before computing
  ulysses    ulysses_attn_func (when heads divide by W)
  hybrid     hybrid_attn_func: Ulysses over u = --ulysses-degree consecutive ranks x ring over W/u (when
             W >= 4, 1 < u < W divides W and heads divide by u); its own layout (zigzag over the ring, then
             contiguous over u), timed in the zigzag pass only
  torch-cp   the anchor, only when asked for in --impls: torch's context_parallel (SDPA ring, its own
             load balancer; CUDA only), timed in the zigzag pass (scripts/cp_anchors.py)
Times are the median over iterations of the slowest rank. TFLOPS/rank counts the full sequence's attention
FLOPs (halved for causal; backward = 2.5x forward) divided by W (for `local`: those of its N/W tokens);
`vs local TFLOPS` = a CP row's TFLOPS/rank over local's, i.e. how close CP gets to one GPU at N/W tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attention import flash_attn_func  # noqa: E402
from parallel import hybrid_attn_func, init_distributed, init_mesh, ring_attn_func, ulysses_attn_func  # noqa: E402
from parallel.sharding import check_shardable  # noqa: E402
from scripts.cp_anchors import time_torch_cp  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="ranks to spawn when not under torchrun")
    p.add_argument("--seq-lens", default="65536,131072" if gpu else "512,1024", help="full sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32 if gpu else 4)
    p.add_argument("--kv-heads", type=int, default=8 if gpu else 2)
    p.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if gpu else "fp32")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--layouts", default="zigzag,contiguous")
    p.add_argument("--impls", default="local,full,ring,ring-noovl,ulysses,hybrid",
                   help="also: torch-cp (torch's context_parallel over SDPA, CUDA only; the anchor)")
    p.add_argument("--ulysses-degree", type=int, default=2, help="hybrid: Ulysses group size u (ring: W/u)")
    p.add_argument("--full-max-len", type=int, default=131072, help="skip the full/W row above this length")
    p.add_argument("--backend", default="auto", help="local attention backend: auto|triton|sdpa|reference")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5 if gpu else 3)
    p.add_argument("--json", default=None, help="output path (default outputs/bench_cp_<device>_w<W>.json)")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(step, device, warmup, iters, only_rank0=False):
    """Median over iterations of the slowest rank's time for one step() (ms); every rank must call this."""
    rank = dist.get_rank()
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        t0 = time.perf_counter()
        if not only_rank0 or rank == 0:
            step()
            _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def _attn_tflop(n, args, world_size):
    fwd = 4 * args.batch * n * n * args.heads * args.head_dim * (0.5 if not args.no_causal else 1.0)
    return 3.5 * fwd / world_size / 1e12  # per rank, forward + backward


def _step(fn, q, k, v, dout):
    """One training step of attention: forward + backward into fresh grads."""
    def run():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(dout)
    return run


def _inputs(n, args, device, full):
    """q, k, v, dout: full-length (rank 0's full/W row) or this rank's N/W tokens, made on the device.

    Values do not matter for timing, so ranks draw their shards independently instead of slicing a full
    sequence: at 1M tokens a full q alone is 8 GB.
    """
    B, H, hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    m = n if full else n // dist.get_world_size()
    return [torch.randn(B, m, h, D, device=device, dtype=DTYPES[args.dtype]) for h in (H, hkv, hkv, H)]


def _hybrid_ok(args, world_size):
    u = args.ulysses_degree
    return world_size >= 4 and 1 < u < world_size and world_size % u == 0 and args.heads % u == 0


def _bench_length(n, layout, args, device, world_size, mesh):
    causal, backend = not args.no_causal, args.backend
    ring = dict(causal=causal, layout=layout, backend=backend)
    fns = {
        "local": lambda q, k, v: flash_attn_func(q, k, v, causal=causal, backend=backend),
        "full": lambda q, k, v: flash_attn_func(q, k, v, causal=causal, backend=backend),
        "ring": lambda q, k, v: ring_attn_func(q, k, v, **ring),
        "ring-noovl": lambda q, k, v: ring_attn_func(q, k, v, overlap=False, **ring),
        "ulysses": lambda q, k, v: ulysses_attn_func(q, k, v, causal=causal, layout=layout, backend=backend),
        "hybrid": lambda q, k, v: hybrid_attn_func(q, k, v, mesh.cp_ulysses_group, mesh.cp_ring_group,
                                                   causal=causal, backend=backend),
    }
    impls = [i for i in args.impls.split(",") if i in fns]
    if args.heads % world_size != 0:
        impls = [i for i in impls if i != "ulysses"]
    if mesh is None or layout != "zigzag":  # the hybrid has one layout (zigzag over its ring): time it once
        impls = [i for i in impls if i != "hybrid"]
    if n > args.full_max_len:
        impls = [i for i in impls if i != "full"]
    rows = {}
    if "torch-cp" in args.impls.split(",") and layout == "zigzag":  # the anchor shards with its own balancer
        ms, why = time_torch_cp(n, args, device, lambda step: _time_ms(step, device, args.warmup, args.iters))
        if ms is not None:
            rows["torch-cp"] = ms
        elif dist.get_rank() == 0:
            print(f"torch-cp skipped at {n}: {why}", flush=True)
    for name in impls:
        full = name == "full"
        q, k, v, dout = _inputs(n, args, device, full) if not full or dist.get_rank() == 0 else [None] * 4
        leaves = [t.requires_grad_() if t is not None else None for t in (q, k, v)]
        ms = _time_ms(_step(fns[name], *leaves, dout), device, args.warmup, args.iters, only_rank0=full)
        rows["full/W" if full else name] = ms / world_size if full else ms
        del q, k, v, dout, leaves
    return [_row(name, ms, rows, n, layout, args, world_size) for name, ms in rows.items()]


def _row(name, ms, rows, n, layout, args, world_size):
    # local attends within its own N/W tokens: the FLOPs of a length-N/W sequence on one GPU
    local_tflop = _attn_tflop(n // world_size, args, 1)
    flop = local_tflop if name == "local" else _attn_tflop(n, args, world_size)
    row = dict(impl=name, layout=layout, seq_len=n, n_local=n // world_size, world_size=world_size, ms=ms,
               tflops_per_rank=flop / (ms / 1e3))
    if "local" in rows:
        row["vs_local"] = ms / rows["local"]
        # CP attention TFLOPS per GPU over one GPU's attention TFLOPS at the same per-GPU length
        row["tflops_vs_local"] = row["tflops_per_rank"] / (local_tflop / (rows["local"] / 1e3))
    if "full/W" in rows:
        row["vs_full_over_w"] = ms / rows["full/W"]
    if name == "ring" and "ring-noovl" in rows:
        row["overlap_gain"] = rows["ring-noovl"] / ms
    return row


def _print_table(rows):
    head = f"{'impl':<11}{'layout':<11}{'seq_len':>9}{'n_local':>9}{'ms':>10}{'vs local':>10}{'vs full/W':>11}" \
           f"{'overlap gain':>14}{'TFLOPS/rank':>13}{'vs local TFLOPS':>17}"
    print(head)
    print("-" * len(head))

    def fmt(x, width, digits=2):
        return f"{x:>{width}.{digits}f}" if x is not None else f"{'-':>{width}}"

    for r in rows:
        print(f"{r['impl']:<11}{r['layout']:<11}{r['seq_len']:>9}{r['n_local']:>9}{r['ms']:>10.2f}"
              f"{fmt(r.get('vs_local'), 10)}{fmt(r.get('vs_full_over_w'), 11)}"
              f"{fmt(r.get('overlap_gain'), 14)}{fmt(r.get('tflops_per_rank'), 13, 3)}"
              f"{fmt(r.get('tflops_vs_local'), 17)}")


def _meta(args, device, world_size):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return dict(device=name, world_size=world_size, dist_backend=dist.get_backend(), dtype=args.dtype,
                ulysses_degree=args.ulysses_degree,
                batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                causal=not args.no_causal, attn_backend=args.backend, torch=torch.__version__,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), iters=args.iters)


def run(args):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the cores
    # The hybrid's groups: every rank builds them (collective), once
    mesh = init_mesh(cp=world_size, ulysses_degree=args.ulysses_degree) if _hybrid_ok(args, world_size) else None
    if mesh is None and "hybrid" in args.impls.split(",") and rank == 0:
        print(f"skipping hybrid: needs world size >= 4 with 1 < --ulysses-degree ({args.ulysses_degree}) < W "
              f"dividing W ({world_size}) and --heads ({args.heads})")
    rows = []
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = Path(args.json or f"outputs/bench_cp_{tag}_w{world_size}.json")
    for n in (int(s) for s in args.seq_lens.split(",")):
        for layout in args.layouts.split(","):
            check_shardable(n, world_size, layout, name="--seq-lens entry")
            rows += _bench_length(n, layout, args, device, world_size, mesh)
            if rank == 0:  # after every length: a run cut short keeps what it measured
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(dict(meta=_meta(args, device, world_size), rows=rows), indent=2))
    if rank == 0:
        _print_table(rows)
        print(f"wrote {path}")


def _spawned(rank, world_size, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    init_distributed("nccl" if use_nccl else "gloo")
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ:  # torchrun
        init_distributed()
        try:
            run(args)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.world_size, port, args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
