"""ringflash context parallelism: ring, Ulysses and hybrid (Ulysses x ring) attention over a cp group,
sequence sharding, dp x cp mesh.

    from parallel import init_distributed, init_mesh, ring_attn_func, shard_sequence
    init_distributed(); mesh = init_mesh(cp=2)
    q_local = shard_sequence(q, dim=1, group=mesh.cp_group)          # same for k, v, labels, positions
    out_local = ring_attn_func(q_local, k_local, v_local, group=mesh.cp_group, causal=True)
    plan = ring_plan(pos_local, group=mesh.cp_group)      # packed documents: once per batch, then in every layer
    out_local = ring_attn_func(q_local, k_local, v_local, group=mesh.cp_group, plan=plan)
    mesh = init_mesh(cp=4, ulysses_degree=2)              # hybrid (USP): Ulysses over 2 ranks x ring over 2
    out_local = hybrid_attn_func(q_local, k_local, v_local, mesh.cp_ulysses_group, mesh.cp_ring_group)

Data parallelism (data_parallel.py): wrap_ddp for zero_stage=0, zero_config + init_zero_engine for DeepSpeed
ZeRO 1/2/3; both reduce gradients over every dp x cp rank.
Knows nothing of models; attention/ does the per-block math.
"""

from .comm import RingComm
from .data_parallel import init_zero_engine, wrap_ddp, zero_config
from .hybrid import HybridPlan, hybrid_attn_func, hybrid_plan
from .mesh import ParallelDims, ParallelMesh, default_backend, init_distributed, init_mesh
from .ring import ring_attn_func
from .ring_plan import RingPlan, ring_plan
from .sharding import (chunk_ids, doc_cu_seqlens, doc_ids_from_positions, hybrid_shard_for_rank,
                       hybrid_unshard_from_shards, shard_doc_ids, shard_for_rank, shard_indices, shard_sequence,
                       unshard_from_shards, unshard_sequence)
from .ulysses import UlyssesPlan, ulysses_attn_func, ulysses_plan

__all__ = [
    "ring_attn_func", "ulysses_attn_func", "ring_plan", "ulysses_plan", "RingPlan", "UlyssesPlan",
    "hybrid_attn_func", "hybrid_plan", "HybridPlan", "hybrid_shard_for_rank", "hybrid_unshard_from_shards",
    "shard_sequence", "unshard_sequence",
    "shard_for_rank", "unshard_from_shards", "shard_indices", "chunk_ids",
    "doc_ids_from_positions", "shard_doc_ids", "doc_cu_seqlens",
    "ParallelDims", "ParallelMesh", "init_mesh", "init_distributed", "default_backend", "RingComm",
    "wrap_ddp", "zero_config", "init_zero_engine",
]
