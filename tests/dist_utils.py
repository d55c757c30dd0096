"""Spawn a gloo world from pytest, plus the full-sequence oracles the distributed tests shard.

    run_world(worker, world_size, free_port, extra_arg)     # worker(rank, world_size, extra_arg) at module level

Workers run with one thread each (2 CI cores, up to 4 ranks) and a short gloo timeout so a broken
collective fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attention import flash_attn_func, flash_attn_varlen_func


def _entry(rank, worker, world_size, port, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's teardown. A library thread still joinable at exit (DeepSpeed's
    # shared-memory comm op) has aborted a rank there now and then ("terminate called without an active
    # exception", SIGABRT), failing a run whose checks had all passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(worker, world_size: int, port: int, *args) -> None:
    """Run worker(rank, world_size, *args) in `world_size` spawned processes; re-raises the first failure."""
    mp.spawn(_entry, args=(worker, world_size, port, args), nprocs=world_size, join=True)


def random_positions(batch: int, seq_len: int, gen: torch.Generator, max_doc: int) -> torch.Tensor:
    """(B, N) packed-document position ids: random document lengths in [1, max_doc], restarting at 0."""
    rows = []
    for _ in range(batch):
        pos = []
        while len(pos) < seq_len:
            pos.extend(range(int(torch.randint(1, max_doc + 1, (1,), generator=gen))))
        rows.append(pos[:seq_len])
    return torch.tensor(rows)


def full_attention(q, k, v, causal, softmax_scale=None, position_ids=None, backend="reference",
                   window_size=(-1, -1)):
    """Oracle on the unsharded sequence: (out, lse (B, H, N)). Packed documents via per-row cu_seqlens."""
    if position_ids is None:
        return flash_attn_func(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True,
                               backend=backend, window_size=window_size)
    B, N, H, D = q.shape
    starts = [b * N + i for b in range(B) for i in range(N) if i == 0 or int(position_ids[b, i]) == 0]
    cu = torch.tensor(starts + [B * N], dtype=torch.int32)
    longest = int(cu.diff().max())
    out, lse = flash_attn_varlen_func(q.reshape(B * N, H, D), k.reshape(B * N, -1, D), v.reshape(B * N, -1, D),
                                      cu, cu, longest, longest, causal=causal, softmax_scale=softmax_scale,
                                      window_size=window_size, return_lse=True, backend=backend)
    return out.view(B, N, H, D), lse.view(H, B, N).transpose(0, 1)
