"""Hybrid (Ulysses inside, ring outside) attention against full-sequence attention, u=2 x r=2 on 4 gloo ranks:
out, lse, dq, dk, dv of the local shards equal the hybrid shards of the full results (reference backend,
fp64 and fp32), causal and not, GQA with Hkv % u == 0 and Hkv < u (replicated), packed documents crossing
shard boundaries via position_ids and via plan=hybrid_plan(...), sliding windows. Also the groups init_mesh builds, the
sharding round trip and the input checks.

One spawned world runs every case (starting 4 gloo ranks costs seconds on 2 cores).
"""

import pytest
import torch
import torch.distributed as dist

from dist_utils import full_attention, random_positions, run_world
from helpers import assert_close
from parallel import (HybridPlan, ParallelDims, hybrid_attn_func, hybrid_plan, hybrid_shard_for_rank,
                      hybrid_unshard_from_shards, init_mesh, shard_for_rank)

TOL = {torch.float64: 1e-5, torch.float32: 2e-4}  # the ring merges lse in fp32
U, CP = 2, 4


def _case(causal=True, heads=(4, 2), B=2, chunk=3, D=8, packed=False, dtype=torch.float64, scale=None, seed=0,
          via_plan=False, lse_loss=False, window_size=(-1, -1)):
    return dict(causal=causal, heads=heads, B=B, chunk=chunk, D=D, packed=packed, dtype=dtype, scale=scale,
                seed=seed, via_plan=via_plan, lse_loss=lse_loss, window_size=window_size)


CASES = [
    _case(True, (4, 2), seed=0),
    _case(False, (4, 2), seed=1),
    _case(True, (4, 1), seed=2, lse_loss=True),  # MQA: Hkv < u, kv heads replicated
    _case(False, (2, 2), B=1, seed=3, dtype=torch.float32, D=16),
    _case(True, (4, 2), chunk=5, packed=True, seed=4, via_plan=True, lse_loss=True),  # docs cross shards
    _case(False, (4, 1), chunk=4, packed=True, seed=5, scale=0.3),
    _case(True, (4, 2), chunk=3, seed=6, window_size=(4, 0)),  # sliding windows: the ring runs them over the whole sequence
    _case(True, (4, 1), chunk=5, packed=True, seed=7, via_plan=True, lse_loss=True, window_size=(6, 0)),
]


def _check_case(rank, c, mesh):
    gen = torch.Generator().manual_seed(c["seed"])
    B, (H, hkv), D, N = c["B"], c["heads"], c["D"], 2 * CP * c["chunk"]  # ring shards of 4*chunk tokens

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(c["dtype"])

    q, k, v, dout = rand(B, N, H, D), rand(B, N, hkv, D), rand(B, N, hkv, D), rand(B, N, H, D)
    dlse = rand(B, H, N).float() if c["lse_loss"] else None
    pos = random_positions(B, N, gen, max_doc=9) if c["packed"] else None
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    window_size = c["window_size"]
    out, lse = full_attention(*full, c["causal"], c["scale"], pos, window_size=window_size)
    ((out * dout).sum() + (0 if dlse is None else (lse * dlse).sum())).backward()

    def shard(t, dim=1):
        return hybrid_shard_for_rank(t, dim, rank, U, CP)

    def run(**docs):
        local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
        out_l, lse_l = hybrid_attn_func(*local, mesh.cp_ulysses_group, mesh.cp_ring_group, causal=c["causal"],
                                        softmax_scale=c["scale"], return_lse=True, backend="reference",
                                        window_size=window_size, **docs)
        loss = (out_l * shard(dout)).sum()
        (loss if dlse is None else loss + (lse_l * shard(dlse, 2)).sum()).backward()
        return out_l, lse_l, local

    out_l, lse_l, local = run(position_ids=None if pos is None else shard(pos))
    if c["via_plan"]:
        plan = hybrid_plan(shard(pos), mesh.cp_ulysses_group, mesh.cp_ring_group, causal=c["causal"],
                           window_size=window_size)
        out_p, _, local_p = run(plan=plan)
        for name, got, want in [("out", out_p, out_l)] + [(f"d{n}", a.grad, b.grad)
                                                          for n, a, b in zip("qkv", local_p, local)]:
            assert torch.equal(got, want), f"plan= vs position_ids=: {name} differs"
    tol = TOL[c["dtype"]]
    assert_close(out_l, shard(out), "out", atol=tol, rtol=tol)
    assert_close(lse_l, shard(lse, 2), "lse", atol=tol, rtol=tol)
    for name, loc, ref in zip(("dq", "dk", "dv"), local, full):
        assert_close(loc.grad, shard(ref.grad), name, atol=tol, rtol=tol)


