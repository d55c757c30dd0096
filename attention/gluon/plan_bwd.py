"""Host-side planning for the Gluon backward's dK/dV kernel: the query rows that each key block meets, split into
masked and unmasked segments, the order the grid visits key blocks, and the layout of the dQ tiles. Pure Python
(plan.py, torch and the standard library only), so the CPU tests check it without a GPU or a Gluon-capable triton.

    plan = backward_plan(seqlen_q=8192, seqlen_k=8192, causal=True, window_size=(-1, -1), block_m=64, block_n=128)
    plan.bounds[t]  # (lo, a, b, hi): query rows of key block t; [a, b) needs no mask, [lo, a) and [b, hi) do
    plan.order      # key blocks, heaviest first
    ordered_backward_plan(...)  # the deterministic mode's: key blocks in the order they add into each dQ block

Visibility is the rule of the forward planner (plan.py) and of attention/triton/common.py: query i of Nq sees
key j of Nk iff
    i + off - left <= j <= i + off + right,   off = Nk - Nq,
with an unbounded side when left / right is -1, causal meaning right = 0. Read from the key side: key j is seen
by rows j - off - right <= i <= j - off + left. The dQ kernel walks key blocks per query tile, which is
plan.forward_plan with the dQ kernel's tile sizes.
"""

from __future__ import annotations

import torch

from .plan import TilePlan, n_blocks, segments, window_sides


def query_range(n0: int, seqlen_q: int, seqlen_k: int, left: int, right: int, block_m: int,
                block_n: int, aligned: bool = False) -> tuple[int, int, int, int]:
    """Query rows that see keys [n0, n0 + block_n) (n0 < seqlen_k): (lo, a, b, hi).

    Query blocks start at lo, lo + block_m, ...; a block inside [a, b) lies within [0, seqlen_q), and each of
    its rows sees every key of the key block, which itself lies within [0, seqlen_k): it runs without a mask.
    Blocks in [lo, a) and [b, hi) are masked; rows outside [lo, hi) see no key of the block and are never
    loaded. Mirror of plan.key_range (and of query_segments in attention/triton/common.py). aligned: lo rounded
    down to a multiple of block_m, so that every key block's query blocks are the same rows.
    """
    n1 = min(n0 + block_n, seqlen_k)  # one past the last real key
    off = seqlen_k - seqlen_q
    lo, hi = 0, seqlen_q
    full_lo, full_hi = 0, seqlen_q
    if right >= 0:
        lo = max(lo, n0 - off - right)
        full_lo = n0 + block_n - 1 - off - right  # the padded block end: a tail block is masked anyway
    if left >= 0:
        hi = min(hi, n1 - 1 - off + left + 1)
        full_hi = min(full_hi, n0 - off + left + 1)
    if n0 + block_n > seqlen_k:
        full_hi = lo  # a key block that runs past the end is masked everywhere
    if aligned:
        lo -= lo % block_m
    return segments(lo, hi, full_lo, full_hi, block_m)


