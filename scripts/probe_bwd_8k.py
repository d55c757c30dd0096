"""Ad-hoc probe (session 8): is the deterministic non-causal backward at 8K bimodal, and which kernel moves?

Times ours, Flex and cuDNN in turn on fresh tensors (as the grid does), with kernel profiles; writes
$OUT/probe_8k.json. Run from the repo root on a GPU: OUT=dir python scripts/probe_bwd_8k.py
"""
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.getcwd())
from scripts.bench_attention import bench_ms, make_call  # noqa: E402

B, N, H, D = 8, 8192, 16, 128
FLOPS = 2.5 * 4.0 * H * D * N * N * B
res = []


def once(provider):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    call = make_call(provider, q, k, v, False, (-1, -1))
    out = call()
    dout = torch.randn_like(out)
    bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
    ms = bench_ms(bwd)
    res.append((provider, round(ms, 2), round(FLOPS / ms * 1e-9)))
    print(provider, round(ms, 2), round(FLOPS / ms * 1e-9), flush=True)
    return bwd


def kernels(bwd, tag):
    for _ in range(3):
        bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            bwd()
        torch.cuda.synchronize()
    rows = [(e.key[:60], round(e.device_time_total / e.count / 1e3, 3), e.count) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1] * r[2])
    print(tag, rows[:6], flush=True)


if __name__ == "__main__":
    for i in range(4):  # ours, Flex, cuDNN in turn
        b = once("ours")
        if i in (0, 3):
            kernels(b, f"ours#{i}")
        once("flex")
        once("sdpa_cudnn")
    for i in range(4):  # then ours alone
        b = once("ours")
    kernels(b, "ours-final")
    json.dump(res, open(os.environ.get("OUT", ".") + "/probe_8k.json", "w"))
