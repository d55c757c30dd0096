"""Sequence sharding (zigzag exactly as DESIGN.md, contiguous), round trips, document ids, ValueErrors,
and the dp x cp grid arithmetic. One spawned world checks the process-group versions and the mesh."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_world
from parallel import (ParallelDims, chunk_ids, doc_cu_seqlens, doc_ids_from_positions, init_mesh, shard_doc_ids,
                      shard_for_rank, shard_indices, shard_sequence, unshard_from_shards, unshard_sequence)


def test_zigzag_layout_exactly_as_designed():
    # W=2: 4 chunks of 2 tokens; rank 0 holds chunks 0 and 3, rank 1 holds chunks 1 and 2.
    assert shard_indices(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert shard_indices(8, 1, 2).tolist() == [2, 3, 4, 5]
    # W=3, 12 tokens: 6 chunks of 2; rank r holds r and 2W-1-r = 5-r.
    assert [shard_indices(12, r, 3).tolist() for r in range(3)] == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    assert [chunk_ids(r, 4) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_contiguous_layout():
    assert [shard_indices(6, r, 3, "contiguous").tolist() for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert chunk_ids(2, 3, "contiguous") == [2]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_round_trip_and_every_token_once(layout, world_size):
    n = 2 * world_size * 3
    x = torch.randn(2, n, 5)
    shards = [shard_for_rank(x, 1, r, world_size, layout) for r in range(world_size)]
    assert all(s.shape == (2, n // world_size, 5) for s in shards)
    assert torch.equal(unshard_from_shards(shards, 1, layout), x)
    held = torch.cat([shard_indices(n, r, world_size, layout) for r in range(world_size)])
    assert sorted(held.tolist()) == list(range(n))
    # Same layout on any dim, e.g. lse (B, H, N) along dim 2 / -1.
    y = torch.randn(2, 3, n)
    assert torch.equal(shard_for_rank(y, -1, 1 % world_size, world_size, layout),
                       shard_for_rank(y.transpose(1, 2), 1, 1 % world_size, world_size, layout).transpose(1, 2))


def test_zigzag_balances_causal_work():
    n, world_size = 64, 4
    work = [int((shard_indices(n, r, world_size) + 1).sum()) for r in range(world_size)]  # keys seen per rank
    assert len(set(work)) == 1


def test_sharding_errors():
    x = torch.randn(1, 10)
    with pytest.raises(ValueError, match=r"10 is not divisible by 2\*cp=4"):
        shard_for_rank(x, 1, 0, 2)
    with pytest.raises(ValueError, match="not divisible by cp=3"):
        shard_for_rank(x, 1, 0, 3, "contiguous")
    with pytest.raises(ValueError, match="layout"):
        shard_for_rank(x, 1, 0, 2, "striped")
    with pytest.raises(ValueError, match="rank must be in"):
        shard_for_rank(torch.randn(1, 8), 1, 2, 2)
    with pytest.raises(ValueError, match="differ in shape"):
        unshard_from_shards([torch.randn(4), torch.randn(6)], 0)
    with pytest.raises(ValueError, match="not divisible by the 2 chunks"):
        unshard_from_shards([torch.randn(3), torch.randn(3)], 0)
    with pytest.raises(ValueError, match="position_ids"):
        doc_ids_from_positions(torch.zeros(2, 0, dtype=torch.long))


def test_doc_ids_from_positions():
    pos = torch.tensor([[3, 4, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1]])
    assert doc_ids_from_positions(pos).tolist() == [[0, 0, 1, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 1, 1]]
    # Per-shard ids come from the full sequence: rank 1 of W=2 holds tokens 2..5, all of document 0 in row 1
    # (a shard alone would see positions [2, 3, 4, 5] and could not number its documents consistently).
    assert shard_doc_ids(pos, 1, 2).tolist() == [[1, 1, 1, 2], [0, 0, 0, 0]]


def test_doc_cu_seqlens_pairs_documents():
    q_doc = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 2]])
    k_doc = torch.tensor([[0, 1, 1, 2], [1, 1, 1, 1]])
    cu_q, cu_k, max_q, max_k, shared = doc_cu_seqlens(q_doc, k_doc)
    # Segments: (row0, d0) q2 k1 | (row0, d1) q2 k2 | (row0, d2) q0 k1 | (row1, d0) q1 k0 | (row1, d1) q0 k4
    #           | (row1, d2) q3 k0
    assert cu_q.tolist() == [0, 2, 4, 4, 5, 5, 8] and cu_k.tolist() == [0, 1, 3, 4, 4, 8, 8]
    assert cu_q.dtype == torch.int32 and (max_q, max_k, shared) == (3, 4, True)
    assert doc_cu_seqlens(torch.tensor([[0, 0]]), torch.tensor([[1, 1]]))[4] is False


def test_parallel_dims():
    dims = ParallelDims.from_world(8, cp=2)
    assert (dims.dp, dims.cp, dims.cp_enabled, dims.dp_enabled) == (4, 2, True, True)
    assert dims.coords(5) == (2, 1)
    assert dims.cp_group_ranks(5) == [4, 5]  # consecutive: same node / NVLink
    assert dims.dp_group_ranks(5) == [1, 3, 5, 7]
    assert not ParallelDims(dp=4, cp=1, world_size=4).cp_enabled
    with pytest.raises(ValueError, match=r"dp\(2\) \* cp\(3\) != world_size\(8\)"):
        ParallelDims(dp=2, cp=3, world_size=8)
    with pytest.raises(ValueError, match=r"world_size\(6\) is not divisible by cp\(4\)"):
        ParallelDims.from_world(6, cp=4)
    with pytest.raises(ValueError, match="cp must be an int >= 1"):
        ParallelDims.from_world(4, cp=0)


def test_single_process_mesh_and_sharding():
    mesh = init_mesh(cp=1)
    assert (mesh.cp_size, mesh.dp_size, mesh.cp_rank, mesh.cp_group) == (1, 1, 0, None)
    with pytest.raises(ValueError, match=r"world_size\(1\) is not divisible by cp\(2\)"):
        init_mesh(cp=2)  # no process group: a world of one
    x = torch.randn(2, 6)
    assert torch.equal(shard_sequence(x, 1), x) and torch.equal(unshard_sequence(x, 1), x)


def _group_worker(rank, world_size):
    n = 2 * world_size * 2
    full = torch.arange(3 * n).view(3, n)
    for layout in ("zigzag", "contiguous"):
        local = shard_sequence(full, 1, layout=layout)
        assert torch.equal(local, shard_for_rank(full, 1, rank, world_size, layout))
        assert torch.equal(unshard_sequence(local, 1, layout=layout), full)
    for use_device_mesh in (True, False):
        mesh = init_mesh(cp=2, use_device_mesh=use_device_mesh)
        assert (mesh.dp_rank, mesh.cp_rank) == divmod(rank, 2)
        assert dist.get_process_group_ranks(mesh.cp_group) == mesh.dims.cp_group_ranks(rank)
        assert dist.get_process_group_ranks(mesh.dp_group) == mesh.dims.dp_group_ranks(rank)
        # Sharding within the cp subgroup: each dp replica holds its own sequence.
        seq = full + 1000 * mesh.dp_rank
        local = shard_sequence(seq, 1, group=mesh.cp_group)
        assert torch.equal(local, shard_for_rank(seq, 1, mesh.cp_rank, 2, "zigzag"))
        assert torch.equal(unshard_sequence(local, 1, group=mesh.cp_group), seq)


def test_process_group_sharding_and_mesh(free_port):
    run_world(_group_worker, 4, free_port)
