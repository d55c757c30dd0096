"""One rank's share of ring attention on one GPU: the ring's compute without its communication.

    python scripts/bench_ring_share.py --world-sizes 4 8 --n-local 131072 --backend auto
    python scripts/bench_ring_share.py --world-sizes 2 --n-local 512 --heads 4 --kv-heads 2 --head-dim 64  # CPU

A W-rank ring gives each rank N/W tokens and, step by step, the K/V shards of the other ranks. This script runs
rank r's steps (parallel.ring.ring_attn_forward / ring_attn_backward, the same code as the ring) on one device,
handing it the other ranks' shards from memory instead of over the network (HeldShards), and times forward +
backward against the local causal kernel on N/W tokens. The question it answers is how much the ring's block
split costs in compute: zigzag turns all but the diagonal step into rectangular, non-causal half blocks, each
with an LSE merge (forward) and fp32 dK/dV / dQ accumulators (backward).

What it leaves out: the transfers themselves and the SMs NCCL's copy kernels occupy beside attention
(scripts/bench_cp.py measures the whole ring under torchrun on W GPUs). In the backward, the dK/dV accumulators
that would arrive from the previous rank are this rank's own (their values differ, their shapes and cost do
not); the forward, lse and dq are exactly rank r's.

Rows per (W, N/W): local (causal, N/W tokens) and ring rank r, each fwd / bwd ms and TFLOPS, where the ring's
FLOPs are the full sequence's causal attention divided by W (backward = 2.5x forward). `ring / local` is the
ratio of the two TFLOPS: 1.0 means the ring computes its share as fast as one GPU runs its own causal kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attention import flash_attn_func  # noqa: E402
from attention.backends import check_attn_inputs, softmax_scale_of  # noqa: E402
from parallel.ring import ring_attn_backward, ring_attn_forward  # noqa: E402
from parallel.ring_plan import dense_plan  # noqa: E402
from scripts.bench_cp import DTYPES  # noqa: E402


class HeldShards:
    """Stands in for parallel.comm.RingComm on one device: at step s, "receiving" returns what rank r - s - 1
    sends, taken from `by_rank` (per rank, the tensors in the order the ring sends them: k, v). With by_rank None
    it returns what was sent (a loopback, for the backward's dK/dV accumulators)."""

    def __init__(self, rank: int, world_size: int, by_rank=None):
        self.rank, self.world_size, self.by_rank = rank, world_size, by_rank
        self.step = 0
        self.sent = 0

    def send_recv(self, to_send: torch.Tensor, recv_tensor=None) -> torch.Tensor:
        if self.by_rank is None:
            return to_send
        src = (self.rank - self.step - 1) % self.world_size
        got = self.by_rank[src][self.sent]
        self.sent += 1
        return got

    def commit(self) -> None:
        pass

    def wait(self) -> None:
        self.step += 1
        self.sent = 0


def rank_inputs(n_local, world_size, heads, kv_heads, head_dim, dtype, device, seed=0):
    """Every rank's (q, k, v, dout) shards, (1, n_local, h, D), drawn independently per rank."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def draw(h):
        return torch.randn(1, n_local, h, head_dim, generator=g).to(device=device, dtype=dtype)
    return [tuple(draw(h) for h in (heads, kv_heads, kv_heads, heads)) for _ in range(world_size)]


def ring_share(shards, rank, world_size, backend="auto", layout="zigzag"):
    """Rank `rank`'s ring forward and backward on one device: (fwd(), bwd(out, lse)) closures.

    fwd() -> (out, lse) equals flash_attn_func on the whole (causal) sequence, restricted to this rank's rows;
    bwd(out, lse) -> (dq, dk, dv), where dq is this rank's and dk/dv are only this rank's contribution."""
    q, k, v, dout = shards[rank]
    impl = check_attn_inputs("bench_ring_share", q, k, v, None, (-1, -1), backend)
    scale = softmax_scale_of(q, None)
    steps = dense_plan(rank, world_size, q.shape[1], layout, True).steps
    kv = [(s[1], s[2]) for s in shards]

    def fwd():
        comm = HeldShards(rank, world_size, kv) if world_size > 1 else None
        return ring_attn_forward(comm, q, k, v, steps, scale, impl)

    def bwd(out, lse):
        many = world_size > 1
        kv_comm = HeldShards(rank, world_size, kv) if many else None
        d_kv_comm = HeldShards(rank, world_size) if many else None
        return ring_attn_backward(kv_comm, d_kv_comm, dout, None, q, k, v, out, lse, steps, scale, impl)
    return fwd, bwd


def _time_ms(fn, device, warmup, iters):
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _fwd_tflop(n, heads, head_dim):
    return 4 * n * n * heads * head_dim * 0.5 / 1e12  # causal


def bench(world_size, n_local, args, device):
    dtype = DTYPES[args.dtype]
    shards = rank_inputs(n_local, world_size, args.heads, args.kv_heads, args.head_dim, dtype, device)
    rows = []
    q, k, v, dout = (t.clone() for t in shards[0])
    for t in (q, k, v):
        t.requires_grad_(True)

    def local_fwd():
        return flash_attn_func(q, k, v, causal=True, backend=args.backend)
    out = local_fwd()
    fwd_ms = _time_ms(local_fwd, device, args.warmup, args.iters)
    bwd_ms = _time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), device, args.warmup,
                      args.iters)
    rows.append(_row("local", world_size, n_local, fwd_ms, bwd_ms, _fwd_tflop(n_local, args.heads, args.head_dim)))
    for rank in sorted({0, world_size - 1}):
        fwd, bwd = ring_share(shards, rank, world_size, args.backend)
        r_out, r_lse = fwd()
        fwd_ms = _time_ms(fwd, device, args.warmup, args.iters)
        bwd_ms = _time_ms(lambda: bwd(r_out, r_lse), device, args.warmup, args.iters)
        flop = _fwd_tflop(n_local * world_size, args.heads, args.head_dim) / world_size
        rows.append(_row(f"ring rank {rank}", world_size, n_local, fwd_ms, bwd_ms, flop))
    for row in rows[1:]:
        row["ring_over_local"] = row["tflops"] / rows[0]["tflops"]
    return rows


def _row(name, world_size, n_local, fwd_ms, bwd_ms, fwd_tflop):
    total = fwd_tflop * 3.5
    return {"row": name, "world_size": world_size, "n_local": n_local, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
            "fwd_tflops": fwd_tflop / fwd_ms * 1e3, "bwd_tflops": 2.5 * fwd_tflop / bwd_ms * 1e3,
            "tflops": total / (fwd_ms + bwd_ms) * 1e3}


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[4, 8])
    p.add_argument("--n-local", type=int, nargs="+", default=[131072] if gpu else [512],
                   help="tokens per rank (even: zigzag gives each rank two chunks)")
    p.add_argument("--heads", type=int, default=32 if gpu else 4)
    p.add_argument("--kv-heads", type=int, default=8 if gpu else 2)
    p.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if gpu else "fp32")
    p.add_argument("--backend", default="auto", help="auto|triton|gluon|sdpa|reference")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", default=None, help="output path (default outputs/bench_ring_share_<device>.json)")
    args = p.parse_args(argv)
    for n in args.n_local:
        if n <= 0 or n % 2:
            p.error(f"--n-local must be positive and even (zigzag gives each rank two chunks); got {n}")
    for w in args.world_sizes:
        if w < 1:
            p.error(f"--world-sizes must be >= 1; got {w}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for n_local in args.n_local:
        for w in args.world_sizes:
            for row in bench(w, n_local, args, device):
                rows.append(row)
                ratio = f"{row['ring_over_local']:.3f}" if "ring_over_local" in row else ""
                print(f"W={w} N/W={n_local} {row['row']:<12} fwd {row['fwd_ms']:9.2f} ms {row['fwd_tflops']:6.1f} TF"
                      f"  bwd {row['bwd_ms']:9.2f} ms {row['bwd_tflops']:6.1f} TF  total {row['tflops']:6.1f} TF"
                      f"  {ratio}", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": name,
            "torch": torch.__version__, "args": vars(args)}
    path = Path(args.json or f"outputs/bench_ring_share_{name.replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
