"""Atomic checkpoints: `checkpoints/step_<N>/` appears only once every file of step N is on disk.

    ckpt = CheckpointManager(out_dir / "checkpoints", keep=2, rank=r, world_size=w, barrier=dist.barrier)
    ckpt.save(step, shared={"model": ..., "optim": ...}, per_rank={"data": ..., "rng": ...})
    found = ckpt.load_latest()     # None, or (step, shared, per_rank) of the newest readable checkpoint

Layout of one checkpoint: `state.pt` (what every rank holds the same copy of: model, optimizer, scheduler,
step, config; written by rank 0), `rank_<r>.pt` (per-rank: data-loader position, RNG states), `meta.json`,
and under ZeRO `zero/` (DeepSpeed's weight / optimizer shards, via save(..., write_extra=...); state.pt then
holds no model or optimizer). Everything is written into `.tmp_step_<N>/` and renamed; a crash mid-save
leaves only a temp dir, which load_latest ignores and the next save removes. A checkpoint whose files cannot be
read back (truncated by a full disk or an interrupted copy) is skipped with a warning naming it, and the newest
readable one is used.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")
log = logging.getLogger(__name__)


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that torch.load cannot read (truncated, or not a checkpoint)."""


def _read(path: Path):
    # weights_only=False: the files hold RNG states and loader positions (python objects) that we wrote.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - zip reader RuntimeError, EOFError, UnpicklingError, OSError ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableCheckpoint(f"{path} is unreadable ({reason})") from None


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
        shared = _read(path / "state.pt")
        per_rank = _read(path / f"rank_{self.rank}.pt")
        return meta["step"], shared, per_rank

    def load_latest(self) -> Optional[tuple[int, dict, dict]]:
        found = self.load_newest_readable()
        return None if found is None else found[1:]

    def load_newest_readable(self, agree: Callable[[bool], bool] = bool) -> Optional[tuple[Path, int, dict, dict]]:
        """(path, step, shared, per_rank) of the newest checkpoint every rank can read, or None if there is none.

        An unreadable one is skipped with a warning. agree(ok) -> whether every rank read its files (an
        all-reduce under torchrun), so all ranks fall back to the same checkpoint.
        """
        found = list_checkpoints(self.root)
        for i, (_, path) in enumerate(reversed(found)):
            try:
                loaded, error = self.load(path), None
            except UnreadableCheckpoint as exc:
                loaded, error = None, exc
            if agree(error is None):
                return (path, *loaded)
            older = found[-2 - i][1].name if i + 1 < len(found) else None
            log.warning("skipping checkpoint %s: %s; %s", path, error or "another rank could not read its files",
                        f"trying the older {older}" if older else "no older checkpoint is left")
        if found:
            raise ValueError(f"train.resume=auto: no checkpoint in {self.root} can be read (newest "
                             f"{found[-1][1].name}); start afresh with another run_name or train.out_dir")
        return None


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
    shared = _read(path / "state.pt")
    if "model" not in shared:
        raise ValueError(f"train.init_from: {path} was written under ZeRO (its weights are shards); warm-start from a "
                         f"parallel.zero_stage=0 checkpoint")
    misfit = weights_misfit(model, shared["model"])
    if misfit:
        raise ValueError(f"train.init_from: {path} does not fit this model: {misfit}")
    model.load_state_dict(shared["model"])
    return path


def weights_misfit(model: torch.nn.Module, weights: dict) -> Optional[str]:
    """None if `weights` load into `model`, else what differs: missing and unexpected keys, shapes (checkpoint,
    model); the first four of each."""
    mine = model.state_dict()
    missing, extra = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
    shapes = {k: (tuple(weights[k].shape), tuple(v.shape)) for k, v in mine.items()
              if k in weights and weights[k].shape != v.shape}
    if missing or extra or shapes:
        return (f"missing {missing[:4]}, unexpected {extra[:4]}, shape (checkpoint, model) "
                f"{dict(list(shapes.items())[:4])}")
    return None


# What a resumed run must share with its checkpoint: the weights' shapes, the data stream the loader position points
# into, the optimizer state and the learning-rate schedule. Listed by prefix; RESUME_FREE are exceptions (memory and
# speed knobs). Everything else (train.steps, logging, evaluation, parallel.cp_impl, ...) may change on resume.
RESUME_KEYS = ("model", "data", "train.seed", "train.grad_accum", "train.param_dtype", "parallel.cp",
               "parallel.zero_stage", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.weight_decay",
               "optim.betas", "optim.eps", "optim.compensated")
RESUME_FREE = ("model.name", "model.ckpt", "model.offload_activations", "model.mlp_chunk", "model.compile",
               "data.num_workers", "data.cache_dir", "data.token_cache")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """`key old -> new` for every RESUME_KEYS entry that differs between a checkpoint's config (asdict) and the
    current one. Keys one side lacks (written by another version of the code) are not compared."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
            if _matches(k, RESUME_KEYS) and not _matches(k, RESUME_FREE) and old[k] != new[k]]


def check_resume_config(path, saved: Optional[dict], current: dict) -> Optional[int]:
    """Refuse to resume a checkpoint trained with another shape: ONE ValueError naming every differing key (old ->
    new) and how to start afresh or fine-tune. Returns the optim.decay_steps the schedule must keep when only
    train.steps changed (None: nothing to change): the checkpoint's cosine ends where it did, then stays at
    optim.min_lr, so the learning rate never jumps. optim.decay_steps set to another length is refused."""
    if saved is None:
        return None
    conflicts = resume_conflicts(saved, current)
    decay = saved["optim"].get("decay_steps") or saved["train"]["steps"]
    wanted, steps = current["optim"].get("decay_steps"), current["train"]["steps"]
    if wanted is not None and wanted != decay:
        conflicts.append(f"optim.decay_steps {decay} -> {wanted}")
    if conflicts:
        raise ValueError(f"train.resume: {path} was trained with another config: {'; '.join(conflicts)}. Start a new "
                         f"run with run_name=NEW (or train.out_dir=NEW_DIR), or fine-tune its weights there with "
                         f"run_name=NEW train.init_from={path}")
    if wanted is not None or decay == steps:
        return None
    after = (f"then trains on at optim.min_lr={current['optim']['min_lr']:g}" if steps > decay else
             f"stops at step {steps}, before min_lr")
    log.info("train.steps %d -> %d: the learning-rate schedule continues unchanged (its cosine reaches optim.min_lr at "
             "step %d, as in the checkpoint) and %s; optim.decay_steps in a new run sets another length",
             saved["train"]["steps"], steps, decay, after)
    return decay
