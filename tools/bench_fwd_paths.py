"""Why does one cell of the comparison grid run slower than the sweep? Time our forward three ways, one process.

    python tools/bench_fwd_paths.py --out /tmp/paths            # D=128, N in {8K, 32K, 128K}, causal and not

The grid (bench_attention.py) times `flash_attn_func` on tensors that require grad; the sweep times
`triton_attn_forward` on plain tensors. On an H100 the D=128 non-causal forward at 32K came out ~10% lower in the
grid (429-453 TFLOPS over three runs) than in the sweep (496) with the same tile. Each row here times, on the same
tensors and in an interleaved order repeated --rounds times:
  kernel    triton_attn_forward(q, k, v)                     (the sweep's path)
  api       flash_attn_func(q, k, v) on requires_grad tensors (the grid's path)
  api+bwd   the grid's path after one forward+backward has run (warm backward kernels, allocator state)
Prints the medians per round and writes <out>/fwd_paths.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from attention import flash_attn_func  # noqa: E402
from attention.triton.fwd import triton_attn_forward  # noqa: E402
from bench_attention import TOKENS, HEADS, bench_ms, meta, visible_pairs  # noqa: E402


def paths(n, d, causal, rounds):
    torch.manual_seed(0)
    b = max(1, TOKENS // n)
    q, k, v = (torch.randn(b, n, HEADS, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    flops = 4.0 * b * HEADS * d * visible_pairs(n, causal, (-1, -1))
    kernel = lambda: triton_attn_forward(q, k, v, causal, d ** -0.5, (-1, -1))  # noqa: E731
    api = lambda: flash_attn_func(qg, kg, vg, causal=causal)  # noqa: E731
    rows = []
    for r in range(rounds):
        if r == rounds - 1:  # the last round after a backward, as in the grid
            out = api()
            out.backward(torch.randn_like(out))
        for name, fn in (("kernel", kernel), ("api" if r < rounds - 1 else "api+bwd", api)):
            ms = bench_ms(fn)
            rows.append(dict(N=n, D=d, causal=causal, B=b, path=name, round=r, ms=ms, tflops=flops / ms * 1e-9))
            print(f"N={n:<7} D={d} causal={int(causal)} round {r} {name:8} {rows[-1]['tflops']:6.1f} TFLOPS",
                  flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--dims", type=int, nargs="*", default=[128])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="docs/bench")
    args = ap.parse_args()
    rows = [r for n in args.ns for d in args.dims for c in (False, True) for r in paths(n, d, c, args.rounds)]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fwd_paths.json"), "w") as f:
        json.dump({**meta(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
