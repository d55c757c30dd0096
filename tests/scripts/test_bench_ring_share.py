"""scripts/bench_ring_share.py on the CPU: one rank's ring steps, fed the other ranks' shards from memory, give
that rank's rows of full-sequence causal attention (out, lse, dq; within the fp32 LSE merge's rounding), and the
script writes its rows."""

import json

import pytest
import torch

from attention import flash_attn_func
from parallel.sharding import shard_for_rank, unshard_from_shards
from scripts import bench_ring_share


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_share_is_full_attention(world_size):
    n_local = 48
    shards = bench_ring_share.rank_inputs(n_local, world_size, 4, 2, 16, torch.float64, torch.device("cpu"))
    q, k, v, dout = (unshard_from_shards([s[i] for s in shards], 1).requires_grad_(i < 3) for i in range(4))
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="reference")
    dq, = torch.autograd.grad(out, q, dout)
    for rank in range(world_size):
        fwd, bwd = bench_ring_share.ring_share(shards, rank, world_size, backend="reference")
        r_out, r_lse = fwd()
        r_dq, r_dk, r_dv = bwd(r_out, r_lse)
        assert torch.allclose(r_out, shard_for_rank(out, 1, rank, world_size), atol=2e-6)
        assert torch.allclose(r_lse, shard_for_rank(lse, 2, rank, world_size), atol=2e-6)
        assert torch.allclose(r_dq, shard_for_rank(dq, 1, rank, world_size), atol=2e-6)
        assert r_dk.shape == shards[rank][1].shape and r_dv.shape == shards[rank][2].shape


def test_rows(tmp_path):
    path = tmp_path / "share.json"
    bench_ring_share.main(["--world-sizes", "1", "2", "--n-local", "32", "--heads", "2", "--kv-heads", "1",
                           "--head-dim", "16", "--dtype", "fp32", "--backend", "reference", "--warmup", "0",
                           "--iters", "1", "--json", str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert [(r["world_size"], r["row"]) for r in rows] == [(1, "local"), (1, "ring rank 0"), (2, "local"),
                                                           (2, "ring rank 0"), (2, "ring rank 1")]
    # FLOPs per rank: the whole causal sequence over W, so W=1's ring rank counts what local counts
    flops = [r["fwd_tflops"] * r["fwd_ms"] for r in rows[:2]]
    assert flops[1] == pytest.approx(flops[0], rel=1e-2)
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and "ring_over_local" in r for r in rows if r["row"] != "local")


def test_odd_length_is_refused():
    with pytest.raises(SystemExit):
        bench_ring_share.parse_args(["--n-local", "33"])
