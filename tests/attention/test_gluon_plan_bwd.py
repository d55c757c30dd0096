"""The Gluon backward's dK/dV planning on the CPU: the query rows of each key block against a brute-force mask,
the unmasked segment, and the visiting order. The kernels themselves run in test_gluon_bwd_gpu.py."""

import heapq

import pytest
import torch

from attention.gluon.plan import window_sides
from attention.gluon.plan_bwd import (backward_plan, descending_walk, document_key_order, document_query_block,
                                      document_rows, document_semaphores, dq_from_tiles, dq_rank, dq_tile_bases,
                                      head_interleave, launch_slot, ordered_backward_plan, query_blocks, query_range,
                                      split_group)
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
@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
def test_ordered_plan_ranks_each_dq_addition_after_the_key_blocks_launched_before_it(nq, nk, causal, window,
                                                                                     descending):
    """The deterministic backward: key block t adds into query block m0 // 64 once dq_rank earlier-launched key
    blocks have; the rank must count exactly the key blocks launched before t that visit m0, and every visible
    row must still be visited (against the brute-force mask)."""
    bm, bn = 64, 128
    left, right = window_sides(causal, window)
    keep = visible_mask(nq, nk, causal, window)
    descending = descending and right >= 0  # the kernel walks last to first only with a right side
    plan = ordered_backward_plan(nq, nk, causal, window, bm, bn, descending)
    assert sorted(plan.order) == list(range(-(-nk // bn)))
    launched: dict[int, int] = {}  # query block start -> key blocks that have visited it
    for t in plan.order:
        lo, a, b, hi = plan.bounds[t]
        assert lo % bm == 0
        starts = [lo + i * bm for i in range(plan.blocks(t))]
        seen = keep[:, t * bn:min(t * bn + bn, nk)].any(1).nonzero().flatten()
        if len(seen):
            assert starts and starts[0] <= seen.min().item() and seen.max().item() < starts[-1] + bm
        assert query_blocks(plan, t, descending) == [(0, m0) for m0 in (starts[::-1] if descending else starts)]
        assert sorted(query_blocks(plan, t, descending, 3)) == [(g, m0) for g in range(3) for m0 in starts]
        for m0 in starts:
            assert dq_rank(t, m0, nq, nk, left, right, bm, bn, descending) == launched.get(m0, 0), (t, m0)
        for m0 in starts:
            launched[m0] = launched.get(m0, 0) + 1
        for s in starts:  # unmasked blocks stay unmasked
            if a <= s < b:
                assert s + bm <= nq and t * bn + bn <= nk and keep[s:s + bm, t * bn:t * bn + bn].all()


def _run_ordered(nq, nk, causal, window, slots, descending, group=1, walks=None, window_steps=8):
    """Step-by-step model of the deterministic backward: `slots` resident programs, launched in plan order, each
    adding one query block per step once dq_rank others have added there (visible the step after). walks: per key
    block the (head, query block) order to use instead of query_blocks'. Returns the steps taken, the ideal
    (blocks / slots), the program-steps spent waiting, and the most distinct query blocks touched in any
    `window_steps` consecutive steps (the rows of Q, dO and dQ that must stay in the L2)."""
    bm, bn = 64, 128
    left, right = window_sides(causal, window)
    plan = ordered_backward_plan(nq, nk, causal, window, bm, bn, descending)
    walks = walks or {t: query_blocks(plan, t, descending, group) for t in plan.order}
    queue = [(t, walks[t]) for t in plan.order]
    work = sum(len(blocks) for _, blocks in queue)
    added: dict[int, int] = {}
    resident, recent, steps, waits, widest = [], [], 0, 0, 0
    while queue or resident:
        while len(resident) < slots and queue:
            resident.append([*queue.pop(0), 0])
        touched = []
        for prog in resident:
            t, blocks, i = prog
            if added.get(blocks[i], 0) == dq_rank(t, blocks[i][1], nq, nk, left, right, bm, bn, descending):
                touched.append(blocks[i])
                prog[2] += 1
            else:
                waits += 1
        for key in touched:
            added[key] = added.get(key, 0) + 1
        resident = [prog for prog in resident if prog[2] < len(prog[1])]
        recent = (recent + [set(touched)])[-window_steps:]
        widest = max(widest, len(set().union(*recent)))
        steps += 1
        assert steps < 4 * work, "the ordered additions deadlock"
    return steps, work / slots, waits, widest


@pytest.mark.parametrize("nq,nk", [(16384, 16384), (8000, 16384)])
def test_ordered_plan_walks_trade_waits_for_locality(nq, nk):
    """Causal. Walking first to last, the lightest key block is launched first and every later one reaches a
    query block two steps after the one before it: nobody waits, but the resident key blocks spread over the
    sequence (and the heaviest run last). Walking last to first they stay on a few dozen nearby query blocks,
    and the ones launched together wait for one another once."""
    slots = 32
    steps, ideal, waits, widest = _run_ordered(nq, nk, True, (-1, -1), slots, descending=False)
    assert waits == 0 and widest > 3 * slots
    steps, ideal, waits, widest = _run_ordered(nq, nk, True, (-1, -1), slots, descending=True)
    assert steps <= 1.1 * ideal and widest <= 2 * slots and 0 < waits <= slots * slots


def test_ordered_plan_keeps_gqa_key_blocks_in_step_across_heads():
    """Walking last to first head by head, each key block would reach the next head's last query block two steps
    per key block ahead of the one it follows and wait there; block by block over the group's heads it does not."""
    steps, ideal, waits, widest = _run_ordered(8192, 8192, True, (-1, -1), 32, True, group=4)
    assert steps <= 1.1 * ideal and waits <= 32 * 32 and widest <= 2 * 32 * 4
    plan = ordered_backward_plan(8192, 8192, True, (-1, -1), 64, 128, True)
    head_by_head = {t: [(g, m0) for g in range(4) for _, m0 in query_blocks(plan, t, True)] for t in plan.order}
    _, _, waits, _ = _run_ordered(8192, 8192, True, (-1, -1), 32, True, walks=head_by_head)
    assert waits > 3 * 32 * 32  # the same walk head by head: the waits grow with every head


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (2048, 0))])
def test_ordered_plan_finishes_close_to_the_ideal(causal, window):
    for descending in (False, True) if causal else (False,):
        steps, ideal, _, _ = _run_ordered(16384, 16384, causal, window, 32, descending)
        assert steps <= 1.1 * ideal + 32