def backward_plan(seqlen_q: int, seqlen_k: int, causal: bool, window_size, block_m: int,
                  block_n: int) -> TilePlan:
    """Key blocks of block_n keys over query blocks of block_m rows; ties in work keep the earlier block first.
    Query ranges are aligned: every key block adds into the same dQ tiles (dq_tile_bases)."""
    left, right = window_sides(causal, window_size)
    n_tiles = -(-seqlen_k // block_n)
    bounds = tuple(query_range(t * block_n, seqlen_q, seqlen_k, left, right, block_m, block_n, aligned=True)
                   for t in range(n_tiles))
    work = [n_blocks(lo, hi, block_m) for lo, _, _, hi in bounds]
    return TilePlan(block_m, bounds, tuple(sorted(range(n_tiles), key=lambda t: (-work[t], t))))


def ordered_backward_plan(seqlen_q: int, seqlen_k: int, causal: bool, window_size, block_m: int,
                          block_n: int, descending: bool = False) -> TilePlan:
    """The deterministic warp-specialized backward's plan. Each key block adds its part of dQ_i into query block i
    (rows [i * block_m, (i + 1) * block_m), the same rows for every key block: aligned query ranges) in a fixed
    order, the order the grid launches them in, so that a key block only ever waits for key blocks launched
    before it (dq_rank).

    The key blocks resident together should also reach each query block in that order, or each waits for the one
    before it. Without a right side every key block's query range starts at the first row
    and they walk their query blocks first to last: first key block first. With a right side (causal) the ranges
    end together and start later for later key blocks:
    - descending=False: they walk first to last, and a later key block reaches a query block two steps earlier:
      last key block first. Launched lightest first, the resident key blocks then spread over the whole sequence,
      which costs L2 hits once a head's Q, dO and dQ rows outgrow the L2.
    - descending=True (descending_walk): they walk last to first and all start at the last query block: first
      key block first, heaviest first. The resident key blocks stay on nearby query blocks, but the ones that
      start together wait for one another once, one addition apart. With GQA they walk block by block over the
      group's heads (query_blocks): head by head, each key block, two query blocks per head shorter than the one
      launched before it, would reach the next head's last block early and wait there, more at every head."""
    left, right = window_sides(causal, window_size)
    n_tiles = -(-seqlen_k // block_n)
    bounds = tuple(query_range(t * block_n, seqlen_q, seqlen_k, left, right, block_m, block_n, aligned=True)
                   for t in range(n_tiles))
    order = tuple(range(n_tiles - 1, -1, -1)) if right >= 0 and not descending else tuple(range(n_tiles))
    return TilePlan(block_m, bounds, order)


def head_interleave(causal: bool, window_size, deterministic: bool, pairs: int) -> int:
    """How many of the `pairs` (batch, head) pairs the warp-specialized backward's launch order interleaves, key
    block by key block (launch_slot): 2 in the deterministic mode without a mask where the pairs go two by two,
    else 1 (pair after pair).

    In the deterministic mode a key block adds into a query block only after the key block launched before it
    (ordered_backward_plan), one link later: that one's release seen, the reduce-add written, the release. Without
    a mask every key block of a pair walks its query blocks from the first, in step, so each starts one link behind
    the one before it. Launched pair after pair, the key blocks of one pair start as programs finish, about one per
    (a program's time / the SMs); where that is shorter than a link (short programs: few query blocks, as at D=64
    with 128-row blocks and 8K rows), every key block waits longer than the one before it. Two pairs interleaved
    space each pair's key blocks twice as far apart. Causal and windowed ranges start at staggered rows. The order
    of the additions into a query block, and so dq, do not depend on the launch order."""
    left, right = window_sides(causal, window_size)
    return 2 if deterministic and left < 0 and right < 0 and pairs % 2 == 0 else 1


def launch_slot(pid0: int, pid1: int, interleave: int) -> tuple[int, int]:
    """(plan row, (batch, head) pair) of program (pid0, pid1) of the backward's (rows * interleave, pairs /
    interleave) grid, launched with pid0 varying fastest: `interleave` pairs at a time, row by row, each pair's
    rows in plan order. Twin of the kernel's _launch_slot."""
    return pid0 // interleave, pid1 * interleave + pid0 % interleave


def group_rows_bytes(group: int, seqlen_q: int, head_dim: int) -> int:
    """Bytes of the rows one KV head's query heads stream through the backward: Q and dO (2 bytes an element) and
    the fp32 dQ, 8 bytes per row, head and column. descending_walk and split_group weigh it against the L2."""
    return group * seqlen_q * head_dim * 8


def descending_walk(causal: bool, window_size, seqlen_q: int, group: int, head_dim: int, l2_bytes: int,
                    deterministic: bool = True) -> bool:
    """Whether the backward walks each key block's query blocks last to first: with a right side and no left one
    (causal). The resident key blocks, launched heaviest first, then start together at the last query block and
    stay on nearby ones. The deterministic mode (ordered_backward_plan) does so only where the Q, dO (2 bytes an
    element) and fp32 dQ rows of one KV head's query heads would fill more than half the L2: its key blocks that
    start together wait for one another once, one addition apart, which costs more than the L2 hits gain while the
    rows fit. The non-deterministic mode never waits. With a left side (a sliding window) a key block meets a
    window's worth of query blocks, and the resident key blocks stay within a few windows walking first to last.
    Packed documents walk as the non-deterministic mode in both modes (bwd.gluon_attn_varlen_backward)."""
    left, right = window_sides(causal, window_size)
    if right < 0 or left >= 0:
        return False
    return not deterministic or group_rows_bytes(group, seqlen_q, head_dim) > l2_bytes // 2


def split_group(group: int, seqlen_q: int, head_dim: int, l2_bytes: int, deterministic: bool = True) -> bool:
    """Whether the warp-specialized backward splits a GQA group over programs, one per (key block, query head),
    instead of one per (key block, KV head) walking the group's heads: where the Q, dO (2 bytes an element) and
    fp32 dQ rows of the group's query heads would fill more than the L2 (twice the L2 in the deterministic mode).
    The resident key blocks sit at different query blocks, and each of those holds the rows of every head of the
    group: at GQA 4, 128K rows and D=128 on an H200, the L2 hit rate was 87.5% against 98.9% for the same query
    heads without GQA. Split, a program holds one head's rows, as without GQA, and writes that head's dK / dV in
    fp32, which the host sums over the group in a fixed order: 8 bytes per key, query head and column written and
    read again. Measured on an H200 (docs/results.md): the non-deterministic mode gained from 16K rows at D=128
    and from 8K at D=64, and lost 2% at 8K, D=128; the deterministic mode gained from 32K rows at D=128, lost at
    8K, and at D=64 lost 3% at 32K and broke even at 128K."""
    return group > 1 and group_rows_bytes(group, seqlen_q, head_dim) > (2 if deterministic else 1) * l2_bytes


def query_blocks(plan: TilePlan, tile: int, descending: bool, group: int = 1) -> list[tuple[int, int]]:
    """(head of the GQA group, first row) of key block `tile`'s query blocks in the order the kernel visits them
    (the twin of the kernel's _pair): head by head, each first to last; descending: block by block from the last,
    each over the group's heads, so that key blocks in step stay in step from one head to the next."""
    lo = plan.bounds[tile][0]
    starts = [lo + i * plan.block for i in range(plan.blocks(tile))]
    if descending:
        return [(g, m0) for m0 in starts[::-1] for g in range(group)]
    return [(g, m0) for g in range(group) for m0 in starts]


def dq_rank(tile: int, m0: int, seqlen_q: int, seqlen_k: int, left: int, right: int, block_m: int,
            block_n: int, descending: bool = False) -> int:
    """How many key blocks add into query block m0 // block_m before key block `tile` does, in
    ordered_backward_plan's order: the key blocks launched earlier whose query range holds the block. Twin of the
    kernel's _dq_rank; (left, right) from plan.window_sides."""
    off = seqlen_k - seqlen_q
    if right >= 0 and not descending:  # key blocks tile + 1 .. last, the last one any row of the block sees
        last = min(-(-seqlen_k // block_n) - 1, (m0 + block_m - 1 + off + right) // block_n)
        return last - tile
    first = max(m0 + off - left, 0) // block_n if left >= 0 else 0  # the first key block a row of it sees
    return tile - first


def document_key_order(causal: bool, window_size, deterministic: bool, descending: bool) -> bool:
    """Whether packed documents' key blocks launch highest first (plan.document_tiles' descending order): where the
    deterministic plan of one document would (ordered_backward_plan: with a right side, walking first to last).
    Otherwise lowest first, the heaviest causal key blocks first. Across documents the order is free: no two
    documents add into one query block's semaphore (document_query_block)."""
    _, right = window_sides(causal, window_size)
    return deterministic and right >= 0 and not descending


def document_query_block(first_q: int, doc: int, m0: int, block_m: int) -> int:
    """Index of the query block at row m0 of the document that starts at row first_q (its doc-th), among the
    semaphores of one head: first_q // block_m + doc + m0 // block_m. Distinct for distinct (document, block):
    document d + 1 starts past the first row of d's last block. Twin of the kernel's qblk + m0 // BLOCK_M."""
    return first_q // block_m + doc + m0 // block_m


def document_semaphores(total_q: int, n_docs: int, block_m: int) -> int:
    """Semaphores (and dQ tiles) per head for packed documents: more than any document_query_block."""
    return -(-total_q // block_m) + n_docs


def document_rows(cu_seqlens: torch.Tensor, total: int, block_m: int) -> torch.Tensor:
    """int64 (total,): each packed row's row among one head's dQ tiles of block_m rows (document_semaphores of
    them): row m of document d is row m % block_m of tile document_query_block(first_q, d, m). Rows outside every
    document map to the first row of the last tile, which no document reaches, so it stays zero: d's tiles end
    before first_q // block_m + d + ceil(len / block_m) <= ceil((first_q + len) / block_m) + d. Tensor ops on
    cu_seqlens' device: the host never waits for the lengths."""
    n_docs = cu_seqlens.numel() - 1
    rows = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    doc = torch.searchsorted(cu_seqlens, rows, right=True) - 1  # the last document that starts at or before
    inside = (doc >= 0) & (doc < n_docs)
    d = doc.clamp(0, max(n_docs - 1, 0)).long()
    first = cu_seqlens.long()[d]
    at = (first // block_m + d) * block_m + rows.long() - first
    return torch.where(inside, at, (document_semaphores(total, n_docs, block_m) - 1) * block_m)


def dq_tile_bases(rows: int, cols: int) -> list[list[int]]:
    """Where one consumer warpgroup's rows x cols fp32 part of dQ_i lies in shared memory, and in the dQ
    accumulator, which the tile is added into as it is: element offset 2**k holds (row, col) = bases[k], offsets
    combining by XOR (a SharedLinearLayout's offset_bases). The order of a Hopper MMA accumulator's fragments
    (4 warps of 16 rows; a thread holds columns 2c, 2c + 1 of rows r and r + 8 in each 8-column group): each
    thread's two columns of two rows first, then its lane, its warp, and its further 8-column groups and 64-row
    repeats. A warp's store of four registers then covers 512 contiguous bytes, with no bank conflict; with a
    TMA swizzle, rows r and r ^ 1 of a half-warp's 8-byte stores meet in the same banks."""
    if rows % 64 or cols % 8 or rows & (rows - 1) or cols & (cols - 1):
        raise ValueError(f"dq_tile_bases: rows must be a power of two >= 64 and cols one >= 8, got {rows} x {cols}")
    bases = [[0, 1], [8, 0], [0, 2], [0, 4], [1, 0], [2, 0], [4, 0], [16, 0], [32, 0]]
    bases += [[0, 1 << k] for k in range(3, cols.bit_length() - 1)]
    bases += [[1 << k, 0] for k in range(6, rows.bit_length() - 1)]
    return bases


def dq_from_tiles(tiles: torch.Tensor, bases: list[list[int]], out: torch.Tensor) -> torch.Tensor:
    """Copy the dQ accumulator's tiles (B, H, n_tiles, 2 ** len(bases)) fp32, each one query block laid out by
    bases (dq_tile_bases and the split of the block between the consumers), into out (B, n_tiles * block_m, H, D),
    converting to out's dtype in the same pass."""
    B, H, n_tiles, _ = tiles.shape
    n = len(bases)
    src = tiles.view(B, H, n_tiles, *[2] * n)  # offset bit k is dimension 3 + n - 1 - k
    row_bits = sorted((k for k in range(n) if bases[k][0]), key=lambda k: -bases[k][0])
    col_bits = sorted((k for k in range(n) if bases[k][1]), key=lambda k: -bases[k][1])
    if len(row_bits) + len(col_bits) != n:
        raise ValueError(f"dq_from_tiles: every basis must move one coordinate, got {bases}")
    dims = [3 + n - 1 - k for k in row_bits] + [1] + [3 + n - 1 - k for k in col_bits]
    dst = out.view(B, n_tiles, *[2] * len(row_bits), H, *[2] * len(col_bits))
    dst.copy_(src.permute(0, 2, *dims))
    return out
