"""The training loop: build everything from a typed Config, then train, evaluate, checkpoint, log.

    env = init_distributed(cfg.train.device)
    Trainer(cfg, env).run()

One step: for each micro-batch, forward to a *sum* of token losses, divide by the valid-token count of
the whole dp x cp group (all-reduced on the device), backward; clip; AdamW. A step whose loss or grad
norm is non-finite is skipped inside the fused optimizer (found_inf), so nothing reads the device back
except at log / eval / checkpoint steps, where the skip counters are also checked.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from attention import set_deterministic
from parallel.data_parallel import load_zero_checkpoint, save_zero_checkpoint, zero3_init, zero_grad_norm
from trainer.model.activations import host_memory_available, offloaded_bytes
from trainer.checkpoint import (CheckpointManager, check_resume_config, load_weights, rng_state,
                                set_rng_state)
from trainer.config import Config, check_config
from trainer.data import build_loader, build_tokenizer
from trainer.data.tokenizer import check_model_vocab
from trainer.model.loss import chunked_cross_entropy, global_valid_count
from trainer.metrics import (MetricsSink, Throughput, causal_pairs, default_peak_tflops, peak_memory_gib,
                             reset_peak_memory, train_flops)
from trainer.model import GPT, check_context_parallel
from trainer.model.hf import build_pretrained, config_from_hf
from trainer.optim import CompensatedAdamW
from trainer.parallelize import DistEnv, parallelize, run_zero_config, shard_batch, validate_parallel
from trainer.stop import GracefulStop

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Raised when train.max_bad_steps non-finite steps came in a row."""


