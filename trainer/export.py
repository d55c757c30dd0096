"""Export a trainer checkpoint as a Hugging Face model directory (config.json, sharded safetensors + index,
tokenizer files and generation_config.json of the source checkpoint).

    python -m trainer.export outputs/extend_hf_1gpu --out llama-1b-128k            # newest checkpoint of a run
    python -m trainer.export outputs/run/checkpoints/step_400 --out hf_dir --dtype fp32 --max-shard-size 2GB
    export_checkpoint("outputs/run", "hf_dir")                                      # the same, from Python

The model is rebuilt from the run's own config (every checkpoint's state.pt holds it). Weights come from
state.pt (one process, DDP, context parallelism: every rank holds the whole model, rank 0 wrote it) or, for
DeepSpeed ZeRO-1/2/3 runs, from the fp32 master shards under `zero/`, gathered on the CPU without a process group
(deepspeed.utils.zero_to_fp32), one tensor at a time. The exported config keeps the RoPE settings the run trained
with; max_position_embeddings becomes the run's data.seq_len when that is longer than the source's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from trainer.checkpoint import resolve_checkpoint
from trainer.model import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_SHARD = 5 * 2**30
_ZERO_TAG = "zero"  # parallel/data_parallel.save_zero_checkpoint's tag


def find_checkpoint(path) -> Path:
    """A checkpoints/step_<N> dir as given, or the newest complete checkpoint of a run dir."""
    if not Path(path).is_dir():
        raise ValueError(f"trainer.export: {str(path)!r} is not a directory (give a run dir or a "
                         f"checkpoints/step_<N> dir)")
    return resolve_checkpoint(path, "RUN_OR_STEP_DIR")


def _load_state(ckpt: Path) -> dict:
    # mmap: a DDP checkpoint's optimizer states (twice the model in fp32) are never read, only the weights.
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", mmap=True, weights_only=False)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"trainer.export: cannot read {ckpt / 'state.pt'}: {exc}") from exc


def model_config(run_cfg: dict) -> ModelConfig:
    """The run's ModelConfig from its saved asdict(cfg), with max_position_embeddings raised to the trained
    context (data.seq_len) when that is longer."""
    try:
        cfg = ModelConfig(**run_cfg["model"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"trainer.export: the run's saved model config does not fit this ModelConfig: {exc}") from exc
    seq_len = int(run_cfg.get("data", {}).get("seq_len") or 0)
    # Downstream tools size their RoPE caches and length checks by max_position_embeddings: an extended
    # model exported with the source's value would be used at the short length.
    longest = max(int(cfg.max_position_embeddings or 0), seq_len)
    rs = cfg.rope_scaling
    if rs.type == "yarn" and rs.original_max_position_embeddings:
        # transformers reads max_position_embeddings / original as YaRN's factor (and warns when they differ)
        longest = max(longest, int(rs.factor * rs.original_max_position_embeddings))
    cfg.max_position_embeddings = longest
    return cfg


def _zero_tensors(ckpt: Path) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """(count, iterator of (name, fp32 tensor)) of a ZeRO-1/2/3 checkpoint, each tensor merged from every rank's
    shards when the iterator reaches it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU is needed to merge files
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=_ZERO_TAG, lazy_mode=True)
    # The engine wraps LMLoss (trainer/loop.py), whose GPT is its `model` attribute.
    return len(lazy), ((name.removeprefix("model."), t.contiguous()) for name, t in lazy.items())


def checkpoint_tensors(ckpt: Path, state: dict) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """(count, iterator of (our parameter name, tensor)) of one checkpoint, whichever way it was written."""
    if "model" in state:
        return len(state["model"]), iter(state["model"].items())
    if not (ckpt / _ZERO_TAG).is_dir():
        raise ValueError(f"trainer.export: {ckpt} has neither weights in state.pt nor ZeRO shards under "
                         f"{ckpt / _ZERO_TAG}")
    return _zero_tensors(ckpt)


def export_checkpoint(path, out_dir, dtype: torch.dtype = torch.bfloat16, max_shard_size: int = DEFAULT_SHARD,
                      progress: bool = False) -> Path:
    """Write the Hugging Face directory `out_dir` from a run dir or step dir; returns out_dir."""
    from trainer.model.hf import save_hf

    ckpt = find_checkpoint(path)
    state = _load_state(ckpt)
    if "config" not in state:
        raise ValueError(f"trainer.export: {ckpt / 'state.pt'} holds no run config (key 'config'); it was not "
                         f"written by trainer.train")
    run_cfg = state["config"]
    cfg = model_config(run_cfg)
    count, tensors = checkpoint_tensors(ckpt, state)
    weights = {}
    bar = tqdm(tensors, total=count, desc=f"export {ckpt.name}", unit="tensor", disable=not progress)
    for name, tensor in bar:
        # Cast one tensor at a time: peak memory is the exported model plus one source tensor.
        weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    source = cfg.path if cfg.path and Path(cfg.path).is_dir() else None
    if cfg.path and source is None:
        log.warning("model.path %s of the run is gone: the export has no tokenizer or generation_config files",
                    cfg.path)
    out = save_hf(weights, cfg, out_dir, source_dir=source, dtype=dtype, max_shard_size=max_shard_size)
    log.info("exported %s (step %d) to %s", ckpt, state.get("step", -1), out)
    return Path(out)


def parse_size(text: str) -> int:
    """--max-shard-size: bytes, or a size with a unit as transformers writes it (5GB = 5e9, 5GiB = 5 * 2**30)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = int(text) if text.strip().isdigit() else convert_file_size_to_int(text.strip())
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(f"--max-shard-size: expected bytes or a size like 5GB / 500MB / 2GiB, got {text!r}")
    return size


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="RUN_OR_STEP_DIR",
                   help="a run dir (its newest complete checkpoint) or a checkpoints/step_<N> dir")
    p.add_argument("--out", required=True, help="output directory for the Hugging Face model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights' dtype (default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_checkpoint(args.checkpoint, args.out, DTYPES[args.dtype], parse_size(args.max_shard_size),
                                progress=True)
    except ValueError as exc:
        sys.exit(str(exc))  # one line, exit status 1
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
