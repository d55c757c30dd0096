"""Ring attention against full-sequence attention: every rank builds the unsharded oracle (reference backend,
fp64), shards it with the same shard_for_rank the trainer uses, and compares out, lse, dq, dk, dv.

One spawned gloo world per world size runs many cases, because starting a world costs seconds. The spawned
workers set TRITON_INTERPRET=1 themselves (dist_utils), so this module leaves the pytest process alone.
"""

import importlib.util

import pytest
import torch
import torch.distributed as dist

import attention.backends
import parallel.ring
from attention import merge_attn_outputs
from attention.reference import visible_mask
from dist_utils import full_attention, random_positions, run_world
from helpers import assert_close
from parallel import (RingComm, RingPlan, hybrid_attn_func, init_mesh, ring_attn_func, ring_plan, shard_for_rank,
                      ulysses_attn_func)
from parallel.ring import merge_into
from parallel.ring_plan import causal_window, ring_steps, window_rect

FP64_TOL = 1e-5  # the merged lse is fp32, so fp64 inputs agree to ~1e-7, not 1e-12
DTYPE_TOL = {torch.float64: FP64_TOL, torch.float32: 2e-4}


def _case(layout="zigzag", causal=True, heads=(4, 2), B=2, chunk=3, D=8, packed=False, lse_loss=False,
          dtype=torch.float64, overlap=True, scale=None, backend="reference", seed=0, via_plan=False, window_size=(-1, -1)):
    """via_plan (packed only): also run with plan=ring_plan(...) and require results identical to position_ids=.
    window_size (left, 0): a causal sliding window, query q sees keys q - left .. q."""
    return dict(layout=layout, causal=causal, heads=heads, B=B, chunk=chunk, D=D, packed=packed, lse_loss=lse_loss,
                dtype=dtype, overlap=overlap, scale=scale, backend=backend, seed=seed, via_plan=via_plan,
                window_size=window_size)


def _cases():
    cases = [_case(layout, causal, heads, seed=i)
             for i, (layout, causal, heads) in enumerate(
                 (lay, c, h) for lay in ("zigzag", "contiguous") for c in (True, False) for h in ((2, 2), (4, 1)))]
    # Packed documents (up to 9 tokens) cross chunk boundaries of size 5.
    cases += [_case(layout, causal, (4, 2), chunk=5, packed=True, seed=10 + i)
              for i, (layout, causal) in enumerate((lay, c) for lay in ("zigzag", "contiguous") for c in (True, False))]
    cases += [
        _case("zigzag", True, lse_loss=True, seed=20),
        _case("contiguous", False, lse_loss=True, packed=True, chunk=4, seed=21),
        _case("zigzag", True, (2, 1), B=1, chunk=7, D=32, dtype=torch.float32, seed=22),
        _case("zigzag", True, overlap=False, packed=True, chunk=4, seed=23),
        _case("contiguous", True, overlap=False, scale=0.3, seed=24),
        _case("zigzag", True, packed=True, chunk=5, lse_loss=True, seed=25, via_plan=True),
        _case("contiguous", False, (4, 1), packed=True, chunk=4, seed=26, via_plan=True),
    ]
    # Sliding windows: inside a chunk, across one or two chunk boundaries, wider than the sequence; packed
    # documents (the off-diagonal blocks then go one batch row at a time), lse gradients, a plan.
    cases += [_case("zigzag", True, (4, 2), chunk=5, window_size=(left, 0), seed=30 + i)
              for i, left in enumerate((0, 2, 6, 11, 98))]
    cases += [
        _case("contiguous", True, (2, 1), chunk=4, window_size=(5, 0), lse_loss=True, seed=40),
        _case("zigzag", True, (4, 2), chunk=5, window_size=(5, 0), packed=True, seed=41),
        _case("contiguous", True, (4, 2), chunk=5, window_size=(3, 0), packed=True, lse_loss=True, seed=42),
        _case("zigzag", True, (4, 1), B=3, chunk=6, window_size=(7, 0), packed=True, seed=43, via_plan=True),
    ]
    return cases


