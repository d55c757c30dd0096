"""Registers, spills and shared memory of our compiled backward kernels: why a tile runs as fast as it does.

    python tools/kernel_stats.py [--n 16384] [--causal 0] [--out DIR]     # on a GPU; prints and writes JSON

Runs one backward per mode (deterministic, atomic) at B*N = 65536 tokens, 16 heads, D=128, bf16,
then lists every variant Triton compiled for each kernel (the autotuner's candidates) and its pick.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from attention import attn_backward, attn_forward
from attention.triton import bwd as triton_bwd


def compiled_variants(kernel) -> list[dict]:
    rows = []
    for cache in kernel.device_caches.values():
        for compiled in cache[0].values():
            md = compiled.metadata
            row = {"warps": md.num_warps, "stages": md.num_stages, "shared_kib": md.shared / 1024}
            try:
                compiled._init_handles()  # n_regs / n_spills are read when the binary is loaded
                row.update(regs=compiled.n_regs, spills=compiled.n_spills)
            except Exception as e:  # a candidate the autotuner compiled but the GPU cannot hold
                row.update(error=type(e).__name__)
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    B, H, D = 65536 // args.n, 16, 128
    q, k, v = (torch.randn(B, args.n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = attn_forward(q, k, v, bool(args.causal), backend="triton")
    dout = torch.randn_like(out)
    for det in (True, False):
        attn_backward(dout, q, k, v, out, lse, bool(args.causal), backend="triton", deterministic=det)
    torch.cuda.synchronize()
    report = {}
    # the deterministic and the atomic dK/dV tuners share one kernel: its variants are listed once
    for name, tuners in (("_dkdv_kernel", ("dkdv_tuned", "dkdv_atomic_tuned")), ("_dq_kernel", ("dq_tuned",))):
        picks = {t: str(getattr(getattr(triton_bwd, t), "best_config", None)) for t in tuners}
        report[name] = {"picks": picks, "variants": compiled_variants(getattr(triton_bwd, tuners[0]).fn)}
        print(name, "picks:", picks)
        for row in report[name]["variants"]:
            print("   ", row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"kernel_stats_{args.n}_{'causal' if args.causal else 'full'}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