def test_pairs_interleave_only_without_a_mask_in_the_deterministic_mode():
    assert head_interleave(False, (-1, -1), True, 16) == 2
    assert head_interleave(False, (-1, -1), True, 15) == 1  # an odd number of (batch, head) pairs
    assert head_interleave(False, (-1, -1), False, 16) == 1  # nothing waits without determinism
    assert head_interleave(True, (-1, -1), True, 16) == 1
    assert head_interleave(False, (100, 50), True, 16) == 1 and head_interleave(False, (100, -1), True, 16) == 1


@pytest.mark.parametrize("rows,pairs,interleave", [(5, 4, 2), (1, 2, 2), (7, 6, 1), (3, 1, 1), (64, 10, 2)])
def test_launch_slots_take_pairs_interleave_at_a_time_each_in_plan_order(rows, pairs, interleave):
    order = [launch_slot(p0, p1, interleave) for p1 in range(pairs // interleave) for p0 in range(rows * interleave)]
    assert sorted(order) == [(r, p) for r in range(rows) for p in range(pairs)]
    for p in range(pairs):
        assert [r for r, q in order if q == p] == list(range(rows))
    assert [q for _, q in order[:interleave * min(rows, 2)]] == list(range(interleave)) * min(rows, 2)


def _linked_makespan(seqlen, causal, block_m, pairs, interleave, step, poll, write, slots=132, deterministic=True):
    """Time model of the backward on `slots` SMs, programs launched in launch_slot's order: a key block computes a
    query block's dQ part in `step`, once its dQ buffer is free again; deterministically, its addition starts
    `poll` after the previous key block's release at that query block (dq_rank's order, checked) and is released
    `write` later, which frees the buffer; otherwise the buffer is free at once. Returns the time the last program
    ends."""
    window, block_n = (-1, -1), 128
    left, right = window_sides(causal, window)
    plan = ordered_backward_plan(seqlen, seqlen, causal, window, block_m, block_n)
    free, added, released, end = [0.0] * slots, {}, {}, 0.0
    for p1 in range(pairs // interleave):
        for p0 in range(len(plan.order) * interleave):
            row, pair = launch_slot(p0, p1, interleave)
            tile = plan.order[row]
            ready = free_at = heapq.heappop(free)
            for _, m0 in query_blocks(plan, tile, False):
                ready = max(ready + step, free_at)
                key = (pair, m0)
                assert added.get(key, 0) == dq_rank(tile, m0, seqlen, seqlen, left, right, block_m, block_n)
                if deterministic:
                    free_at = max(ready, released.get(key, float("-inf")) + poll) + write
                else:
                    free_at = ready
                released[key] = free_at
                added[key] = added.get(key, 0) + 1
            heapq.heappush(free, max(ready, free_at))
            end = max(end, ready, free_at)
    return end


def test_interleaved_pairs_keep_short_unmasked_programs_from_waiting_on_each_other():
    """The model of head_interleave's reason, with a link (poll + write) of 3/4 of a step, which puts the
    deterministic mode at 0.89x the other on the 64-step programs of D=64 at 8K (128-row query blocks; an H200
    measured 0.91x) and leaves the 128-step programs of D=128 and causal ranges within 2% (measured level)."""
    def ratio(block_m, causal, interleave):
        args = (8192, causal, block_m, 48)
        free_run = _linked_makespan(*args, 1, 1.0, 0.0, 0.0, deterministic=False)
        return free_run / _linked_makespan(*args, interleave, 1.0, 0.25, 0.5)
    assert ratio(128, False, 1) < 0.92 and ratio(128, False, 2) > 0.97
    assert ratio(64, False, 1) > 0.97 and ratio(64, True, 1) > 0.97


def test_descending_walk_only_where_a_head_outgrows_half_the_l2():
    l2 = 50 * 2 ** 20
    assert not descending_walk(True, (-1, -1), 8192, 1, 128, l2)
    assert descending_walk(True, (-1, -1), 131072, 1, 128, l2) and descending_walk(True, (-1, -1), 32768, 4, 128, l2)
    assert not descending_walk(False, (-1, -1), 131072, 1, 128, l2)  # no right side: every range starts at row 0
    assert not descending_walk(True, (4095, -1), 131072, 1, 128, l2)  # a sliding window: ranges a window long


def test_the_non_deterministic_backward_walks_causal_blocks_last_to_first_at_any_length():
    l2 = 50 * 2 ** 20
    assert descending_walk(True, (-1, -1), 8192, 1, 128, l2, deterministic=False)
    assert descending_walk(True, (-1, -1), 100, 1, 128, l2, deterministic=False)
    assert not descending_walk(False, (-1, -1), 131072, 1, 128, l2, deterministic=False)
    assert not descending_walk(True, (4095, -1), 131072, 1, 128, l2, deterministic=False)


@pytest.mark.parametrize("lens", [[1000, 0, 1, 2049, 517, 4096], [64, 64, 1, 63, 65, 128], [1] * 50, [0, 0, 7]])
def test_packed_documents_number_their_query_blocks_apart(lens):
    """The deterministic backward's semaphores for packed documents: one per (document, query block) of each head,
    none shared, all within document_semaphores."""
    firsts = [sum(lens[:d]) for d in range(len(lens))]
    seen = [document_query_block(first, d, m0, 64) for d, (first, n) in enumerate(zip(firsts, lens))
            for m0 in range(0, n, 64)]
    assert len(set(seen)) == len(seen) == sum(-(-n // 64) for n in lens)
    assert min(seen, default=0) >= 0 and max(seen, default=0) < document_semaphores(sum(lens), len(lens), 64)


def test_packed_documents_launch_key_blocks_in_each_plans_order():
    """A document's key blocks launch in the order of its dense plan (ordered_backward_plan) where dq additions are
    ordered, heaviest (lowest) first everywhere else."""
    for causal, window, det, desc in [(True, (-1, -1), True, False), (True, (-1, -1), True, True),
                                      (False, (-1, -1), True, False), (False, (100, 50), True, False),
                                      (True, (-1, -1), False, True), (False, (-1, -1), False, False)]:
        plan = ordered_backward_plan(3000, 3000, causal, window, 64, 128, desc)
        highest_first = list(plan.order) == sorted(plan.order, reverse=True) and len(plan.order) > 1
        assert document_key_order(causal, window, det, desc) == (det and highest_first)


def test_gqa_groups_split_over_programs_only_where_their_rows_outgrow_the_l2():
    l2 = 60 * 2 ** 20  # rows of the group: 8 bytes per row, head and column
    assert split_group(4, 32768, 128, l2) and split_group(8, 131072, 64, l2)  # 128 MiB / 512 MiB
    assert not split_group(4, 16384, 128, l2) and not split_group(4, 32768, 64, l2)  # 64 MiB: within twice the L2
    assert split_group(4, 16384, 128, l2, deterministic=False) and split_group(4, 32768, 64, l2, False)
    assert not split_group(4, 8192, 128, l2, deterministic=False)  # 32 MiB: within the L2
    assert not split_group(1, 1 << 20, 128, l2, deterministic=False)  # no group: nothing to split
    assert split_group(4, 8192, 128, 0)  # the GPU tests' "L2 of 0" splits every group


def _offsets(bases):
    """offset -> (row, col) of a layout given by its bases (XOR of the bases of the offset's set bits)."""
    out = []
    for o in range(1 << len(bases)):
        r = c = 0
        for k, (br, bc) in enumerate(bases):
            if o >> k & 1:
                r, c = r ^ br, c ^ bc
        out.append((r, c))
    return out


@pytest.mark.parametrize("rows,cols", [(64, 64), (128, 32), (64, 128), (256, 8)])
def test_dq_tiles_put_each_threads_fragment_registers_side_by_side(rows, cols):
    """Every element of a consumer's rows x cols dQ part once; thread (warp w, lane l) of a Hopper MMA accumulator
    holds columns 8j + 2(l % 4) + {0, 1} of rows 16w + l // 4 + {0, 8} (+ 64 per repeat): those four registers
    are 16 contiguous bytes, and the 32 lanes' are 512 contiguous bytes, so a warp's vector store meets no bank
    twice in a wavefront."""
    where = {rc: o for o, rc in enumerate(_offsets(dq_tile_bases(rows, cols)))}
    assert len(where) == rows * cols and all(r < rows and c < cols for r, c in where)
    for w in range(4):
        for rep in range(rows // 64):
            for j in range(cols // 8):
                first = None
                for lane in range(32):
                    r, c = 64 * rep + 16 * w + lane // 4, 8 * j + 2 * (lane % 4)
                    regs = [where[(r + 8 * i, c + e)] for i in (0, 1) for e in (0, 1)]
                    first = regs[0] if first is None else first
                    assert regs == [first + 4 * lane + k for k in range(4)], (w, rep, j, lane)
                assert first % 128 == 0
    with pytest.raises(ValueError, match="rows must be a power of two >= 64 and cols one >= 8, got 32 x 64"):
        dq_tile_bases(32, 64)


@pytest.mark.parametrize("bm,d,split_rows", [(64, 128, False), (128, 64, True), (128, 64, False)])
def test_dq_from_tiles_puts_every_element_back_in_row_order(bm, d, split_rows):
    """The accumulator's tiles, laid out by the bases (one consumer's half, then the other's by rows or columns),
    come back as (B, n_tiles * bm, H, D) in the output's dtype: against an element-by-element placement."""
    half = (bm // 2, d) if split_rows else (bm, d // 2)
    bases = dq_tile_bases(*half) + [[half[0], 0] if split_rows else [0, half[1]]]
    B, H, n_tiles = 2, 3, 3
    dq = torch.randn(B, n_tiles * bm, H, d)
    tiles = torch.empty(B, H, n_tiles, bm * d)
    for o, (r, c) in enumerate(_offsets(bases)):
        for t in range(n_tiles):
            tiles[:, :, t, o] = dq[:, t * bm + r, :, c]
    out = dq_from_tiles(tiles, bases, torch.empty(B, n_tiles * bm, H, d, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.equal(out, dq.double())


def test_document_rows_find_each_rows_tile_and_a_zero_tile_outside_every_document():
    bm = 64
    for lens, pad in [([1000, 0, 1, 2049, 517, 4096], 3), ([64, 64, 1, 63, 65, 128], 0), ([1] * 50, 70), ([], 5),
                      ([0, 0, 7], 1)]:
        cu = torch.tensor([0] + [sum(lens[:d + 1]) for d in range(len(lens))], dtype=torch.int32)
        total = sum(lens) + pad
        rows = document_rows(cu, total, bm).tolist()
        n_tiles = document_semaphores(total, len(lens), bm)
        want = [document_query_block(cu[d].item(), d, m, bm) * bm + m % bm for d, n in enumerate(lens)
                for m in range(n)]
        assert rows[:sum(lens)] == want
        assert rows[sum(lens):] == [(n_tiles - 1) * bm] * pad  # outside: the last tile, which no document reaches
        assert all(r < (n_tiles - 1) * bm for r in want)