def _full_inputs(c, world_size):
    gen = torch.Generator().manual_seed(c["seed"])
    B, (H, hkv), D, N = c["B"], c["heads"], c["D"], 2 * world_size * c["chunk"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(c["dtype"])

    q, k, v, dout = rand(B, N, H, D), rand(B, N, hkv, D), rand(B, N, hkv, D), rand(B, N, H, D)
    dlse = rand(B, H, N).float() if c["lse_loss"] else None
    pos = random_positions(B, N, gen, max_doc=9) if c["packed"] else None
    return q, k, v, dout, dlse, pos


def _loss(out, lse, dout, dlse):
    loss = (out * dout).sum()
    return loss if dlse is None else loss + (lse * dlse).sum()


def _check_case(rank, world_size, c, group=None):
    q, k, v, dout, dlse, pos = _full_inputs(c, world_size)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = full_attention(*full, c["causal"], c["scale"], pos,  # oracle: reference backend, input dtype
                              window_size=c["window_size"])
    _loss(out, lse, dout, dlse).backward()

    def shard(t, dim=1):
        return shard_for_rank(t, dim, rank, world_size, c["layout"])

    def run(**docs):
        local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
        out_l, lse_l = ring_attn_func(*local, group=group, causal=c["causal"], softmax_scale=c["scale"],
                                      layout=c["layout"], return_lse=True, backend=c["backend"], overlap=c["overlap"],
                                      window_size=c["window_size"], **docs)
        _loss(out_l, lse_l, shard(dout), None if dlse is None else shard(dlse, 2)).backward()
        return out_l, lse_l, local

    out_l, lse_l, local = run(position_ids=None if pos is None else shard(pos))
    if c["via_plan"]:  # the same blocks in the same order: bitwise the same results
        plan = ring_plan(shard(pos), group, c["layout"], c["causal"], window_size=c["window_size"])
        assert plan.batch_size == c["B"] and len(plan.steps) == world_size
        out_p, lse_p, local_p = run(plan=plan)
        for name, got, want in [("out", out_p, out_l), ("lse", lse_p, lse_l)] + [
                (f"d{n}", a.grad, b.grad) for n, a, b in zip("qkv", local_p, local)]:
            assert torch.equal(got, want), f"plan= vs position_ids=: {name} differs"
    tol = DTYPE_TOL[c["dtype"]]
    assert out_l.dtype == q.dtype and lse_l.dtype == torch.float32
    assert_close(out_l, shard(out), "out", atol=tol, rtol=tol)
    assert_close(lse_l, shard(lse, 2), "lse", atol=tol, rtol=tol)
    for name, loc, ref in zip(("dq", "dk", "dv"), local, full):
        assert_close(loc.grad, shard(ref.grad), name, atol=tol, rtol=tol)


def _ring_worker(rank, world_size, cases):
    for c in cases:
        try:
            _check_case(rank, world_size, c)
        except AssertionError as e:
            raise AssertionError(f"rank {rank}/{world_size}, case {c}: {e}") from None
    if world_size == 2:
        _check_comm_misuse()
    if world_size == 4:
        _check_ring_on_cp_subgroups(rank)


def _check_comm_misuse():
    comm = RingComm()
    with pytest.raises(RuntimeError, match="wait called before commit"):
        comm.wait()
    with pytest.raises(RuntimeError, match="nothing queued"):
        comm.commit()
    buf = comm.send_recv(torch.full((3,), float(dist.get_rank())))
    comm.commit()
    with pytest.raises(RuntimeError, match="twice"):
        comm.commit()
    comm.wait()
    assert buf.tolist() == [float(1 - dist.get_rank())] * 3


def _check_ring_on_cp_subgroups(rank):
    """dp=2 x cp=2: each cp group rings over its own (different) sequence; P2P must use global ranks."""
    mesh = init_mesh(cp=2)
    assert (mesh.dp_rank, mesh.cp_rank) == divmod(rank, 2)
    assert dist.get_process_group_ranks(mesh.cp_group) == [2 * mesh.dp_rank, 2 * mesh.dp_rank + 1]
    for layout in ("zigzag", "contiguous"):
        # A different sequence per dp rank; the plan's all-gather must stay inside the cp group.
        c = _case(layout, True, packed=True, chunk=4, seed=100 + mesh.dp_rank, via_plan=layout == "zigzag")
        _check_case(mesh.cp_rank, 2, c, group=mesh.cp_group)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_matches_full_attention(world_size, free_port):
    run_world(_ring_worker, world_size, free_port, _cases())


@pytest.mark.skipif(importlib.util.find_spec("attention.triton.fwd") is None, reason="no triton kernels")
def test_ring_triton_backend(free_port):
    """The real Triton kernels (interpreter) as the local block: lengths not multiples of the 16-wide tiles."""
    cases = [_case("zigzag", True, (2, 1), B=1, chunk=11, D=32, dtype=torch.float32, backend="triton", seed=30),
             _case("zigzag", True, (2, 2), B=1, chunk=9, D=32, dtype=torch.float32, backend="triton", packed=True,
                   seed=31),
             _case("zigzag", True, (2, 1), B=2, chunk=9, D=32, dtype=torch.float32, backend="triton", packed=True,
                   window_size=(6, 0), seed=32)]
    run_world(_ring_worker, 2, free_port, cases)


# -- single process (no process group: a world of one) ------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
def test_ring_single_rank_is_local_attention(packed):
    c = _case("zigzag", True, chunk=5, packed=packed, lse_loss=True, seed=40, via_plan=packed)
    _check_case(0, 1, c)


def _spans(plan):
    return [[(b.q_rows.start, b.q_rows.stop, b.k_rows.start, b.k_rows.stop, b.causal) for b in step] for step in plan]


def test_plan_computes_only_visible_chunks():
    # zigzag, W=4, rank 1 holds chunks (1, 6); 2 tokens per chunk. Step s holds rank (1 - s) % 4's K/V.
    assert _spans(ring_steps(1, 4, 4, "zigzag", causal=True)) == [
        [(0, 4, 0, 4, True)],   # own chunks, ascending: one causal call is exact
        [(0, 4, 0, 2, False)],  # rank 0 = chunks (0, 7): both query chunks see chunk 0, nobody sees chunk 7
        [(2, 4, 0, 4, False)],  # rank 3 = chunks (3, 4): only query chunk 6 sees them
        [(2, 4, 0, 4, False)],  # rank 2 = chunks (2, 5): likewise
    ]
    # contiguous: later ranks' keys are fully masked and skipped; non-causal computes everything.
    assert _spans(ring_steps(0, 3, 4, "contiguous", causal=True)) == [[(0, 4, 0, 4, True)], [], []]
    assert _spans(ring_steps(2, 3, 4, "contiguous", causal=False)) == [[(0, 4, 0, 4, False)]] * 3


def test_window_rect_covers_exactly_the_visible_pairs():
    checked = 0
    for w_left in (0, 1, 2, 4, 7, 39):
        for q0 in range(0, 16, 3):
            for k0 in range(0, 16, 2):
                for nq, nk in ((4, 4), (5, 3), (2, 7), (1, 1)):
                    qpos, kpos = torch.arange(q0, q0 + nq)[:, None], torch.arange(k0, k0 + nk)[None, :]
                    want = (kpos <= qpos) & (kpos >= qpos - w_left)
                    got = torch.zeros(nq, nk, dtype=torch.bool)
                    rect = window_rect(q0, nq, k0, nk, (w_left, 0))
                    if rect is not None:
                        i0, i1, j0, j1, (left, right) = rect
                        assert left >= -1 and right >= -1  # the kernels' convention: no other negatives
                        nq2, nk2 = i1 - i0, j1 - j0  # the mask flash_attn_func's window selects there
                        got[i0:i1, j0:j1] = visible_mask(torch.arange(nq2), torch.arange(nk2), nq2, nk2, left, right)
                        assert got[i0:i1].any(1).all() and got[:, j0:j1].any(0).all()  # trimmed tight
                    assert torch.equal(got, want), (w_left, q0, nq, k0, nk, rect)
                    checked += 1
    assert checked > 1000


def test_window_plan_keeps_only_pairs_the_window_reaches():
    # W=4 zigzag, 8 tokens per chunk, window_size (3, 0); rank 1 holds chunks (1, 6). Only each chunk's own diagonal and
    # the last 3 keys of the chunk before it are visible; pairs further apart are skipped.
    steps = ring_steps(1, 4, 16, "zigzag", causal=True, window_size=(3, 0))
    got = [[(*_spans([[b]])[0][0][:4], b.window_size) for b in st] for st in steps]
    assert got == [
        [(0, 8, 0, 8, (3, 0)), (8, 16, 8, 16, (3, 0))],  # own chunks; chunk 6 vs chunk 1 is out of reach
        [(0, 3, 5, 8, (0, -1))],  # rank 0 = chunks (0, 7): queries 8-10 of chunk 1 see keys 5-7 of chunk 0
        [],                       # rank 3 = chunks (3, 4): out of reach of chunk 6, after chunk 1
        [(8, 11, 13, 16, (0, -1))],  # rank 2 = chunks (2, 5): chunk 6's first queries see chunk 5's tail
    ]


def test_plan_skips_blocks_without_shared_documents():
    # W=2 zigzag, 8 tokens, documents exactly the chunks [0,1] [2,3] [4,5] [6,7]: only the diagonal remains.
    doc_ids = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    plan = ring_steps(0, 2, 4, "zigzag", causal=True, doc_ids=doc_ids)
    assert _spans(plan) == [[(0, 4, 0, 4, True)], []]
    cu_q, cu_k, max_q, max_k = plan[0][0].varlen
    assert cu_q.tolist() == cu_k.tolist() == [0, 2, 4] and (max_q, max_k) == (2, 2)


@pytest.mark.parametrize("block_dtype", [torch.float32, torch.bfloat16])
def test_in_place_merge_equals_merge_attn_outputs(block_dtype):
    B, n, H, D = 2, 7, 3, 4
    out, block_out = torch.randn(B, n, H, D), torch.randn(B, n, H, D).to(block_dtype)
    lse, block_lse = torch.randn(B, H, n) * 3, torch.randn(B, H, n) * 3
    inf = float("-inf")
    lse[0, 0, :3] = inf  # row 0: only the block sees keys; row 1: only the running part; row 2: neither
    block_lse[0, 0, 1:3] = inf
    out[0, :3, 0] = 0
    block_out[0, 1:3, 0] = 0
    want_out, want_lse = merge_attn_outputs([(out, lse), (block_out.float(), block_lse)])
    merge_into(out, lse, block_out, block_lse)
    assert_close(out, want_out, "out", atol=1e-6, rtol=1e-6)
    assert_close(lse, want_lse, "lse", atol=1e-6, rtol=1e-6)
    assert lse[0, 0, 2] == inf and not out.isnan().any() and (out[0, 2, 0] == 0).all()


def test_ring_input_errors():
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="layout"):
        ring_attn_func(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="N_local 5 must be even"):
        ring_attn_func(q[:, :5], q[:, :5], q[:, :5])
    with pytest.raises(ValueError, match="same local tokens"):
        ring_attn_func(q, q[:, :4], q[:, :4])
    with pytest.raises(ValueError, match="position_ids"):
        ring_attn_func(q, q, q, position_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        ring_attn_func(torch.randn(1, 6, 3, 8), q, q)
    with pytest.raises(ValueError, match=r"causal sliding window .* got \(3, 2\)"):
        ring_attn_func(q, q, q, window_size=(3, 2))
    with pytest.raises(ValueError, match=r"another layout or mask.*window_size \(-1, -1\).*window_size \(3, 0\)"):
        ring_attn_func(q, q, q, plan=ring_plan(torch.arange(6)), window_size=(3, 0))  # a plan without the window


def test_ring_plan_input_errors():
    q = torch.randn(2, 6, 2, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    plan = ring_plan(pos)
    assert isinstance(plan, RingPlan) and (plan.batch_size, plan.n_local, plan.causal) == (2, 6, True)
    with pytest.raises(ValueError, match="position_ids or plan, not both"):
        ring_attn_func(q, q, q, position_ids=pos, plan=plan)
    with pytest.raises(ValueError, match="plan must be a RingPlan"):
        ring_attn_func(q, q, q, plan=[[]])
    with pytest.raises(ValueError, match=r"other shards.*batch 2.*q \(1, 6, 2, 8\)"):
        ring_attn_func(q[:1], q[:1], q[:1], plan=plan)
    with pytest.raises(ValueError, match="other shards"):
        ring_attn_func(q[:, :4], q[:, :4], q[:, :4], plan=plan)
    with pytest.raises(ValueError, match="another layout or mask"):
        ring_attn_func(q, q, q, causal=False, plan=plan)
    with pytest.raises(ValueError, match="another layout or mask"):
        ring_attn_func(q, q, q, layout="contiguous", plan=plan)
    with pytest.raises(ValueError, match=r"integer tensor.*got \(1, 2, 6\)"):
        ring_plan(pos[None])
    with pytest.raises(ValueError, match="integer tensor"):
        ring_plan(pos.float())
    with pytest.raises(ValueError, match="layout"):
        ring_plan(pos, layout="striped")


def test_causal_window_normalises_the_ring_windows():
    assert causal_window(True, (-1, -1)) == causal_window(True, (-1, 0)) == causal_window(False, (-1, -1)) == (-1, -1)
    assert causal_window(True, (5, -1)) == causal_window(False, (5, 0)) == (5, 0)
    for causal, window_size in ((True, (3, 2)), (False, (5, -1)), (False, (-1, 0)), (True, (-1, 4))):
        with pytest.raises(ValueError, match="causal sliding window"):
            causal_window(causal, window_size)
    # the plan stores the normalised window, so a call with the same window in another spelling fits it
    plan = ring_plan(torch.arange(6), window_size=(2, -1))
    assert plan.window_size == (2, 0) and plan.causal
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64)
    want = full_attention(q, q, q, True, window_size=(2, 0))[0]
    assert_close(ring_attn_func(q, q, q, plan=plan, window_size=(2, 0), backend="reference"), want, "out",
                 atol=FP64_TOL, rtol=FP64_TOL)


@pytest.mark.parametrize("entry", ["ring", "ulysses", "hybrid"])
def test_cp_entry_points_check_inputs_once(entry, monkeypatch):
    """One check per call, however many blocks the ring launches (forward and backward): a window and packed
    documents split this single-rank call into several blocks."""
    checks, launches = [], []

    def counting(calls, fn):
        return lambda *a, **kw: calls.append(1) or fn(*a, **kw)

    monkeypatch.setattr(attention.backends, "check_qkv", counting(checks, attention.backends.check_qkv))
    for name in ("launch_forward", "launch_varlen_forward"):
        monkeypatch.setattr(parallel.ring, name, counting(launches, getattr(parallel.ring, name)))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 12, h, 8, generator=gen, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    pos = random_positions(2, 12, gen, max_doc=7)
    fn = {"ring": ring_attn_func, "ulysses": ulysses_attn_func, "hybrid": hybrid_attn_func}[entry]
    out = fn(q, k, v, causal=True, position_ids=pos, window_size=(3, 0), backend="reference")
    out.sum().backward()
    assert len(checks) == 1, f"{entry}: q/k/v checked {len(checks)} times in one call"
    if entry != "ulysses":  # Ulysses is one local call; the ring splits the window into blocks
        assert len(launches) > 1
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = full_attention(*ref, True, position_ids=pos, window_size=(3, 0))[0]
    want.sum().backward()
    assert_close(out, want, "out", atol=FP64_TOL, rtol=FP64_TOL)
    assert_close(q.grad, ref[0].grad, "dq", atol=FP64_TOL, rtol=FP64_TOL)
