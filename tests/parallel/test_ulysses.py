"""Ulysses attention against full-sequence attention (reference backend, fp64), W = 2 and 4: out, dq, dk, dv
of the local shards equal the shards of the full results, for both sequence layouts, GQA with Hkv < W,
packed documents and sliding windows."""

import pytest
import torch

from dist_utils import full_attention, random_positions, run_world
from helpers import assert_close
from parallel import UlyssesPlan, shard_for_rank, ulysses_attn_func, ulysses_plan

TOL = 1e-9  # fp64 all the way: the all-to-alls only move data


def _case(layout="zigzag", causal=True, heads=(4, 2), B=2, chunk=3, D=8, packed=False, scale=None, seed=0,
          via_plan=False, window=(-1, -1)):
    """via_plan (packed only): also run with plan=ulysses_plan(...), which must give identical results."""
    return dict(layout=layout, causal=causal, heads=heads, B=B, chunk=chunk, D=D, packed=packed, scale=scale,
                seed=seed, via_plan=via_plan, window=window)


def _cases(world_size):
    heads = [(world_size, world_size), (2 * world_size, 1), (world_size, 2)]  # MHA, MQA, GQA (Hkv < W at W=4)
    cases = [_case(layout, causal, h, seed=i) for i, (layout, causal, h) in enumerate(
        (lay, c, h) for lay in ("zigzag", "contiguous") for c in (True, False) for h in heads)]
    cases += [_case("zigzag", True, (2 * world_size, 2), chunk=5, packed=True, seed=20),
              _case("contiguous", False, (world_size, 1), chunk=5, packed=True, scale=0.2, seed=21, via_plan=True),
              _case("zigzag", True, (world_size, 2), chunk=4, packed=True, seed=22, via_plan=True)]
    # sliding windows, narrower than a shard so they cut across the zigzag chunks
    cases += [_case("zigzag", True, (world_size, world_size), chunk=4, seed=30, window=(2, 0)),
              _case("contiguous", False, (2 * world_size, 2), chunk=4, seed=31, window=(3, 1)),
              _case("zigzag", True, (world_size, 2), chunk=5, packed=True, seed=32, via_plan=True, window=(3, 0))]
    return cases


def _check_case(rank, world_size, c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, (H, hkv), D, N = c["B"], c["heads"], c["D"], 2 * world_size * c["chunk"]
    q, k, v = (torch.randn(B, N, h, D, generator=gen, dtype=torch.float64, requires_grad=True)
               for h in (H, hkv, hkv))
    dout = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64)
    pos = random_positions(B, N, gen, max_doc=9) if c["packed"] else None
    out, _ = full_attention(q, k, v, c["causal"], c["scale"], pos, window_size=c["window"])
    out.backward(dout)

    def shard(t):
        return shard_for_rank(t, 1, rank, world_size, c["layout"])

    def run(**docs):
        local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
        out_l = ulysses_attn_func(*local, causal=c["causal"], softmax_scale=c["scale"], layout=c["layout"],
                                  backend="reference", window_size=c["window"], **docs)
        out_l.backward(shard(dout))
        return out_l, local

    out_l, local = run(position_ids=None if pos is None else shard(pos))
    if c["via_plan"]:
        plan = ulysses_plan(shard(pos), layout=c["layout"])
        out_p, local_p = run(plan=plan)
        for name, got, want in [("out", out_p, out_l)] + [(f"d{n}", a.grad, b.grad)
                                                          for n, a, b in zip("qkv", local_p, local)]:
            assert torch.equal(got, want), f"plan= vs position_ids=: {name} differs"
    assert_close(out_l, shard(out), "out", atol=TOL, rtol=TOL)
    for name, loc, ref in zip(("dq", "dk", "dv"), local, (q, k, v)):
        assert_close(loc.grad, shard(ref.grad), name, atol=TOL, rtol=TOL)


def _ulysses_worker(rank, world_size, cases):
    for c in cases:
        try:
            _check_case(rank, world_size, c)
        except AssertionError as e:
            raise AssertionError(f"rank {rank}/{world_size}, case {c}: {e}") from None
    # Raised on every rank before any communication, so no rank is left waiting.
    q = torch.randn(1, 4, world_size + 1, 8)
    with pytest.raises(ValueError, match=rf"q heads \({world_size + 1}\) must be divisible by the cp world size"):
        ulysses_attn_func(q, q, q)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ulysses_matches_full_attention(world_size, free_port):
    run_world(_ulysses_worker, world_size, free_port, _cases(world_size))


def test_ulysses_single_rank_and_errors():
    _check_case(0, 1, _case("zigzag", True, (4, 2), packed=True, via_plan=True))
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="layout"):
        ulysses_attn_func(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="same local tokens"):
        ulysses_attn_func(q, q[:, :4], q[:, :4])
    with pytest.raises(ValueError, match="position_ids"):
        ulysses_attn_func(q, q, q, position_ids=torch.zeros(2, 6, dtype=torch.long))
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    plan = ulysses_plan(pos)  # documents [0, 3) [3, 5) [5, 6)
    assert isinstance(plan, UlyssesPlan) and plan.cu_seqlens.tolist() == [0, 3, 5, 6] and plan.max_seqlen == 3
    with pytest.raises(ValueError, match="position_ids or plan, not both"):
        ulysses_attn_func(q, q, q, position_ids=pos, plan=plan)
    with pytest.raises(ValueError, match="plan must be a UlyssesPlan"):
        ulysses_attn_func(q, q, q, plan=object())
    with pytest.raises(ValueError, match=r"other shards.*batch 1.*q \(2, 6, 2, 8\)"):
        ulysses_attn_func(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), plan=plan)
    with pytest.raises(ValueError, match="other shards"):
        ulysses_attn_func(q, q, q, layout="contiguous", plan=plan)
    with pytest.raises(ValueError, match="integer tensor"):
        ulysses_plan(pos.double())
