"""Sequence sharding for context parallelism: which tokens each cp rank holds, and back.

zigzag (default): the sequence is cut into 2*W equal chunks and rank r holds chunks r and 2W-1-r, in that
order, so every rank gets the same amount of causal work. contiguous: W chunks, rank r holds chunk r.
Tokens, labels, position ids and document ids go through the same functions, so they stay aligned.

    x_local = shard_sequence(x, dim=1, group=cp_group)                  # needs a process group
    x_local = shard_for_rank(x, dim=1, rank=r, world_size=W)            # pure: no process group
    x_full = unshard_from_shards([shard_for_rank(x, 1, r, W) for r in range(W)], dim=1)
    x_local = hybrid_shard_for_rank(x, dim=1, cp_rank=c, ulysses_degree=u, cp_size=W)   # USP: see hybrid.py

Packed documents: position 0 starts a document. Document ids must come from the *full* position ids
(`doc_ids_from_positions`) before sharding: a shard alone cannot tell whether its first token continues a
document from another rank.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the full sequence is cut into (2W for zigzag, W for contiguous)."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def chunk_ids(rank: int, world_size: int, layout: str = "zigzag") -> list[int]:
    """Global chunk indices held by `rank`, in local order (always ascending)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    check_layout(layout)
    return [rank, 2 * world_size - 1 - rank] if layout == "zigzag" else [rank]


def check_shardable(seq_len: int, world_size: int, layout: str = "zigzag", name: str = "seq_len") -> None:
    """ValueError unless seq_len splits into equal chunks for this layout."""
    parts = num_chunks(world_size, layout)
    if seq_len % parts != 0:
        how = f"2*cp={parts}" if layout == "zigzag" else f"cp={parts}"
        raise ValueError(f"{name} {seq_len} is not divisible by {how} (layout={layout!r}, world_size={world_size})")