class LMLoss(nn.Module):
    """model + chunked lm-head CE in one forward, so DDP / ZeRO wrap a single module. Returns the loss sum."""

    def __init__(self, model: GPT, chunk: int, compile: bool = False):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.compile = compile  # the softmax gradient of each loss chunk through torch.compile (CUDA)

    def forward(self, tokens, labels, position_ids=None, cu_seqlens=None, max_seqlen=None):
        hidden = self.model(tokens, position_ids, cu_seqlens, max_seqlen)  # (B, N, dim)
        return chunked_cross_entropy(hidden.flatten(0, 1), self.model.output_weight, labels.flatten(),
                                     self.chunk, compile=self.compile)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine down to min_ratio at `total` steps (flat after)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    # Matrices (and embeddings) decay; norm gains do not.
    params = [p for p in model.parameters() if p.requires_grad]
    dims = [len(getattr(p, "ds_shape", p.shape)) for p in params]  # a ZeRO-3 partitioned parameter is empty
    groups = [{"params": [p for p, d in zip(params, dims) if d >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p, d in zip(params, dims) if d < 2], "weight_decay": 0.0}]
    if cfg.compensated and params and params[0].dtype == torch.bfloat16:  # train.param_dtype=bf16
        return CompensatedAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    fused = cfg.fused and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def batch_to_device(batch: dict, device: torch.device) -> dict:
    out = {k: batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "position_ids")}
    cu = batch.get("cu_seqlens")
    out["cu_seqlens"] = None if cu is None else cu.to(device, non_blocking=True)
    out["max_seqlen"] = batch.get("max_seqlen")
    return out


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        validate_parallel(cfg.parallel, env)
        self.cfg, self.env, self.device = cfg, env, env.device
        self.out_dir = Path(cfg.train.out_dir)
        self.autocast_dtype = _autocast_dtype(cfg.train.dtype, self.device)
        torch.manual_seed(cfg.train.seed)  # same init on every rank

        if cfg.model.path:  # model=hf: sizes, vocab and RoPE from the checkpoint, its tokenizer by default
            cfg.model = config_from_hf(cfg.model.path, base=cfg.model)
            check_config(cfg)
            if cfg.data.tokenizer == "hf" and not cfg.data.tokenizer_path:
                cfg.data.tokenizer_path = cfg.model.path
        check_context_parallel(cfg.model, cfg.parallel.cp)
        # the context the weights will have been trained for (an export writes it as max_position_embeddings)
        cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, cfg.data.seq_len)
        self.tokenizer = build_tokenizer(cfg.data)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.tokenizer.vocab_size
        check_model_vocab(self.tokenizer, cfg.model.vocab_size)
        set_deterministic(cfg.attention.deterministic)  # process-wide: every attention backward follows it
        bf16 = self.autocast_dtype == torch.bfloat16
        zero_init = self._zero3_init(bf16)
        if cfg.model.path:  # built on meta (ZeRO-3: partitioned as built) and filled tensor by tensor
            self.model = build_pretrained(cfg.model, cfg.attention.backend, device=self.device, zero_init=zero_init)
        else:
            self.model = GPT(cfg.model, attn_backend=cfg.attention.backend).to(self.device)
        if zero_init is not None:
            log.info("model built partitioned (ZeRO-3): each of %d ranks holds 1/%d of every parameter",
                     env.world_size, env.world_size)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", cfg.train.keep_ckpts, env.rank,
                                      env.world_size, env.barrier)
        # before the optimizer and ZeRO take copies of the weights; a run that resumes has its own
        if cfg.train.init_from and self._resume_path() is None:
            source = load_weights(self.model, cfg.train.init_from)
            log.info("weights from %s (optimizer, schedule and data start afresh)", source)
        if cfg.train.param_dtype == "bf16" and zero_init is None:  # after init_from: fp32 weights rounded once
            self.model.to(torch.bfloat16)
        for block in self.model.layers:  # check_config allows fp8 only where the dense path runs
            block.attention.inner_attention.fp8 = cfg.attention.fp8_forward
        self.loss_module = LMLoss(self.model, cfg.train.loss_chunk, cfg.model.compile)
        self._check_host_memory()
        # Counted before parallelize: ZeRO-3 leaves each rank only a shard of every parameter.
        self.n_params = self.model.num_params(exclude_embedding=True)
        self.n_params_total = self.model.num_params()
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        decay = cfg.optim.decay_steps or cfg.train.steps
        lr_factor = lr_lambda(cfg.optim.warmup_steps, decay, cfg.optim.min_lr / cfg.optim.lr)
        par = parallelize(self.loss_module, cfg, env, self.optimizer, lr_factor, bf16=bf16)
        self.module, self.grad_scale, self.engine = par.module, par.grad_scale, par.engine
        if self.engine is None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        else:  # ZeRO: DeepSpeed wraps the optimizer and steps the scheduler it built from lr_factor
            self.optimizer, self.scheduler = self.engine.optimizer, self.engine.lr_scheduler
        self.train_loader = build_loader(cfg.data, self.tokenizer, "train", env.dp_rank, env.dp_size,
                                         cfg.train.seed)
        self.val_loader = None
        if cfg.train.eval_batches > 0:
            self.val_loader = build_loader(cfg.data, self.tokenizer, "validation", env.dp_rank, env.dp_size,
                                           cfg.train.seed)
        self.step = 0
        self._ppl_docs = None  # eval.ppl_every: the documents, tokenised at the first evaluation
        self.stopped_by = 0  # the signal (SIGINT / SIGTERM) that ended run() early, after a checkpoint; 0: none
        # Non-finite bookkeeping stays on the device: [skipped total, current streak, longest streak].
        self.bad = torch.zeros(3, device=self.device)
        peak = cfg.train.peak_tflops or default_peak_tflops(self.device)
        self.throughput = Throughput(peak, env.world_size)

    # -- setup helpers ------------------------------------------------------------------------------------

    def _zero3_init(self, bf16: bool):
        """ZeRO-3 with model.path: the context the GPT is built in, partitioned from the start, so no rank
        holds the whole model (init_from still loads a whole one first). None otherwise."""
        cfg = self.cfg
        # the partitioned model has the engine's dtype (bf16 in its bf16 mode) from the start; other combinations
        # (init_from, bf16 weights without DeepSpeed's bf16 mode) build the whole model first
        if (cfg.parallel.zero_stage != 3 or not cfg.model.path or cfg.train.init_from
                or (cfg.train.param_dtype == "bf16" and not bf16)):
            return None
        return zero3_init(run_zero_config(cfg, self.env, bf16), self.device)

    @property
    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def _compute_dtype(self) -> torch.dtype:
        """What the matmuls run in: the autocast dtype, else the weights'."""
        return self.autocast_dtype or self._param_dtype

    def _check_host_memory(self, available: Optional[int] = None) -> None:
        """Offloaded activations live in pinned host memory, which cannot be paged out: a run that needs more
        than the host has would fail inside its first step, after minutes of forward at 1M+ tokens."""
        m, d = self.model.config, self.cfg.data
        residual = self._param_dtype if m.fp32_residual else self._compute_dtype
        input_bytes, attn_bytes = (torch.finfo(t).bits // 8 for t in (residual, self._compute_dtype))
        tokens = d.batch_size * d.seq_len // self.cfg.parallel.cp
        need = offloaded_bytes(m.ckpt, m.offload_activations, m.n_layers, tokens, m.dim, m.n_heads, m.head_dim,
                               input_bytes, attn_bytes)
        available = host_memory_available() if available is None else available
        if not need or available is None:
            return
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks of this host share its memory
        gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        what = (f"model.offload_activations={m.offload_activations} with model.ckpt={m.ckpt} keeps {gib(need)} per "
                f"rank in pinned host memory ({local_ranks} rank(s) on this host, {gib(available)} available)")
        if need * local_ranks > available:
            raise ValueError(f"{what}: lower data.seq_len ({d.seq_len}) or data.batch_size ({d.batch_size}), "
                             f"offload less, or raise parallel.cp ({self.cfg.parallel.cp})")
        if need * local_ranks > 0.8 * available:
            log.warning("%s: little host memory is left for the rest", what)

    def _resume_path(self) -> Optional[Path]:
        resume = self.cfg.train.resume
        if resume == "none":
            if self.ckpt.latest() is not None:  # they would mix with, and be pruned against, the new run's
                raise ValueError(f"train.resume=none but {self.ckpt.root} already holds checkpoints (newest "
                                 f"{self.ckpt.latest().name}); use train.resume=auto, another run_name / "
                                 f"train.out_dir, or delete them")
            return None
        return self.ckpt.latest() if resume == "auto" else Path(resume)

    def maybe_resume(self) -> None:
        resume = self.cfg.train.resume
        if resume == "none":
            self._resume_path()  # refuses a dir that already holds checkpoints
            return
        if resume == "auto":  # the newest checkpoint every rank can read (a truncated one is skipped)
            found = self.ckpt.load_newest_readable(agree=self._on_all_ranks)
            if found is None:
                return
            path, step, shared, per_rank = found
        else:
            path = Path(resume)
            step, shared, per_rank = self.ckpt.load(path)
        if (self.engine is None) != ("model" in shared):  # DDP checkpoints hold the model; ZeRO ones, shards
            raise ValueError(f"train.resume: {path} was written with parallel.zero_stage "
                             f"{'0' if 'model' in shared else '> 0'}; resume with the same parallel.zero_stage")
        self._check_resume_config(path, shared.get("config"))
        try:
            if self.engine is None:
                self.model.load_state_dict(shared["model"])
                self.optimizer.load_state_dict(shared["optimizer"])
            else:  # weights and optimizer shards live in DeepSpeed's files
                load_zero_checkpoint(self.engine, path)
            self.scheduler.load_state_dict(shared["scheduler"])
            self.train_loader.load_state_dict(per_rank["data"])
        except (RuntimeError, KeyError, ValueError) as exc:  # a checkpoint of another code version
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"train.resume: {path} does not fit this run ({first}); start a new run with "
                             f"run_name=NEW, or take its weights with run_name=NEW train.init_from={path}") from None
        self.bad[0] = shared["skipped_steps"]
        set_rng_state(per_rank["rng"])
        self.step = step
        log.info("resumed from %s (step %d)", path, step)

    def _on_all_ranks(self, ok: bool) -> bool:
        if self.env.world_size == 1:
            return ok
        flag = torch.tensor([float(ok)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _check_resume_config(self, path: Path, saved: Optional[dict]) -> None:
        decay = check_resume_config(path, saved, asdict(self.cfg))  # ValueError naming keys of another shape
        if decay is not None:  # train.steps changed: the checkpoint's schedule goes on, its cosine unchanged
            o = self.cfg.optim
            factor = lr_lambda(o.warmup_steps, decay, o.min_lr / o.lr)
            self.scheduler.lr_lambdas = [factor] * len(self.scheduler.lr_lambdas)

    def save_checkpoint(self) -> Path:
        shared = {"scheduler": self.scheduler.state_dict(), "step": self.step,
                  "skipped_steps": float(self.bad[0]), "config": asdict(self.cfg)}
        write_extra = None
        if self.engine is None:
            shared.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        else:  # every rank writes its ZeRO shards into the same temp dir, renamed with the rest
            write_extra = partial(save_zero_checkpoint, self.engine)
        per_rank = {"data": self.train_loader.state_dict(), "rng": rng_state()}
        path = self.ckpt.save(self.step, shared, per_rank, write_extra=write_extra)
        log.info("saved checkpoint %s", path)
        return path

    def _prepare_batch(self, batch: dict) -> dict:
        # The one place inputs are placed. Under context parallelism each rank keeps its zigzag shard of tokens,
        # labels and positions (the trainer shards inputs, not the model), and num_valid becomes the shard's
        # own count, so summing it over dp x cp counts every target once.
        if self.env.cp_size > 1:
            batch = shard_batch(batch, self.env.cp_group, ulysses_degree=self.env.ulysses_degree)
        b = batch_to_device(batch, self.device)
        b["num_valid"] = batch["num_valid"]
        if self.cfg.data.cross_doc_attention:
            # One document per row (padding only at row ends): dense causal attention is exact for every
            # target and takes the fast path (and fp8, which has no varlen kernel).
            b["cu_seqlens"] = b["max_seqlen"] = None
        return b

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- one optimizer step -------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (global mean loss, grad norm) as device tensors; never reads them back."""
        prepared = [self._prepare_batch(batch) for batch in micro_batches]
        # clamp: a step without any target (all padding) contributes 0 instead of 0/0.
        denom = global_valid_count(sum(b["num_valid"] for b in prepared), self.device,
                                   self.env.group).clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        for i, b in enumerate(prepared):
            # Gradients are all-reduced once, on the last micro-batch (DeepSpeed reduces on its own schedule).
            sync = i == len(prepared) - 1 or self.engine is not None or not hasattr(self.module, "no_sync")
            with nullcontext() if sync else self.module.no_sync(), self._autocast():
                part = self.module(b["tokens"], b["labels"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"])
            # DDP / ZeRO average gradients over ranks; grad_scale (= the world size) turns that mean back into
            # the sum, so the result is d(global sum / global count), independent of the number of ranks.
            scaled = part * (self.grad_scale / denom)
            if self.engine is None:
                scaled.backward()
            else:  # our scaling already covers accumulation; step() updates on the last micro-batch only
                self.engine.backward(scaled, scale_wrt_gas=False)
                self.engine.step()
            loss_sum += part.detach()
        if self.env.world_size > 1:
            dist.all_reduce(loss_sum, group=self.env.group)
        loss = loss_sum / denom
        if self.engine is None:
            clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
            found_inf = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).float()
            self._optimizer_step(found_inf)
        else:  # DeepSpeed clipped and updated, or skipped the update for a non-finite gradient norm
            grad_norm = zero_grad_norm(self.engine, self.device)
            found_inf = (~torch.isfinite(grad_norm)).float()
        skipped, streak, longest = self.bad
        streak = (streak + 1) * found_inf
        self.bad = torch.stack([skipped + found_inf, streak, torch.maximum(longest, streak)])
        return loss, grad_norm

    def _optimizer_step(self, found_inf: torch.Tensor) -> None:
        if self.optimizer.defaults.get("fused") or isinstance(self.optimizer, CompensatedAdamW):
            self.optimizer.found_inf = found_inf  # the update and the step count are skipped on the device
            self.optimizer.step()
        elif not found_inf.item():  # unfused AdamW has no found_inf input: this one reads back
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def check_health(self) -> None:
        """At a sync point: raise if train.max_bad_steps non-finite steps came in a row since the last check."""
        _, streak, longest = (int(x) for x in self.bad.tolist())
        limit = self.cfg.train.max_bad_steps
        if limit > 0 and longest >= limit:
            newest = self.ckpt.latest()  # name a checkpoint only where one was written
            resume = (f", or resume from {newest} (train.resume={newest}) with a lower optim.lr" if newest else
                      "; no checkpoint was written yet")
            raise TrainingStopped(
                f"stopping at step {self.step}: {longest} steps in a row had a non-finite loss or gradient norm "
                f"(train.max_bad_steps={limit}); they were skipped, the weights are those of the last good "
                f"step. Lower optim.lr or check the data{resume}.")
        self.bad[2] = streak  # the longest streak is counted afresh from here

    # -- evaluation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over train.eval_batches batches per dp rank (the same batches every time)."""
        self.model.eval()
        totals = torch.zeros(2, device=self.device)  # [loss sum, valid tokens]
        n = self.cfg.train.eval_batches  # a bar on rank 0's terminal when the evaluation takes more than 2 s
        batches = tqdm(self.val_loader.iter_epoch(max_batches=n), desc="validation", total=n, delay=2, leave=False,
                       disable=None if self.env.rank == 0 else True)
        for batch in batches:
            b = self._prepare_batch(batch)
            with self._autocast():
                totals[0] += self.loss_module(b["tokens"], b["labels"], b["position_ids"], b["cu_seqlens"],
                                              b["max_seqlen"])
            totals[1] += b["num_valid"]
        if self.env.world_size > 1:
            dist.all_reduce(totals, group=self.env.group)
        self.model.train()
        return (totals[0] / totals[1].clamp(min=1)).item()

    def _evaluates_here(self, key: str, command: str) -> bool:
        """The periodic evaluations run on rank 0 alone: a ring / Ulysses core or ZeRO-3 shards would need every
        rank, so those runs skip them and say which command evaluates a checkpoint instead."""
        if self.env.rank != 0:
            return False
        if self.env.cp_size > 1 or self.cfg.parallel.zero_stage == 3:
            log.warning("%s: skipped with parallel.cp > 1 or zero_stage=3; run python -m %s checkpoint=%s instead",
                        key, command, self.out_dir)
            return False
        return True

    def passkey_eval(self, sink: MetricsSink) -> dict:
        """Passkey retrieval (trainer/eval_passkey.py), where _evaluates_here allows it."""
        if not self._evaluates_here("eval.passkey_every", "trainer.eval_passkey"):
            return {}
        from trainer.eval_passkey import evaluate_during_training

        metrics = evaluate_during_training(self.model, self.tokenizer, self.cfg.eval, self.device,
                                           self.autocast_dtype, self.out_dir, self.step)
        sink.write(f"step {self.step}: passkey exact {metrics['passkey_exact']:.3f}, "
                   f"digit {metrics['passkey_digit']:.3f} (chance 1e-5 / 0.1)")
        return metrics

    def ppl_eval(self, sink: MetricsSink) -> dict:
        """Perplexity by position (trainer/eval/ppl.py) on ppl_docs validation documents, where _evaluates_here
        allows it; the documents are tokenised once and kept."""
        if not self._evaluates_here("eval.ppl_every", "trainer.eval_ppl"):
            return {}
        from trainer.eval.ppl import evaluate_during_training, load_documents

        e = self.cfg.eval
        if self._ppl_docs is None:
            self._ppl_docs = load_documents(self.cfg.data, self.tokenizer, e.ppl_seq_len or self.cfg.data.seq_len,
                                            e.ppl_docs)
        metrics = evaluate_during_training(self.model, self._ppl_docs, e.ppl_buckets, self.device, self.autocast_dtype,
                                           self.out_dir, self.step, self.cfg.train.loss_chunk)
        sink.write(f"step {self.step}: ppl {metrics['ppl']:.3f} over {len(self._ppl_docs)} documents (by position: "
                   f"{self.out_dir / 'ppl' / f'step_{self.step}.json'})")
        return metrics

    # -- the loop -----------------------------------------------------------------------------------------

    def _next_micro_batches(self) -> list[dict]:
        return [next(self.train_loader) for _ in range(self.cfg.train.grad_accum)]

    def _flops_and_tokens(self, micro_batches: list[dict]) -> tuple[float, int]:
        # Every dp rank has its own batch; rank-local attention pairs stand in for the others'.
        mc = self.model.config
        tokens = sum(b["tokens"].numel() for b in micro_batches)
        pairs = sum(causal_pairs(b.get("cu_seqlens"), *b["tokens"].shape, window=mc.attn_window)
                    for b in micro_batches)
        flops = train_flops(self.n_params, tokens, pairs, mc.n_layers, mc.n_heads, mc.head_dim)
        return flops * self.env.dp_size, tokens * self.env.dp_size

    def run(self) -> dict:
        cfg = self.cfg.train
        self.maybe_resume()
        if self.env.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(asdict(self.cfg)))
        if self.step >= cfg.steps:
            log.info("step %d >= train.steps=%d in %s: nothing to train (a new train.out_dir or run_name starts "
                     "afresh)", self.step, cfg.steps, self.out_dir)
            return {"step": self.step}
        log.info("run dir %s (%s step %d); model %s: %.2fM parameters (%s), device %s, compute %s, world %d",
                 self.out_dir, "resumed at" if self.step else "from", self.step, self.model.config.name,
                 self.n_params_total / 1e6, self.cfg.train.param_dtype, self.device, self._compute_dtype,
                 self.env.world_size)
        sink = MetricsSink(self.out_dir, self.cfg.logger, asdict(self.cfg), self.env.rank, cfg.steps, self.step,
                           self.cfg.run_name)
        try:
            with logging_redirect_tqdm(), GracefulStop(self.env.rank, self.env.world_size) as stop:
                record = self._train(sink, stop)  # logging_redirect_tqdm: log lines print above the bar
        finally:
            sink.close()
        # the final checkpoint is complete (save() ends in a barrier); a run stopped by a signal is not final
        if cfg.export_hf and self.env.rank == 0 and not self.stopped_by:
            from trainer.export import export_checkpoint
            export_checkpoint(self.ckpt.latest(), self.out_dir / "hf")
        return record

    def _train(self, sink: MetricsSink, stop: GracefulStop) -> dict:
        cfg = self.cfg.train
        reset_peak_memory(self.device)
        self.throughput.reset()
        loss_acc = torch.zeros(2, device=self.device)  # [sum of finite losses, their count] since last log
        record = {"step": self.step}
        while self.step < cfg.steps:
            micro_batches = self._next_micro_batches()
            flops, tokens = self._flops_and_tokens(micro_batches)
            lr = self.scheduler.get_last_lr()[0]
            loss, grad_norm = self.train_step(micro_batches)
            finite = torch.isfinite(loss)
            loss_acc += torch.stack([torch.where(finite, loss, 0.0), finite.float()])
            self.step += 1
            self.throughput.add(tokens, flops)
            sink.step()
            last = self.step == cfg.steps
            record = {"step": self.step}
            if self.step % cfg.log_every == 0 or last:
                record.update(self._log_record(loss_acc, grad_norm, lr))
                loss_acc.zero_()
            if self.val_loader is not None and (_every(self.step, cfg.eval_every) or last):
                with self.throughput.paused():
                    record["val_loss"] = self.evaluate()
                sink.write(f"step {self.step}: val_loss {record['val_loss']:.4f}")
            if _every(self.step, self.cfg.eval.passkey_every) or (last and self.cfg.eval.passkey_every > 0):
                with self.throughput.paused():
                    record.update(self.passkey_eval(sink))
            if _every(self.step, self.cfg.eval.ppl_every) or (last and self.cfg.eval.ppl_every > 0):
                with self.throughput.paused():
                    record.update(self.ppl_eval(sink))
            if len(record) > 1:
                sink.log(record)
                self.check_health()  # after the log, so the record of the failing step is written
            saved = _every(self.step, cfg.ckpt_every) or last
            if saved:
                with self.throughput.paused():
                    self.check_health()
                    self.save_checkpoint()
            if not last and stop.requested():
                self._stop_with_checkpoint(sink, stop.signum, saved)
                break
        return record

    def _stop_with_checkpoint(self, sink: MetricsSink, signum: int, saved: bool) -> None:
        self.check_health()
        path = self.ckpt.root / f"step_{self.step}" if saved else self.save_checkpoint()
        self.stopped_by = signum
        sink.write(f"{signal.Signals(signum).name}: stopped at step {self.step} of {self.cfg.train.steps}, "
                   f"checkpoint saved in {path}; the same command resumes the run")

    def _log_record(self, loss_acc: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> dict:
        loss_sum, n = loss_acc.tolist()  # the host sync of this interval
        skipped = int(self.bad[0])
        return {"loss": loss_sum / n if n else float("nan"), "lr": lr, "grad_norm": float(grad_norm),
                **self.throughput.rate(), "peak_mem_gib": peak_memory_gib(self.device), "skipped_steps": skipped}


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _autocast_dtype(dtype: str, device: torch.device) -> Optional[torch.dtype]:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return None
    raise ValueError(f"train.dtype must be auto, bf16 or fp32, got {dtype!r}")
