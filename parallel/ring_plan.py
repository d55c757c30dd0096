"""Ring attention's plan: which (query rows, key rows) blocks each rank computes at each ring step.

    plan = ring_plan(position_ids_local, group=cp_group, layout="zigzag", causal=True)   # once per batch
    steps = ring_steps(rank, world_size, n_local, "zigzag", causal=True)                # dense, no collective

With causal attention only the visible chunk pairs are listed (zigzag: every step but the diagonal one costs
exactly half a block; contiguous: later ranks' blocks are skipped). Packed documents turn a block into varlen
segments of the documents its queries and keys share; a causal sliding window splits the blocks per chunk pair
and cuts each to the rows that see one another (window_rect). ring.py runs the plan.

Windows are the attention API's window_size=(left, right) throughout; the ring takes NO_WINDOW or a causal
sliding window (left, 0), which causal_window checks and normalises.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import Optional

import torch

from attention.validation import check_options

from .sharding import (check_layout, chunk_ids, doc_cu_seqlens, doc_ids_from_positions, group_rank_and_size,
                       shard_for_rank, unshard_sequence)

NO_WINDOW = (-1, -1)


def causal_window(causal: bool, window_size) -> tuple[int, int]:
    """window_size as the ring runs it: NO_WINDOW, or (left, 0) (query q sees keys q - left .. q).

    (-1, 0) under causal is no window; (left, -1) under causal is (left, 0). Any other window is a ValueError:
    the ring cuts its blocks for causal sliding windows only.
    """
    left, right = window_size
    if (left, right) == NO_WINDOW or (causal and (left, right) == (-1, 0)):
        return NO_WINDOW
    if left < 0 or not (right == 0 or (right == -1 and causal)):
        raise ValueError(f"ring / hybrid attention: window_size must be a causal sliding window (left >= 0, 0) or "
                         f"(-1, -1); got {tuple(window_size)} with causal={causal}")
    return left, 0


@dataclass(frozen=True)
class Block:
    """One attention call of a ring step: local query rows vs rows of the K/V block held this step."""
    q_rows: slice
    k_rows: slice
    causal: bool
    varlen: Optional[tuple] = None  # (cu_q, cu_k, max_q, max_k) over the block's rows, batch flattened
    window_size: tuple = NO_WINDOW  # of the kernel call, for this block's rectangle
    batch: slice = field(default_factory=lambda: slice(None))  # batch rows (one, for a packed off-diagonal
    # block under a window)


def window_rect(q0: int, nq: int, k0: int, nk: int, window_size: tuple) -> Optional[tuple]:
    """A causal sliding window (left, 0) between the global query rows [q0, q0+nq) and key rows [k0, k0+nk).

    Query q sees key k iff q - left <= k <= q. Returns None when no pair is visible, else (i0, i1, j0, j1,
    window_size): the local query rows [i0, i1) and key rows [j0, j1) holding every visible pair, each of them
    seeing or seen by at least one other, and the (left, right) that flash_attn_func takes for that rectangle
    (bottom-right aligned; -1 where a side does not bind). Trimming is what keeps both sides >= 0: the
    kernels' convention has no window that starts right of the diagonal.
    """
    w_left = window_size[0]
    d = q0 - k0  # local key j is visible to local query i iff i + d - w_left <= j <= i + d
    i0, i1 = max(0, -d), min(nq, nk - d + w_left)
    if i0 >= i1:
        return None
    j0, j1 = max(0, i0 + d - w_left), min(nk, i1 + d)
    if j0 >= j1:
        return None
    nq2, nk2, d2 = i1 - i0, j1 - j0, d + i0 - j0
    off = nk2 - nq2  # the kernels align the rectangle bottom-right: query i's diagonal is key i + off
    right, left = d2 - off, w_left - d2 + off
    right = -1 if d2 >= nk2 - 1 else right  # every key at or left of each query's diagonal: unbounded
    left = -1 if left >= nk2 - 1 else left
    return i0, i1, j0, j1, (left, right)


def _runs(indices):
    """[0, 1, 3] -> [(0, 2), (3, 4)]: contiguous runs as half-open ranges."""
    for _, grp in groupby(enumerate(indices), key=lambda t: t[1] - t[0]):
        run = [i for _, i in grp]
        yield run[0], run[-1] + 1


def _dense_blocks(rank: int, src: int, world_size: int, n_local: int, layout: str, causal: bool) -> list:
    everything = slice(0, n_local)
    if not causal:
        return [Block(everything, everything, False)]
    if src == rank:
        # Local chunks are in ascending global order, so plain causal on the local rows is exact.
        return [Block(everything, everything, True)]
    q_chunks, k_chunks = chunk_ids(rank, world_size, layout), chunk_ids(src, world_size, layout)
    size = n_local // len(q_chunks)
    # Between distinct chunks a pair is fully visible (key chunk earlier) or fully masked: skip the latter,
    # and merge query chunks that see the same key chunks into one call.
    visible = [tuple(j for j, kc in enumerate(k_chunks) if kc < qc) for qc in q_chunks]
    blocks, i = [], 0
    for cols, grp in groupby(visible):
        n_rows = len(list(grp))
        for j0, j1 in _runs(cols):
            blocks.append(Block(slice(i * size, (i + n_rows) * size), slice(j0 * size, j1 * size), False))
        i += n_rows
    return blocks


def _window_blocks(rank: int, src: int, world_size: int, n_local: int, layout: str, window_size: tuple,
                   q_doc: Optional[torch.Tensor] = None, k_doc: Optional[torch.Tensor] = None, device=None) -> list:
    """The blocks of one ring step under a causal sliding window, one per visible (query chunk, key chunk) pair.

    With documents (q_doc / k_doc: (B, n_local) ids of this rank's and src's rows), a chunk paired with itself
    keeps one varlen call (each document's segment is square there, so one window fits all). Between distinct
    chunks only the document crossing from the key chunk into the query chunk is shared, with a different
    offset in each batch row, so each row gets a dense call on that document's rectangle.
    """
    q_chunks, k_chunks = chunk_ids(rank, world_size, layout), chunk_ids(src, world_size, layout)
    size = n_local // len(q_chunks)
    blocks = []
    for a, qc in enumerate(q_chunks):
        for b, kc in enumerate(k_chunks):
            if kc > qc:
                continue
            if qc == kc or q_doc is None:
                rect = window_rect(qc * size, size, kc * size, size, window_size)
                if rect is None:
                    continue
                i0, i1, j0, j1, win = rect
                blk = Block(slice(a * size + i0, a * size + i1), slice(b * size + j0, b * size + j1), False,
                             window_size=win)
                blocks += [blk] if q_doc is None else _with_docs([blk], q_doc, k_doc, device)
                continue
            for r in range(q_doc.shape[0]):
                q_ids, k_ids = q_doc[r, a * size:(a + 1) * size], k_doc[r, b * size:(b + 1) * size]
                shared = int(q_ids[0])  # a document in both chunks runs from the key chunk into this one
                qs, ks = (q_ids == shared).nonzero().flatten(), (k_ids == shared).nonzero().flatten()
                if len(ks) == 0:
                    continue
                q_lo, k_lo = int(qs[0]), int(ks[0])  # a prefix of the query chunk, a suffix of the key chunk
                rect = window_rect(qc * size + q_lo, len(qs), kc * size + k_lo, len(ks), window_size)
                if rect is None:
                    continue
                i0, i1, j0, j1, win = rect
                q_at, k_at = a * size + q_lo, b * size + k_lo
                blocks.append(Block(slice(q_at + i0, q_at + i1), slice(k_at + j0, k_at + j1), False, window_size=win,
                                     batch=slice(r, r + 1)))
    return blocks


def _with_docs(blocks: list, q_doc: torch.Tensor, k_doc: torch.Tensor, device) -> list:
    """Attach per-document varlen segments; drop blocks whose queries and keys share no document."""
    kept = []
    for blk in blocks:
        cu_q, cu_k, max_q, max_k, shared = doc_cu_seqlens(q_doc[:, blk.q_rows], k_doc[:, blk.k_rows])
        if shared:
            kept.append(replace(blk, varlen=(cu_q.to(device), cu_k.to(device), max_q, max_k)))
    return kept


def ring_steps(rank: int, world_size: int, n_local: int, layout: str = "zigzag", causal: bool = True,
               doc_ids: Optional[torch.Tensor] = None, device=None, window_size: tuple = NO_WINDOW) -> list:
    """The blocks each ring step computes, indexed by step (step s holds the K/V of rank - s). Pure: no comm.

    doc_ids: (B, N) document ids of the full sequence (see sharding.doc_ids_from_positions), or None.
    window_size (left, 0): a causal sliding window (query q sees keys q - left .. q); causal is then implied.
    """
    window_size = causal_window(causal, window_size)
    causal = causal or window_size != NO_WINDOW
    steps = []
    for step in range(world_size):
        src = (rank - step) % world_size
        q_doc = k_doc = None
        if doc_ids is not None:
            q_doc = shard_for_rank(doc_ids, 1, rank, world_size, layout)
            k_doc = shard_for_rank(doc_ids, 1, src, world_size, layout)
        if window_size != NO_WINDOW:
            blocks = _window_blocks(rank, src, world_size, n_local, layout, window_size, q_doc, k_doc, device)
        else:
            blocks = _dense_blocks(rank, src, world_size, n_local, layout, causal)
            if doc_ids is not None:
                blocks = _with_docs(blocks, q_doc, k_doc, device)
        steps.append(blocks)
    return steps


@dataclass(frozen=True)
class RingPlan:
    """Which blocks ring_attn_func computes at each step, for one rank, layout, mask and batch of documents.

    Built by ring_plan (packed documents) or internally (dense); reusable by every layer of a forward and by
    its backward (and activation-checkpoint recompute) as long as the position ids are the same.
    """
    rank: int
    world_size: int
    n_local: int
    layout: str
    causal: bool
    batch_size: Optional[int]  # rows the document segments cover; None: dense, any batch size
    steps: tuple  # steps[s]: tuple of Block computed while holding the K/V of rank (rank - s) % world_size
    window_size: tuple = NO_WINDOW  # as causal_window returns it


def dense_plan(rank: int, world_size: int, n_local: int, layout: str, causal: bool,
               window_size: tuple = NO_WINDOW) -> RingPlan:
    """The plan without documents: the same blocks for any batch, no collective. window_size: causal_window's."""
    steps = ring_steps(rank, world_size, n_local, layout, causal, window_size=window_size)
    return RingPlan(rank, world_size, n_local, layout, causal, None, tuple(map(tuple, steps)), window_size)


def check_local_positions(fn: str, position_ids, layout: str, world_size: int) -> torch.Tensor:
    """(N_local,) or (B, N_local) integer position ids -> (B, N_local); ValueError naming what was seen."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (1, 2) \
            or position_ids.is_floating_point() or position_ids.shape[-1] == 0:
        seen = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"{fn}: position_ids must be an integer tensor (N_local,) or (B, N_local) with "
                         f"N_local >= 1; got {seen}")
    if layout == "zigzag" and world_size > 1 and position_ids.shape[-1] % 2 != 0:
        raise ValueError(f"{fn}: N_local {position_ids.shape[-1]} must be even for layout='zigzag'; position_ids "
                         f"{tuple(position_ids.shape)}")
    return position_ids.reshape(-1, position_ids.shape[-1])


def ring_plan(position_ids: torch.Tensor, group=None, layout: str = "zigzag", causal: bool = True,
              window_size: tuple = NO_WINDOW) -> RingPlan:
    """The packed-document plan for ring_attn_func(..., plan=...): build once per batch, reuse in every layer.

    window_size: the one ring_attn_func gets, (left, 0) for a causal sliding window.
    position_ids (N_local,) or (B, N_local): this rank's shard (in `layout`) of the packed positions (0 starts
    a document); the plan then fits q of batch size B (1 for a 1-D input; expand the ids for more rows).
    Collective over `group`: every rank calls it. Costs one all-gather of the int positions and one host sync.
    """
    check_layout(layout)
    check_options("ring_plan", None, window_size)
    window_size = causal_window(bool(causal), window_size)  # before the collective: a bad window fails everywhere
    causal = bool(causal) or window_size != NO_WINDOW
    rank, world_size = group_rank_and_size(group)
    local_pos = check_local_positions("ring_plan", position_ids, layout, world_size)  # (B, N_local)
    # Document ids need the whole sequence: a shard cannot see where its first document began.
    doc_ids = doc_ids_from_positions(unshard_sequence(local_pos, 1, group, layout).cpu())
    B, n_local = local_pos.shape
    steps = ring_steps(rank, world_size, n_local, layout, causal, doc_ids, position_ids.device, window_size)
    return RingPlan(rank, world_size, n_local, layout, causal, B, tuple(map(tuple, steps)), window_size)
