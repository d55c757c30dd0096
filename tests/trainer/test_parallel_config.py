"""parallel.cp / parallel.dp against the world size: resolve_parallel is the one check, init_distributed runs it
before joining a process group, validate_parallel ties an existing DistEnv to the config. No process group here."""

import pytest

from trainer.config import ParallelConfig
from trainer.parallelize import DistEnv, init_distributed, resolve_parallel, validate_parallel


@pytest.mark.parametrize("kw,world,want", [
    ({}, 1, (1, 1, 1)),  # (dp, cp, ulysses)
    ({}, 4, (4, 1, 1)),  # dp=-1: every rank data parallel
    ({"cp": 2}, 4, (2, 2, 1)),
    ({"cp": 2, "dp": 2}, 4, (2, 2, 1)),
    ({"cp": 4, "cp_impl": "hybrid", "ulysses_degree": 2}, 8, (2, 4, 2)),
])
def test_resolve_parallel_sizes(kw, world, want):
    dims = resolve_parallel(ParallelConfig(**kw), world)
    assert (dims.dp, dims.cp, dims.ulysses, dims.world_size) == (*want, world)


@pytest.mark.parametrize("kw,world,match", [
    ({"cp": 2}, 1, r"parallel.dp=-1 parallel.cp=2 needs 2 ranks.*world size 1.*torchrun --nproc_per_node=2"),
    ({"dp": 3}, 1, r"needs 3 ranks.*world size 1"),
    ({"cp": 3}, 4, r"parallel.cp \(3\) must divide the world size \(4\)"),
    ({"cp": 2, "dp": 3}, 4, r"parallel.dp=3 x parallel.cp=2 needs 6 ranks, but the world size is 4"),
    ({"cp": 0}, 2, r"parallel.cp must be an int >= 1, got 0"),
    ({"dp": 0}, 2, r"parallel.dp must be -1 .* or an int >= 1, got 0"),
    ({"cp_impl": "spiral"}, 1, r"parallel.cp_impl must be one of .*'spiral'"),
    ({"zero_stage": 4}, 2, r"parallel.zero_stage must be 0, 1, 2 or 3, got 4"),
    ({"zero_stage": 2}, 1, r"parallel.zero_stage=2 .* world size is 1"),
])
def test_resolve_parallel_errors_name_the_keys(kw, world, match):
    with pytest.raises(ValueError, match=match):
        resolve_parallel(ParallelConfig(**kw), world)


def test_init_distributed_checks_before_joining(monkeypatch):
    """A bad cp stops every rank with the same error before any process group exists (never reset to 1)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        init_distributed("cpu", ParallelConfig(cp=2))
    with pytest.raises(ValueError, match="parallel must be a ParallelConfig"):
        init_distributed("cpu", 2)
    env = init_distributed("cpu", ParallelConfig())
    assert (env.world_size, env.dp_size, env.cp_size, env.cp_group) == (1, 1, 1, None)


def test_validate_parallel_ties_the_env_to_the_config():
    validate_parallel(ParallelConfig(), DistEnv())
    two = DistEnv(world_size=2, dp_size=2)  # groups built without parallel.cp
    validate_parallel(ParallelConfig(dp=2), two)
    with pytest.raises(ValueError, match=r"asks for dp=1 cp=2 .* built for dp=2 cp=1 .*init_distributed"):
        validate_parallel(ParallelConfig(cp=2), two)
    with pytest.raises(ValueError, match="needs 2 ranks"):
        validate_parallel(ParallelConfig(cp=2), DistEnv())