def shard_for_rank(x: torch.Tensor, dim: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """The part of `x` (full sequence along `dim`) that `rank` holds. Differentiable (pure slicing)."""
    if world_size == 1:
        check_layout(layout)
        return x
    check_shardable(x.shape[dim], world_size, layout, name=f"x.shape[{dim}]")
    chunks = x.chunk(num_chunks(world_size, layout), dim=dim)
    picked = [chunks[c] for c in chunk_ids(rank, world_size, layout)]
    return picked[0] if len(picked) == 1 else torch.cat(picked, dim=dim)


def unshard_from_shards(shards: Sequence[torch.Tensor], dim: int, layout: str = "zigzag") -> torch.Tensor:
    """Inverse of shard_for_rank: `shards[r]` is rank r's part; returns the full sequence in true order."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("unshard_from_shards: shards is empty")
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"unshard_from_shards: shards differ in shape: {[tuple(s.shape) for s in shards]}")
    if world_size == 1:
        check_layout(layout)
        return shards[0]
    per_rank = num_chunks(world_size, layout) // world_size
    if shards[0].shape[dim] % per_rank != 0:
        raise ValueError(f"unshard_from_shards: shard length {shards[0].shape[dim]} along dim {dim} is not "
                         f"divisible by the {per_rank} chunks each rank holds (layout={layout!r})")
    chunks: list = [None] * num_chunks(world_size, layout)
    for r, shard in enumerate(shards):
        for c, piece in zip(chunk_ids(r, world_size, layout), shard.chunk(per_rank, dim=dim)):
            chunks[c] = piece
    return torch.cat(chunks, dim=dim)


def shard_indices(seq_len: int, rank: int, world_size: int, layout: str = "zigzag",
                  device=None) -> torch.Tensor:
    """Global token indices (int64, (seq_len // W,)) held by `rank`: the shard of arange(seq_len)."""
    return shard_for_rank(torch.arange(seq_len, device=device), 0, rank, world_size, layout)


# -- hybrid (Ulysses inside, ring outside) ----------------------------------------------------------------


def check_hybrid_degrees(cp_size: int, ulysses_degree: int) -> int:
    """ValueError unless ulysses_degree divides cp_size; returns the ring degree cp_size // ulysses_degree."""
    if not isinstance(ulysses_degree, int) or not isinstance(cp_size, int) or ulysses_degree < 1 or cp_size < 1 \
            or cp_size % ulysses_degree != 0:
        raise ValueError(f"ulysses_degree ({ulysses_degree!r}) must be an int >= 1 dividing cp_size ({cp_size!r})")
    return cp_size // ulysses_degree


def check_hybrid_shardable(seq_len: int, cp_size: int, ulysses_degree: int, name: str = "seq_len") -> None:
    """ValueError unless seq_len splits into 2r zigzag chunks whose ring shards split into u equal pieces."""
    ring = check_hybrid_degrees(cp_size, ulysses_degree)
    if seq_len % (2 * ring) != 0 or (seq_len // ring) % ulysses_degree != 0:
        raise ValueError(f"{name} {seq_len} must be divisible by 2*ring={2 * ring} and {name}/ring={seq_len}/{ring} "
                         f"by ulysses_degree={ulysses_degree} (cp_size={cp_size})")


def hybrid_shard_for_rank(x: torch.Tensor, dim: int, cp_rank: int, ulysses_degree: int, cp_size: int) -> torch.Tensor:
    """The hybrid shard of cp rank c = o*u + i: zigzag shard o of r = cp_size/u, then its contiguous piece i of u.

    Consecutive cp ranks (one Ulysses group) hold consecutive pieces of one ring rank's zigzag shard, so an
    all-to-all over them (layout "contiguous") rebuilds that shard for a subset of the heads.
    """
    check_hybrid_shardable(x.shape[dim], cp_size, ulysses_degree, name=f"x.shape[{dim}]")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, cp_size={cp_size}), got {cp_rank}")
    ring_rank, inner_rank = divmod(cp_rank, ulysses_degree)
    ring_shard = shard_for_rank(x, dim, ring_rank, cp_size // ulysses_degree, "zigzag")
    return shard_for_rank(ring_shard, dim, inner_rank, ulysses_degree, "contiguous")


def hybrid_unshard_from_shards(shards: Sequence[torch.Tensor], dim: int, ulysses_degree: int) -> torch.Tensor:
    """Inverse of hybrid_shard_for_rank: shards[c] is cp rank c's part; returns the full sequence."""
    ring = check_hybrid_degrees(len(shards), ulysses_degree)
    ring_shards = [unshard_from_shards(shards[o * ulysses_degree:(o + 1) * ulysses_degree], dim, "contiguous")
                   for o in range(ring)]
    return unshard_from_shards(ring_shards, dim, "zigzag")


# -- process-group versions ---------------------------------------------------------------------------------


def group_rank_and_size(group=None) -> tuple[int, int]:
    """(rank, world_size) in `group`; (0, 1) when torch.distributed is not initialised and group is None."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of `x` (the full sequence along `dim`, identical on every rank of `group`)."""
    rank, world_size = group_rank_and_size(group)
    return shard_for_rank(x, dim, rank, world_size, layout)


def all_gather_shards(x_local: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's shard, indexed by group rank (no autograd)."""
    _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return [x_local]
    x_local = x_local.contiguous()
    shards = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(shards, x_local, group=group)
    return shards


def unshard_sequence(x_local: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """Full sequence from every rank's shard (all-gather + reorder). For data and eval: no autograd history."""
    check_layout(layout)
    return unshard_from_shards(all_gather_shards(x_local, group), dim, layout)


# -- packed documents ---------------------------------------------------------------------------------------


def doc_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """(..., N) position ids of the *full* sequence -> int64 document ids, 0, 1, ... per row.

    Position 0 starts a new document (as FA2's varlen path in transformers reads packed batches); a row
    that does not start with 0 begins with document 0 anyway.
    """
    if position_ids.dim() == 0 or position_ids.shape[-1] == 0:
        raise ValueError(f"position_ids must be (..., N) with N >= 1, got {tuple(position_ids.shape)}")
    starts = (position_ids == 0).long()
    starts[..., 0] = 1
    return starts.cumsum(-1) - 1


def shard_doc_ids(position_ids: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Document ids of the tokens `rank` holds, consistent across ranks. position_ids: (B, N) full sequence."""
    return shard_for_rank(doc_ids_from_positions(position_ids), -1, rank, world_size, layout)


def doc_cu_seqlens(q_doc: torch.Tensor, k_doc: torch.Tensor):
    """Varlen metadata for a block of queries vs keys from packed documents.

    q_doc (B, Nq), k_doc (B, Nk): document ids, non-decreasing along each row (true-order tokens of one or
    more ascending chunks). Rows of q/k flattened to (B*Nq,) / (B*Nk,) split into one segment per document
    present in either; a segment pairs the queries and keys of the same (batch row, document).
    Returns (cu_q, cu_k, max_q, max_k, shared) with int32 cu_seqlens on q_doc's device, and `shared` =
    whether any segment has both queries and keys (if not, the whole block is masked).
    """
    if q_doc.dim() != 2 or k_doc.dim() != 2 or q_doc.shape[0] != k_doc.shape[0]:
        raise ValueError(f"doc_cu_seqlens: q_doc {tuple(q_doc.shape)} and k_doc {tuple(k_doc.shape)} must be "
                         f"(B, Nq) and (B, Nk)")
    device = q_doc.device
    q_doc, k_doc = q_doc.cpu().long(), k_doc.cpu().long()
    # Give every batch row its own id range so one flattened varlen call never mixes rows.
    span = int(max(q_doc.max(), k_doc.max())) + 1
    offset = torch.arange(q_doc.shape[0])[:, None] * span
    qd, kd = (q_doc + offset).flatten(), (k_doc + offset).flatten()
    assert bool((qd[1:] >= qd[:-1]).all()) and bool((kd[1:] >= kd[:-1]).all()), "doc ids must be sorted"
    docs = torch.unique(torch.cat([qd, kd]))  # sorted
    cu_q = torch.cat([torch.searchsorted(qd, docs), torch.tensor([qd.numel()])])
    cu_k = torch.cat([torch.searchsorted(kd, docs), torch.tensor([kd.numel()])])
    len_q, len_k = cu_q.diff(), cu_k.diff()
    shared = bool(((len_q > 0) & (len_k > 0)).any())
    return (cu_q.to(device, torch.int32), cu_k.to(device, torch.int32), int(len_q.max()), int(len_k.max()),
            shared)
