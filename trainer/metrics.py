"""Throughput, FLOPs/MFU, memory, and where metrics go (metrics.jsonl, wandb, the progress bar).

    flops = train_flops(n_params, tokens, attn_pairs, model_cfg)    # model FLOPs of one step, no recompute
    sink = MetricsSink(out_dir, logger_cfg, config_dict, rank, total_steps, start_step)
    sink.log({"step": 10, "loss": 3.2, ...}); sink.close()

FLOPs formula (PaLM appendix B, attention halved for causal):
    6 * P * T                       matmul FLOPs of forward + backward, P = parameters excluding the input
                                    embedding lookup (the lm head counts), T = tokens in the step
  + 12 * L * H * D * pairs          attention scores and values: forward 4*H*D per (query, key) pair, x3
                                    for backward; pairs = sum over documents of len^2 / 2 (causal half)
Activation recomputation is not counted, so MFU is comparable across checkpointing policies.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM
CPU_PEAK_TFLOPS = 0.2  # a rough 2-core AVX2 fp32 figure; set train.peak_tflops for your machine


def causal_pairs(cu_seqlens: Optional[torch.Tensor], batch: int, seq_len: int, window: int = 0) -> float:
    """Attended (query, key) pairs of a causal step, counted as len^2 / 2 per document (host tensor).

    window > 0 (sliding window, each query sees its last `window` keys): len * w - w^2 / 2 with w = min(window,
    len), which is len^2 / 2 again once the window covers the document.
    """
    lengths = torch.tensor([float(seq_len)] * batch, dtype=torch.float64) if cu_seqlens is None else \
        (cu_seqlens[1:] - cu_seqlens[:-1]).double().cpu()
    w = lengths if window <= 0 else lengths.clamp(max=window)
    return float((lengths * w - w * w / 2).sum())


def train_flops(n_params: int, tokens: int, pairs: float, n_layers: int, n_heads: int, head_dim: int) -> float:
    return 6.0 * n_params * tokens + 12.0 * n_layers * n_heads * head_dim * pairs


def default_peak_tflops(device: torch.device) -> float:
    return H100_BF16_PEAK_TFLOPS if device.type == "cuda" else CPU_PEAK_TFLOPS


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: max_memory_allocated. CPU: the process's peak resident set size (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


class Throughput:
    """Accumulates tokens and FLOPs between log steps; rate() is called right after a host sync."""

    def __init__(self, peak_tflops: float, world_size: int):
        self.peak_tflops = peak_tflops
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.flops = 0.0
        self.t0 = time.perf_counter()

    def add(self, tokens: int, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    @contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpointing) is not counted as training time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t

    def rate(self) -> dict:
        """tokens_per_s over all ranks; tflops and mfu per device."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tflops = self.flops / dt / self.world_size / 1e12
        out = {"tokens_per_s": self.tokens / dt, "tflops": tflops,
               "mfu": tflops / self.peak_tflops if self.peak_tflops > 0 else 0.0}
        self.reset()
        return out


class MetricsSink:
    """Rank 0 writes metrics.jsonl, optional wandb and a tqdm bar; other ranks get a sink that does nothing."""

    def __init__(self, out_dir, logger_cfg, config: dict, rank: int, total_steps: int, start_step: int,
                 run_name: str = "run"):
        self.enabled = rank == 0
        self.wandb = None
        self.bar = None
        self.total, self.start, self.t0 = total_steps, start_step, time.perf_counter()  # for the ETA
        if not self.enabled:
            return
        self.path = Path(out_dir) / "metrics.jsonl"
        _truncate_after(self.path, start_step)  # a resumed run rewrites the steps after its checkpoint
        self.file = open(self.path, "a")
        if logger_cfg.name == "wandb":
            import wandb  # only needed when asked for

            self.wandb = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode,
                                    dir=str(out_dir), name=run_name, config=config, tags=list(logger_cfg.tags))
        elif logger_cfg.name != "none":
            raise ValueError(f"logger.name must be 'none' or 'wandb', got {logger_cfg.name!r}")
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (a log file gets the plain lines of log() instead)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True, disable=None,
                        unit="step")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # Non-finite values become null: metrics.jsonl stays strict JSON for any reader.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if record.get("loss") is None:
            return  # an evaluation-only record (write() reported it) or an interval of skipped steps
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 refresh=False)
        else:  # no terminal (CI, a log file): one plain line per logged step instead of the bar
            print(f"step {record['step']}/{self.total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                  f"{record['tokens_per_s']:.0f} tok/s | {record['tflops']:.3f} TFLOPS | "
                  f"ETA {self.eta(record['step'])}", flush=True)

    def eta(self, step: int) -> str:
        """Time left at the mean pace of this process's steps so far (evaluations included), as h:mm:ss."""
        done = step - self.start
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self.t0) / done * max(self.total - step, 0)
        return f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"

    def write(self, message: str) -> None:
        """A line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
