"""Host-side planning for the Gluon Hopper kernels: which cases they cover, the key-block ranges of each query
tile, and the order a persistent grid visits tiles. Pure Python, so the CPU tests check it without a GPU.

    plan = forward_plan(seqlen_q=8192, seqlen_k=8192, causal=True, window_size=(-1, -1), block_m=128, block_n=128)
    plan.bounds[t]  # (lo, a, b, hi): keys of query tile t; [a, b) needs no mask, [lo, a) and [b, hi) do
    plan.order      # query tiles, heaviest first
    forward_pairs(...).order  # causal: the same tiles two by two, heaviest with lightest (the forward's order)

Visibility is the Triton kernels' rule (attention/triton/common.py): query i of Nq sees key j of Nk iff
    i + off - left <= j <= i + off + right,   off = Nk - Nq,
with an unbounded side when left / right is -1, causal meaning right = 0.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

GLUON_HEAD_DIMS = (64, 128)
GLUON_DTYPES = (torch.float16, torch.bfloat16)
FP8_BLOCK_N = 128  # keys per block of the Gluon FP8 forward (fwd.FWD_FP8_CONFIG): one K and one V scale each


def window_sides(causal: bool, window_size) -> tuple[int, int]:
    """(left, right) with -1 for an unbounded side; causal caps right at 0."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def n_blocks(lo: int, hi: int, block: int) -> int:
    return -(-(hi - lo) // block)


def key_range(m0: int, m1: int, seqlen_q: int, seqlen_k: int, left: int, right: int,
              block_n: int) -> tuple[int, int, int, int]:
    """Keys for query rows [m0, m1) (m1 clipped to seqlen_q by the caller): (lo, a, b, hi).

    Key blocks start at lo, lo + block_n, ...; a block inside [a, b) is visible to every row of the tile and
    in bounds, so it runs without a mask; blocks in [lo, a) and [b, hi) are masked; keys outside [lo, hi) are
    seen by no row of the tile and never loaded.
    """
    off = seqlen_k - seqlen_q
    lo, hi = 0, seqlen_k
    full_lo, full_hi = 0, seqlen_k
    if left >= 0:
        lo = max(lo, m0 + off - left)
        full_lo = m1 - 1 + off - left
    if right >= 0:
        hi = min(hi, m1 - 1 + off + right + 1)
        full_hi = min(full_hi, m0 + off + right + 1)
    return segments(lo, hi, full_lo, full_hi, block_n)


def segments(lo: int, hi: int, full_lo: int, full_hi: int, block: int) -> tuple[int, int, int, int]:
    """(lo, a, b, hi) for a loop over blocks lo, lo + block, ... up to hi, where [full_lo, full_hi) is what every
    row (column) of the tile sees in bounds: [a, b) covers the blocks that lie wholly inside it."""
    hi = max(hi, lo)
    count = n_blocks(lo, hi, block)
    t_a = min(-(-max(full_lo - lo, 0) // block), count)
    t_b = max(min(max(full_hi - lo, 0) // block, count), t_a)
    return lo, lo + t_a * block, lo + t_b * block, hi


@dataclass(frozen=True)
class TilePlan:
    """Per tile of one side, the range it loops over on the other: the forward's query tiles over key blocks
    (forward_plan), the backward's key blocks over query blocks (plan_bwd.backward_plan)."""
    block: int  # the loop's block size: block_n forward, block_m backward
    bounds: tuple  # per tile: (lo, a, b, hi)
    order: tuple  # tiles in the order they are visited (None: an empty row)

    def table(self, device) -> torch.Tensor:
        """int32 (len(order), 5) for the kernel: row p = (tile, lo, a, b, hi) of the p-th tile to visit; an empty
        row is all -1 (hi < 0: skipped)."""
        rows = [(t, *self.bounds[t]) if t is not None else (-1,) * 5 for t in self.order]
        return torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)

    def blocks(self, t: int) -> int:
        lo, _, _, hi = self.bounds[t]
        return n_blocks(lo, hi, self.block)


def forward_plan(seqlen_q: int, seqlen_k: int, causal: bool, window_size, block_m: int, block_n: int) -> TilePlan:
    """Query tiles of block_m rows over key blocks of block_n; ties in work keep the later tile first (causal: the
    longest rows)."""
    left, right = window_sides(causal, window_size)
    n_tiles = -(-seqlen_q // block_m)
    bounds = tuple(key_range(t * block_m, min((t + 1) * block_m, seqlen_q), seqlen_q, seqlen_k, left, right,
                             block_n) for t in range(n_tiles))
    work = [n_blocks(lo, hi, block_n) for lo, _, _, hi in bounds]
    return TilePlan(block_n, bounds, tuple(sorted(range(n_tiles), key=lambda t: (-work[t], -t))))


def forward_pairs(seqlen_q: int, seqlen_k: int, causal: bool, window_size, block_m: int, block_n: int) -> TilePlan:
    """forward_plan's tiles two by two, for the persistent forward where a tile's work grows with its index (a
    causal mask with no left window side; pairs_tiles says where): pair i is the i-th heaviest tile, then the i-th
    lightest (None when the count is odd). A program visits both tiles of a pair, the second one's key blocks
    last-first. Causal pairs then cost the same (n + 1 blocks), so the programs stay in step as they do without a
    mask, and at any moment they all read one of two key blocks of a head (block t of a first tile, block n - t
    of a second), which L2 serves. Single tiles heaviest first let the programs drift apart over several heads,
    whose K/V then no longer fit in L2."""
    plan = forward_plan(seqlen_q, seqlen_k, causal, window_size, block_m, block_n)
    n = len(plan.order)
    order = []
    for i in range((n + 1) // 2):
        order += [plan.order[i], plan.order[n - 1 - i] if n - 1 - i != i else None]
    return TilePlan(plan.block, plan.bounds, tuple(order))


def key_blocks(lo: int, hi: int, block: int, rev: bool) -> list[int]:
    """First keys of the blocks a tile with key range [lo, hi) visits, in order: first-to-last, or last-first (rev:
    the second tile of a pair). The forward kernel's _key is the twin."""
    n = n_blocks(lo, hi, block)
    return [lo + (j + int(rev) * (n - 1 - 2 * j)) * block for j in range(n)]


def pairs_tiles(causal: bool, window_size, group: int, head_dim: int) -> bool:
    """Whether the persistent forward visits tiles two by two (forward_pairs): where the work per query tile grows
    along the sequence (a bounded right side, an unbounded left one) and the single-tile order's K/V outgrow the
    L2. Its head chunks hold half the L2 of K/V with one query head per KV head (group 1); the programs drift over
    a few chunks, so MHA re-reads K/V from HBM, while GQA chunks share their K/V and stay in L2 (there pairs
    measured 1-3% slower; at D=64, where the kernel is bound elsewhere, up to 2%). Elsewhere tiles go one by one,
    heaviest first."""
    left, right = window_sides(causal, window_size)
    return left < 0 and right >= 0 and group == 1 and head_dim >= 128


_TABLES: dict = {}


def cached_table(make, seqlen_q: int, seqlen_k: int, causal: bool, window_size, block_m: int, block_n: int,
                 device, *options) -> torch.Tensor:
    """make(..., *options).table(device) (make: forward_pairs, forward_plan or a plan_bwd plan), built and uploaded
    once per shape. Keyed by the function itself: two planners of the same name never share a table."""
    key = (make, seqlen_q, seqlen_k, bool(causal), tuple(window_size), block_m, block_n, str(device),
           *options)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) > 256:
            _TABLES.clear()
        table = _TABLES[key] = make(seqlen_q, seqlen_k, causal, window_size, block_m, block_n, *options).table(device)
    return table


def document_tiles(cu_seqlens: torch.Tensor, total: int, block: int, descending: bool = True) -> torch.Tensor:
    """int32 (rows, 2) of (document, tile) for packed documents, by tile index: highest first (descending: the
    forward's query tiles, heaviest causal tiles first) or lowest first (the backward's key blocks,
    plan_bwd.document_key_order), then padding rows (-1, -1). Built with tensor ops on cu_seqlens' device, so the
    host never waits for the lengths; rows is total // block + n_docs, a bound on the number of tiles. Ties keep
    document order."""
    n_docs = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tiles = (lens + block - 1) // block
    ends = tiles.cumsum(0)
    i = torch.arange(total // block + n_docs, device=cu_seqlens.device)
    doc = torch.searchsorted(ends, i, right=True)
    valid = doc < n_docs
    doc = doc.clamp(max=max(n_docs - 1, 0))
    tile = i - (ends[doc] - tiles[doc])
    if descending:
        key, order = torch.sort(torch.where(valid, tile, -1), descending=True, stable=True)
    else:
        key, order = torch.sort(torch.where(valid, tile, i.numel() + 1), stable=True)
        key = torch.where(key > i.numel(), -1, key)
    doc = torch.where(key >= 0, doc[order], -1)
    return torch.stack((doc, key), 1).to(torch.int32)


def balanced_schedule(plan: TilePlan, per_item: int, n_bh: int, chunk: int, n_programs: int,
                      overhead: float = 1.0) -> list[int]:
    """The persistent forward's work items (work_item's numbering) laid out for n_programs programs, program p
    running positions p, p + n_programs, ...: the items go out in work_item's order (chunk by chunk, heaviest tiles
    first), each to the program with the least work so far (key blocks, plus `overhead` per tile), as a dynamic
    scheduler would hand them out; -1 pads the programs that end with fewer items. Equal costs give the round robin
    w -> w % n_programs; causal single tiles, whose costs fall along each chunk, would otherwise pile the heavier
    items of every round on the first programs."""
    n_slots = len(plan.order) // per_item
    cost = [sum(plan.blocks(t) + overhead for t in plan.order[per_item * s:per_item * (s + 1)] if t is not None)
            for s in range(n_slots)]
    free = [(0.0, p) for p in range(n_programs)]
    items: list[list[int]] = [[] for _ in range(n_programs)]
    for w in range(n_slots * n_bh):
        load, p = heapq.heappop(free)
        items[p].append(w)
        heapq.heappush(free, (load + cost[work_item(w, n_slots, n_bh, chunk)[0]], p))
    rounds = max(len(run) for run in items)
    layout = [-1] * (rounds * n_programs)
    for p, run in enumerate(items):
        for k, w in enumerate(run):
            layout[k * n_programs + p] = w
    return layout


def cached_schedule(make, seqlen_q: int, seqlen_k: int, causal: bool, window_size, block_m: int, block_n: int,
                    per_item: int, n_bh: int, chunk: int, n_programs: int, device) -> torch.Tensor:
    """int32 balanced_schedule of make(...)'s plan (forward_plan or forward_pairs) on `device`, built once per
    shape and launch."""
    key = ("schedule", make, seqlen_q, seqlen_k, bool(causal), tuple(window_size), block_m, block_n, per_item, n_bh,
           chunk, n_programs, str(device))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) > 256:
            _TABLES.clear()
        plan = make(seqlen_q, seqlen_k, causal, window_size, block_m, block_n)
        table = _TABLES[key] = torch.tensor(balanced_schedule(plan, per_item, n_bh, chunk, n_programs),
                                            dtype=torch.int32).to(device, non_blocking=True)
    return table


def heads_per_chunk(n_bh: int, seqlen_k: int, head_dim: int, elem_bytes: int, l2_bytes: int) -> int:
    """How many (batch, head) pairs a persistent grid works on at a time: as many as keep their K and V within
    half the L2 cache, so that the programs reading one head's K/V at the same moment hit L2, not HBM."""
    per_head = 2 * seqlen_k * head_dim * elem_bytes
    return max(1, min(n_bh, (l2_bytes // 2) // max(per_head, 1)))


def work_item(w: int, n_slots: int, n_bh: int, chunk: int) -> tuple[int, int]:
    """(slot, bh) of work item w: heads in chunks of `chunk`; within a chunk the slots (query tiles, or the
    forward's pairs of them, heaviest first) vary slowest and the chunk's heads fastest. The kernels decode w the
    same way (_work_item)."""
    c = w // (chunk * n_slots)
    base = c * chunk
    g = min(chunk, n_bh - base)
    r = w - base * n_slots
    return r // g, base + r % g


def persistent_grid(n_work: int, n_sms: int) -> int:
    """Programs of a persistent launch: one per SM, never more than there are work items (and at least 1)."""
    return max(1, min(n_work, n_sms))


def uncovered_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Gluon forward cannot take this dense case (None: it can). The caller falls back to Triton."""
    d = q.shape[-1]
    if q.dtype not in GLUON_DTYPES:
        return f"dtype {q.dtype} (Gluon kernels take fp16 / bf16)"
    if d not in GLUON_HEAD_DIMS:
        return f"head_dim {d} (Gluon kernels take {GLUON_HEAD_DIMS})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return f"{name} is not contiguous in its last dim"
        if any(s == 0 or (s * t.element_size()) % 16 for s in t.stride()[:-1]):
            return f"{name} strides {tuple(t.stride())} are not positive multiples of 16 bytes (TMA)"
        if t.data_ptr() % 16:
            return f"{name} is not 16-byte aligned (TMA)"
    return None


def fp8_uncovered_reason(fq, out_dtype: torch.dtype) -> str | None:
    """Why the Gluon FP8 forward cannot take these quantized inputs (an attention.fp8.Fp8Qkv) into out_dtype (None:
    it can); the caller runs the Triton FP8 kernel instead. Its consumers own 64 query rows each and a key block
    takes one K and one V scale, so Fp8Config.block_m must be a multiple of 64 and block_n of FP8_BLOCK_N."""
    d = fq.q.shape[-1]
    if d not in GLUON_HEAD_DIMS:
        return f"head_dim {d} (the Gluon FP8 forward takes {GLUON_HEAD_DIMS})"
    if out_dtype not in GLUON_DTYPES:
        return f"output dtype {out_dtype} (the Gluon FP8 forward writes fp16 / bf16)"
    if fq.block_m % 64:
        return f"Fp8Config.block_m={fq.block_m} is not a multiple of the 64 query rows of a consumer warpgroup"
    if fq.block_n % FP8_BLOCK_N:
        return f"Fp8Config.block_n={fq.block_n} is not a multiple of the Gluon FP8 forward's {FP8_BLOCK_N}-key blocks"
    if fq.q.shape[1] == 0 or fq.seqlen_k == 0:
        return f"an empty sequence (Nq={fq.q.shape[1]}, Nk={fq.seqlen_k})"
    for name in ("q", "k", "v_t"):
        t = getattr(fq, name)
        if t.stride(-1) != 1 or any(s == 0 or s % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return f"fp8 {name} strides {tuple(t.stride())} are not 16-byte multiples (TMA)"
    return None
