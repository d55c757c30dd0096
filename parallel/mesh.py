"""dp x cp process groups from the world size.

    init_distributed()                        # from torchrun env vars; NCCL on GPU, gloo on CPU
    mesh = init_mesh(cp=2)                    # dp inferred = world_size // cp
    out = ring_attn_func(q, k, v, group=mesh.cp_group)

Ranks are laid out as arange(world_size).view(dp, cp): a cp group is `cp` consecutive ranks, which torchrun
places on the same node (NVLink) - the ring's per-step K/V traffic stays off the inter-node network, and only
the once-per-step gradient reduction crosses it.

Hybrid (USP) context parallelism, init_mesh(cp=4, ulysses_degree=2): each cp group of cp = u x r ranks is
split further. cp rank c = o*u + i: the Ulysses groups are u consecutive ranks (same o; the all-to-all, the
heavier traffic, stays on the nearest GPUs), the ring groups are the r ranks of stride u (same i):

    mesh.cp_ulysses_group, mesh.cp_ring_group      # -> hybrid_attn_func(q, k, v, ulysses_group, ring_group)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the dp x cp grid; validates itself (dp * cp must equal world_size)."""
    dp: int
    cp: int
    world_size: int
    ulysses: int = 1  # hybrid CP: Ulysses degree u inside each cp group (1: plain ring / Ulysses over cp)

    def __post_init__(self):
        for name in ("dp", "cp", "world_size", "ulysses"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims: {name} must be an int >= 1, got {value!r}")
        if self.dp * self.cp != self.world_size:
            raise ValueError(f"ParallelDims: dp({self.dp}) * cp({self.cp}) != world_size({self.world_size})")
        if self.cp % self.ulysses != 0:
            raise ValueError(f"ParallelDims: ulysses_degree({self.ulysses}) must divide cp({self.cp})")

    @classmethod
    def from_world(cls, world_size: int, cp: int = 1, dp: Optional[int] = None,
                   ulysses: int = 1) -> "ParallelDims":
        """dp=None (or -1) infers dp = world_size // cp."""
        if not isinstance(cp, int) or cp < 1:
            raise ValueError(f"ParallelDims: cp must be an int >= 1, got {cp!r}")
        if dp is None or dp == -1:
            if world_size % cp != 0:
                raise ValueError(f"ParallelDims: world_size({world_size}) is not divisible by cp({cp})")
            dp = world_size // cp
        return cls(dp=dp, cp=cp, world_size=world_size, ulysses=ulysses)

    @property
    def ring(self) -> int:
        """Ring degree of hybrid CP: cp // ulysses."""
        return self.cp // self.ulysses

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, cp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return divmod(rank, self.cp)

    def cp_group_ranks(self, rank: int) -> list[int]:
        """Global ranks sharing `rank`'s sequence (consecutive)."""
        dp_rank, _ = self.coords(rank)
        return list(range(dp_rank * self.cp, (dp_rank + 1) * self.cp))

    def ulysses_group_ranks(self, rank: int) -> list[int]:
        """Hybrid CP: the u consecutive global ranks holding pieces of `rank`'s ring shard."""
        start = rank - rank % self.ulysses
        self.coords(rank)  # range check
        return list(range(start, start + self.ulysses))

    def ring_group_ranks(self, rank: int) -> list[int]:
        """Hybrid CP: the cp // u global ranks of `rank`'s cp group with its Ulysses index (stride u)."""
        dp_rank, cp_rank = self.coords(rank)
        return list(range(dp_rank * self.cp + cp_rank % self.ulysses, (dp_rank + 1) * self.cp, self.ulysses))

    def dp_group_ranks(self, rank: int) -> list[int]:
        """Global ranks holding the same sequence shard of different batches (stride cp)."""
        _, cp_rank = self.coords(rank)
        return list(range(cp_rank, self.world_size, self.cp))


@dataclass
class ParallelMesh:
    """This rank's view of the grid: its groups and coordinates.

    Groups are real process groups even of size 1 (never None while distributed is initialised): passing
    None to ring_attn_func would mean the *default* group, i.e. a ring over dp ranks too.
    """
    dims: ParallelDims
    rank: int
    cp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    device_mesh: Optional[object] = None  # torch DeviceMesh ("dp", "cp") when it could be built
    # Hybrid CP (dims.ulysses > 1) only, else None: this rank's Ulysses (inner) and ring (outer) groups.
    cp_ulysses_group: Optional[dist.ProcessGroup] = None
    cp_ring_group: Optional[dist.ProcessGroup] = None

    @property
    def cp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def cp_size(self) -> int:
        return self.dims.cp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def cp_enabled(self) -> bool:
        return self.dims.cp_enabled

    @property
    def ulysses_degree(self) -> int:
        return self.dims.ulysses

    @property
    def ulysses_rank(self) -> int:
        """Hybrid CP: rank inside the Ulysses group (cp_rank % u)."""
        return self.cp_rank % self.dims.ulysses

    @property
    def ring_rank(self) -> int:
        """Hybrid CP: rank inside the ring group (cp_rank // u)."""
        return self.cp_rank // self.dims.ulysses


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's env vars if needed; returns (rank, world_size).

    Without RANK/WORLD_SIZE in the environment (plain `python ...`) this is a single-process run: (0, 1).
    On CUDA each rank is pinned to LOCAL_RANK's GPU before NCCL starts.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _device_mesh(dims: ParallelDims):
    """torch DeviceMesh over arange(world).view(dp, cp); None if this torch cannot build one here."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
    except ImportError:
        return None
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dims.dp, dims.cp), mesh_dim_names=("dp", "cp"))


def _manual_groups(dims: ParallelDims, rank: int):
    """Same grid with plain new_group: every rank must create every group, in the same order."""
    cp_group = dp_group = None
    for d in range(dims.dp):
        ranks = list(range(d * dims.cp, (d + 1) * dims.cp))
        group = dist.new_group(ranks)
        if rank in ranks:
            cp_group = group
    for c in range(dims.cp):
        ranks = list(range(c, dims.world_size, dims.cp))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    return cp_group, dp_group


def _hybrid_groups(dims: ParallelDims, rank: int):
    """This rank's (Ulysses, ring) groups; every rank creates every group, in the same order."""
    ulysses_sets = [dims.ulysses_group_ranks(first) for first in range(0, dims.world_size, dims.ulysses)]
    ring_sets = [dims.ring_group_ranks(d * dims.cp + i) for d in range(dims.dp) for i in range(dims.ulysses)]
    mine = []
    for sets in (ulysses_sets, ring_sets):
        for ranks in sets:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine.append(group)
    assert len(mine) == 2
    return mine[0], mine[1]


def init_mesh(cp: int = 1, dp: Optional[int] = None, use_device_mesh: bool = True,
              ulysses_degree: int = 1) -> ParallelMesh:
    """Build the dp x cp groups over the default process group (single process: no groups).

    ulysses_degree u > 1 (must divide cp) also builds the hybrid CP groups (cp_ulysses_group, cp_ring_group).
    """
    if not dist.is_initialized():
        dims = ParallelDims.from_world(1, cp, dp, ulysses_degree)
        return ParallelMesh(dims, 0, None, None)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims.from_world(world_size, cp, dp, ulysses_degree)
    device_mesh = _device_mesh(dims) if use_device_mesh else None
    if device_mesh is not None:
        cp_group, dp_group = device_mesh.get_group("cp"), device_mesh.get_group("dp")
    else:
        cp_group, dp_group = _manual_groups(dims, rank)
    assert dist.get_process_group_ranks(cp_group) == dims.cp_group_ranks(rank)
    ulysses_group = ring_group = None
    if dims.ulysses > 1:
        ulysses_group, ring_group = _hybrid_groups(dims, rank)
    return ParallelMesh(dims, rank, cp_group, dp_group, device_mesh, ulysses_group, ring_group)
