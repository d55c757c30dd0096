"""The Gluon backward's dK/dV planning on the CPU: the query rows of each key block against a brute-force mask,
the unmasked segment, and the visiting order. The kernels themselves run in test_gluon_bwd_gpu.py."""

import pytest
import torch

from attention.gluon.plan import window_sides
from attention.gluon.plan_bwd import backward_plan, dq_rank, ordered_backward_plan, query_range
from helpers import visible_mask


SHAPES = [(256, 256), (300, 700), (700, 300), (1, 1), (129, 64), (64, 129), (1000, 1000), (200, 333), (333, 200)]
WINDOWS = [(True, (-1, -1)), (False, (-1, -1)), (True, (64, 0)), (False, (100, 50)), (False, (-1, 0)),
           (True, (0, 0)), (False, (5, -1)), (False, (0, 300)), (True, (100, -1))]


@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("causal,window", WINDOWS)
@pytest.mark.parametrize("bm,bn", [(64, 128), (128, 128), (32, 64)])
def test_backward_plan_visits_every_visible_query_and_masks_only_edge_blocks(nq, nk, causal, window, bm, bn):
    keep = visible_mask(nq, nk, causal, window)
    plan = backward_plan(nq, nk, causal, window, bm, bn)
    n_tiles = -(-nk // bn)
    assert len(plan.bounds) == n_tiles and sorted(plan.order) == list(range(n_tiles))
    for t, (lo, a, b, hi) in enumerate(plan.bounds):
        n0 = t * bn
        cols = keep[:, n0:min(n0 + bn, nk)]
        seen = cols.any(1).nonzero().flatten()
        assert 0 <= lo <= hi <= max(nq, lo) and lo <= a <= b
        if len(seen):
            assert lo <= seen.min().item() and seen.max().item() < hi, f"key block {t} misses visible rows"
        n_blocks = plan.blocks(t)
        covered = torch.zeros(nq, dtype=torch.bool)
        for blk in range(n_blocks):
            s = lo + blk * bm
            covered[s:min(s + bm, nq)] = True
            if a <= s < b:  # an unmasked block: every row in bounds, every key in bounds, all pairs visible
                assert s + bm <= nq and n0 + bn <= nk and cols[s:s + bm].all(), (t, s)
            else:
                assert s < a or s >= b
        assert covered[seen].all(), f"key block {t} misses visible rows"


@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("causal,window", WINDOWS)
def test_query_range_is_tight_up_to_a_block(nq, nk, causal, window):
    """No query block is visited that sees none of the key block's keys (outside the first and last block)."""
    keep = visible_mask(nq, nk, causal, window)
    left, right = window_sides(causal, window)
    for n0 in range(0, nk, 128):
        lo, _, _, hi = query_range(n0, nq, nk, left, right, 64, 128)
        seen = keep[:, n0:min(n0 + 128, nk)].any(1).nonzero().flatten()
        if len(seen) == 0:
            assert hi == lo or not keep[lo:hi, n0:n0 + 128].any()
        else:
            assert lo == seen.min().item() and hi == seen.max().item() + 1


def test_order_puts_the_busiest_key_blocks_first_and_the_table_matches():
    plan = backward_plan(1024, 1024, True, (-1, -1), 64, 128)
    assert plan.order == tuple(range(8))  # causal: key block 0 is seen by every query
    work = [plan.blocks(t) for t in plan.order]
    assert work == sorted(work, reverse=True)
    table = plan.table("cpu")
    assert table.dtype == torch.int32 and table.shape == (8, 5)
    assert table[0].tolist() == [0, *plan.bounds[0]]


def test_key_blocks_that_no_query_sees_are_empty():
    # Nq < Nk with a left window: keys before off - left are seen by nobody, their dK / dV are zero
    lo, a, b, hi = query_range(0, 100, 1000, 50, 0, 64, 128)
    assert lo == hi == a == b
    plan = backward_plan(100, 1000, True, (50, -1), 64, 128)
    assert plan.blocks(0) == 0 and plan.blocks(7) > 0
    assert plan.order[-1] == 0 or plan.blocks(plan.order[-1]) == 0


@pytest.mark.parametrize("nq,nk", SHAPES + [(4096, 4096), (1000, 3000), (3000, 1000)])
@pytest.mark.parametrize("causal,window", WINDOWS)
def test_ordered_plan_ranks_each_dq_addition_after_the_key_blocks_launched_before_it(nq, nk, causal, window):
    """The deterministic backward: key block t adds into query block m0 // 64 once dq_rank earlier-launched key
    blocks have; the rank must count exactly the key blocks launched before t that visit m0, and every visible
    row must still be visited (against the brute-force mask)."""
    bm, bn = 64, 128
    left, right = window_sides(causal, window)
    keep = visible_mask(nq, nk, causal, window)
    plan = ordered_backward_plan(nq, nk, causal, window, bm, bn)
    assert sorted(plan.order) == list(range(-(-nk // bn)))
    launched: dict[int, int] = {}  # query block start -> key blocks that have visited it
    for t in plan.order:
        lo, a, b, hi = plan.bounds[t]
        assert lo % bm == 0
        starts = [lo + i * bm for i in range(plan.blocks(t))]
        seen = keep[:, t * bn:min(t * bn + bn, nk)].any(1).nonzero().flatten()
        if len(seen):
            assert starts and starts[0] <= seen.min().item() and seen.max().item() < starts[-1] + bm
        for m0 in starts:
            assert dq_rank(t, m0, nq, nk, left, right, bm, bn) == launched.get(m0, 0), (t, m0)
        for m0 in starts:
            launched[m0] = launched.get(m0, 0) + 1
        for s in starts:  # unmasked blocks stay unmasked
            if a <= s < b:
                assert s + bm <= nq and t * bn + bn <= nk and keep[s:s + bm, t * bn:t * bn + bn].all()
