"""Probe: how many mantissa bits does an fp8 tl.dot keep in its fp32 accumulator on this GPU?

One Triton program multiplies a (128 x K) by a (K x 128) tile of e4m3 values and returns the accumulator; the
exact answer is the fp64 product of the same values (every fp8 product is exact in fp64). The error of each entry,
divided by the sum of |products| that entered it, shrinks by 2x per mantissa bit the accumulator keeps. bf16
operands, accumulated in fp32, run as the control. Writes $OUT/probe_fp8_acc.json.

    OUT=dir python tools/probe_fp8_acc.py
"""
import json
import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dot_kernel(A, B, C, K: tl.constexpr):
    offs_m = tl.arange(0, 128)
    offs_k = tl.arange(0, K)
    a = tl.load(A + offs_m[:, None] * K + offs_k[None, :])
    b = tl.load(B + offs_k[:, None] * 128 + offs_m[None, :])
    tl.store(C + offs_m[:, None] * 128 + offs_m[None, :], tl.dot(a, b))


def effective_bits(dtype, k_dim: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = (torch.randn(128, k_dim, device="cuda", generator=g) * 4).to(dtype)
    b = (torch.randn(k_dim, 128, device="cuda", generator=g) * 4).to(dtype)
    c = torch.empty(128, 128, device="cuda", dtype=torch.float32)
    _dot_kernel[(1,)](a, b, c, K=k_dim)
    a64, b64 = a.double(), b.double()
    exact = a64 @ b64
    scale = a64.abs() @ b64.abs()  # the magnitude the accumulator carried
    rel = ((c.double() - exact).abs() / scale).flatten()
    med = rel.median().item()
    return {"dtype": str(dtype).replace("torch.", ""), "K": k_dim, "median_rel": med, "max_rel": rel.max().item(),
            "bits_from_median": round(-math.log2(med), 1) if med > 0 else None}


def main():
    rows = [effective_bits(dt, k) for dt in (torch.float8_e4m3fn, torch.bfloat16) for k in (32, 64, 128, 256)]
    for r in rows:
        print(r, flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "probe_fp8_acc.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
