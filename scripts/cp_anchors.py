"""Anchor for scripts/bench_cp.py: torch's own context parallelism on the same shapes.

    ms = time_torch_cp(n, args, device, time_fn)   # every rank calls it; None + reason when it cannot run

torch.distributed.tensor.experimental.context_parallel shards the (B, H, N, D) buffers in place with its
own causal load balancer and patches F.scaled_dot_product_attention with a ring over the mesh (SDPA's
fused kernels inside: cuDNN / flash / efficient, as torch picks them). K/V heads are repeated to H when
Hkv < H so the anchor does not depend on SDPA's GQA support under CP. CUDA only: torch's CP dispatches the
CUDA SDPA ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def time_torch_cp(n: int, args, device: torch.device, time_fn):
    """Median ms of one fwd+bwd step of torch CP attention on the full length-n sequence, or (None, reason)."""
    if device.type != "cuda":
        return None, "torch context_parallel needs CUDA"
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError as exc:
        return None, f"torch context_parallel unavailable: {exc}"
    world = dist.get_world_size()
    B, H, hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device=device).manual_seed(0)  # every rank draws the same full tensors
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    q, dout = (torch.randn(B, H, n, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, hkv, n, D, device=device, dtype=dtype, generator=gen).repeat_interleave(H // hkv, 1)
            for _ in range(2))
    mesh = init_device_mesh("cuda", (world,))
    bufs = [q, k, v, dout]
    try:
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 4, no_restore_buffers=set(bufs)):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # this rank's shards now

            def step():
                for t in leaves:
                    t.grad = None
                F.scaled_dot_product_attention(*leaves, is_causal=not args.no_causal).backward(dout)

            return time_fn(step), None
    except Exception as exc:  # noqa: BLE001 - an anchor that fails is reported, the benchmark goes on
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
