"""Atomic checkpoints: `checkpoints/step_<N>/` appears only once every file of step N is on disk.

    ckpt = CheckpointManager(out_dir / "checkpoints", keep=2, rank=r, world_size=w, barrier=dist.barrier)
    ckpt.save(step, shared={"model": ..., "optim": ...}, per_rank={"data": ..., "rng": ...})
    found = ckpt.load_latest()     # None, or (step, shared, per_rank) of the newest complete checkpoint

Layout of one checkpoint: `state.pt` (what every rank holds the same copy of: model, optimizer, scheduler,
step, config; written by rank 0), `rank_<r>.pt` (per-rank: data-loader position, RNG states), `meta.json`,
and under ZeRO `zero/` (DeepSpeed's weight / optimizer shards, via save(..., write_extra=...); state.pt then
holds no model or optimizer). Everything is written into `.tmp_step_<N>/` and renamed; a crash mid-save
leaves only a temp dir, which load_latest ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _noop() -> None:
    pass


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes must be on disk before the rename makes them visible


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def rng_state() -> dict:
    """RNG states of python, numpy, torch CPU and (if present) every CUDA device of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


class CheckpointManager:
    def __init__(self, root, keep: int = 2, rank: int = 0, world_size: int = 1,
                 barrier: Optional[Callable[[], None]] = None):
        if keep < 1:
            raise ValueError(f"keep (train.keep_ckpts) must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier or _noop

    def save(self, step: int, shared: dict, per_rank: dict,
             write_extra: Optional[Callable[[Path], None]] = None) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint directory.

        write_extra(tmp_dir), if given, runs on every rank while the temp dir exists (e.g. a ZeRO engine
        writing its shards), so those files appear atomically with the rest.
        """
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
            tmp.mkdir()
        self.barrier()
        _save_file(per_rank, tmp / f"rank_{self.rank}.pt")
        if self.rank == 0:
            _save_file(shared, tmp / "state.pt")
        if write_extra is not None:
            write_extra(tmp)
        self.barrier()
        if self.rank == 0:
            if write_extra is not None:
                _fsync_tree(tmp)  # files written by others' code: make them durable before the rename
            # meta.json last: list_checkpoints only trusts directories that have it.
            with open(tmp / "meta.json", "w") as f:
                json.dump({"step": step, "world_size": self.world_size}, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)  # re-saving a step (e.g. the end of a resumed, finished run)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.root)[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        found = list_checkpoints(self.root)
        return found[-1][1] if found else None

    def load(self, path) -> tuple[int, dict, dict]:
        """(step, shared, per_rank) from one checkpoint directory written by the same world size."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise ValueError(f"train.resume: {path} is not a complete checkpoint (no meta.json)")
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != self.world_size:
            raise ValueError(f"train.resume: checkpoint {path} was written by {meta['world_size']} ranks, "
                             f"this run has {self.world_size}; resume with the same world size")
        # weights_only=False: the files hold RNG states and loader positions (python objects) that we wrote.
        shared = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        per_rank = torch.load(path / f"rank_{self.rank}.pt", map_location="cpu", weights_only=False)
        return meta["step"], shared, per_rank

    def load_latest(self) -> Optional[tuple[int, dict, dict]]:
        path = self.latest()
        return None if path is None else self.load(path)


def resolve_checkpoint(path, key: str) -> Path:
    """A checkpoint dir (step_<N> with meta.json) as given, or the newest complete one of a run dir (or of its
    checkpoints/ dir). ValueError naming the config `key` otherwise."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
    if not found:
        raise ValueError(f"{key}={str(path)!r}: not a complete checkpoint (no meta.json), nor a run dir with "
                         f"checkpoints/step_<N>")
    return found[-1][1]


def load_weights(model: torch.nn.Module, path) -> Path:
    """Weights of a complete checkpoint written with zero_stage 0 (state.pt holds the whole model), into `model`;
    `path` may also be a run dir (its newest checkpoint). Returns the checkpoint dir read.

    For warm starts (train.init_from): a context extension or a second curriculum phase takes the weights and
    none of the optimizer, schedule or data position, so any world size, data mix or length may follow.
    """
    path = resolve_checkpoint(path, "train.init_from")
    shared = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if "model" not in shared:
        raise ValueError(f"train.init_from: {path} was written under ZeRO (its weights are shards); warm-start from a "
                         f"parallel.zero_stage=0 checkpoint")
    mine = model.state_dict()
    theirs = shared["model"]
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    shapes = {k: (tuple(theirs[k].shape), tuple(v.shape)) for k, v in mine.items()
              if k in theirs and theirs[k].shape != v.shape}
    if missing or extra or shapes:
        raise ValueError(f"train.init_from: {path} does not fit this model: missing {missing[:4]}, unexpected "
                         f"{extra[:4]}, shape (checkpoint, model) {dict(list(shapes.items())[:4])}")
    model.load_state_dict(theirs)
    return path