def _check_errors(mesh):
    """Raised on every rank before any communication, so no rank is left waiting."""
    inner, outer = mesh.cp_ulysses_group, mesh.cp_ring_group
    q = torch.randn(1, 6, 3, 8)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be divisible by the Ulysses group size \(2\)"):
        hybrid_attn_func(q, q, q, inner, outer)
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="same local tokens"):
        hybrid_attn_func(q, q[:, :4], q[:, :4], inner, outer)
    with pytest.raises(ValueError, match="share exactly this rank"):
        hybrid_attn_func(q, q, q, mesh.cp_group, outer)
    with pytest.raises(ValueError, match="position_ids must be"):
        hybrid_attn_func(q, q, q, inner, outer, position_ids=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="causal sliding window"):
        hybrid_attn_func(q, q, q, inner, outer, window_size=(2, 2))
    with pytest.raises(ValueError, match="plan must be a HybridPlan"):
        hybrid_attn_func(q, q, q, inner, outer, plan=object())


def _hybrid_worker(rank, world_size, cases):
    mesh = init_mesh(cp=CP, ulysses_degree=U)
    assert dist.get_process_group_ranks(mesh.cp_ulysses_group) == [rank - rank % U, rank - rank % U + 1]
    assert dist.get_process_group_ranks(mesh.cp_ring_group) == [rank % U, rank % U + U]
    assert (mesh.ulysses_rank, mesh.ring_rank, mesh.ulysses_degree) == (rank % U, rank // U, U)
    for c in cases:
        try:
            _check_case(rank, c, mesh)
        except AssertionError as e:
            raise AssertionError(f"rank {rank}, case {c}: {e}") from None
    _check_errors(mesh)
    # The plan is tied to its shapes.
    pos = torch.arange(6).expand(2, -1)
    plan = hybrid_plan(pos, mesh.cp_ulysses_group, mesh.cp_ring_group)
    assert isinstance(plan, HybridPlan) and (plan.ulysses_degree, plan.n_local, plan.batch_size) == (U, 6, 2)
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match=r"other shards.*batch 2.*q \(1, 6, 2, 8\)"):
        hybrid_attn_func(q, q, q, mesh.cp_ulysses_group, mesh.cp_ring_group, plan=plan)


def test_hybrid_matches_full_attention(free_port):
    run_world(_hybrid_worker, CP, free_port, CASES)


def test_hybrid_sharding_layout_and_round_trip():
    x = torch.arange(24)
    # r=2 zigzag over 4 chunks of 6: ring 0 = [0..5, 18..23], ring 1 = [6..17]; then contiguous halves.
    shards = [hybrid_shard_for_rank(x, 0, c, 2, 4) for c in range(4)]
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3, 4, 5], [18, 19, 20, 21, 22, 23],
                                            [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]
    assert torch.equal(hybrid_unshard_from_shards(shards, 0, 2), x)
    for c in range(4):  # u=1 is zigzag over cp, u=cp is contiguous (the Ulysses-only split)
        assert torch.equal(hybrid_shard_for_rank(x, 0, c, 1, 4), shard_for_rank(x, 0, c, 4, "zigzag"))
        assert torch.equal(hybrid_shard_for_rank(x, 0, c, 4, 4), shard_for_rank(x, 0, c, 4, "contiguous"))
    y = torch.randn(2, 36, 3)  # ring shards of 12 split into 3 (odd u: pieces straddle the two zigzag chunks)
    parts = [hybrid_shard_for_rank(y, 1, c, 3, 6) for c in range(6)]
    assert torch.equal(hybrid_unshard_from_shards(parts, 1, 3), y)
    with pytest.raises(ValueError, match="must be divisible by 2\\*ring=4"):
        hybrid_shard_for_rank(torch.arange(10), 0, 0, 2, 4)
    with pytest.raises(ValueError, match="ulysses_degree \\(3\\) must be an int >= 1 dividing cp_size \\(4\\)"):
        hybrid_shard_for_rank(x, 0, 0, 3, 4)


def test_hybrid_mesh_layout():
    """dp 2 x cp 4 (u 2 x ring 2): Ulysses groups are consecutive ranks, ring groups stride u, both inside cp."""
    dims = ParallelDims.from_world(8, cp=4, ulysses=2)
    assert [dims.ulysses_group_ranks(r) for r in (0, 3, 5)] == [[0, 1], [2, 3], [4, 5]]
    assert [dims.ring_group_ranks(r) for r in (0, 3, 5, 6)] == [[0, 2], [1, 3], [5, 7], [4, 6]]
    assert dims.ring == 2 and init_mesh(cp=1).ulysses_degree == 1
    with pytest.raises(ValueError, match=r"ulysses_degree\(3\) must divide cp\(4\)"):
        ParallelDims.from_world(8, cp=4, ulysses=3)


def test_hybrid_single_process():
    """No process group: u = r = 1, the hybrid is local attention (with documents)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 12, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    pos = random_positions(2, 12, gen, max_doc=5)
    out = hybrid_attn_func(q, k, v, position_ids=pos, backend="reference")
    assert_close(out, full_attention(q, k, v, True, None, pos)[0], "out", atol=1e-9, rtol=1e-9)
    plan = hybrid_plan(pos)
    assert torch.equal(hybrid_attn_func(q, k, v, plan=plan, backend="reference"), out)
    with pytest.raises(ValueError, match="position_ids or plan, not both"):
        hybrid_attn_func(q, k, v, position_ids=pos, plan=plan)
