"""Typed trainer config: dataclasses registered in Hydra's ConfigStore, so a typo in a key fails loudly.

    cfg: Config = OmegaConf.to_object(dict_config)      # done once, in trainer/train.py

configs/train.yaml starts its defaults list with `base_config` (this schema); the groups under configs/
(model, data, optim, parallel, logger, experiment) fill it. Components receive their own typed sub-config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from trainer.data import DataConfig
from trainer.model import ModelConfig


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    seed: int = 0  # init, data order
    out_dir: str = "outputs/${run_name}"  # same on every rank; Hydra's run dir too
    resume: str = "auto"  # auto: newest complete checkpoint in out_dir (if any) | none | path to step_<N>
    init_from: str = ""  # another run's step_<N> dir or run dir (newest): weights only, fresh optimizer/schedule/data
    ckpt_every: int = 100  # 0: only at the end
    keep_ckpts: int = 2  # newest K complete checkpoints are kept
    log_every: int = 10  # the only steps that read values back from the device
    eval_every: int = 100  # validation loss every N steps (0: only at the end)
    eval_batches: int = 8  # validation batches per evaluation (per dp rank)
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    grad_accum: int = 1  # micro-batches per optimizer step
    loss_chunk: int = 4096  # tokens per lm-head/CE chunk (memory: loss_chunk * vocab * 4 bytes)
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    # fp32: fp32 weights, gradients and AdamW states (16 bytes per parameter). bf16: all three in bf16 plus a bf16
    # compensation (optim.compensated), 10 bytes; 8 without it, as Hugging Face's bf16 training keeps them, where
    # an update below a weight's bf16 resolution is lost.
    param_dtype: str = "fp32"
    device: str = "auto"  # auto | cpu | cuda
    peak_tflops: Optional[float] = None  # MFU denominator per device; None: 989 (H100 bf16) on CUDA, 0.2 on CPU
    export_hf: bool = False  # at the end: the final checkpoint as a Hugging Face dir in <out_dir>/hf (trainer.export)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4  # end of the cosine
    warmup_steps: int = 30  # linear warmup from lr / warmup_steps
    decay_steps: Optional[int] = None  # where the cosine reaches min_lr; None: train.steps
    weight_decay: float = 0.1  # on matrices only (not norms)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool = True  # fused AdamW kernel (CUDA and CPU)
    # train.param_dtype=bf16: AdamW with a bf16 Kahan compensation per weight (trainer/optim.py, 2 more bytes per
    # parameter), so updates below a weight's bf16 resolution add up instead of being rounded away
    compensated: bool = True


@dataclass
class ParallelConfig:
    dp: int = -1  # data-parallel size; -1: world_size // cp
    cp: int = 1  # context-parallel size (sequence split across ranks)
    cp_impl: str = "ring"  # ring | ulysses | hybrid (Ulysses over ulysses_degree ranks x ring over the rest)
    ulysses_degree: int = 1  # cp_impl=hybrid: Ulysses group size u, 1 < u < cp, dividing cp (ring degree cp / u)
    zero_stage: int = 0  # 0: DDP; 1/2/3: DeepSpeed ZeRO


@dataclass
class AttentionConfig:
    backend: str = "auto"  # auto | gluon | triton | sdpa | reference
    fp8_forward: bool = False  # FP8 attention forward (attention/fp8.py); needs data.cross_doc_attention, cp=1
    deterministic: bool = True  # false: dq's additions in any order (faster; dq varies in its last bits)


@dataclass
class EvalConfig:
    passkey_every: int = 0  # passkey retrieval eval (trainer/eval_passkey.py) every N steps and at the end; 0: off
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 512])  # context lengths (tokens)
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depths
    passkey_samples: int = 8  # prompts per (length, depth)
    passkey_batch_size: int = 8  # prompts per forward
    ppl_every: int = 0  # perplexity by position (trainer/eval/ppl.py) every N steps and at the end; 0: off
    ppl_docs: int = 4  # validation documents of >= ppl_seq_len + 1 tokens each (one document per sequence)
    ppl_seq_len: int = 0  # tokens per document; 0: data.seq_len
    ppl_buckets: list[int] = field(default_factory=list)  # position boundaries; []: powers of 4 from seq_len/64


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "ringflash"
    mode: str = "offline"  # offline | online | disabled (wandb modes)
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    # names the run directory outputs/<run_name>: the preset's name plus a hash of the run-defining overrides (all but
    # RUN_NAME_IGNORED), so the same command resumes its run and another command starts its own
    run_name: str = "${auto_run_name:default}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def check_config(cfg: Config) -> None:
    """Value checks the schema cannot express; ValueError naming the key and the value seen."""
    t = cfg.train
    for key in ("steps", "log_every", "grad_accum", "keep_ckpts", "loss_chunk"):
        if getattr(t, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    for key in ("ckpt_every", "eval_every", "eval_batches", "max_bad_steps"):
        if getattr(t, key) < 0:
            raise ValueError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    if t.resume not in ("auto", "none") and not t.resume.strip():
        raise ValueError("train.resume must be auto, none or a checkpoint directory")
    o = cfg.optim
    if o.name != "adamw":
        raise ValueError(f"optim.name must be adamw, got {o.name!r}")
    if not (o.lr > 0 and 0 <= o.min_lr <= o.lr):
        raise ValueError(f"need optim.lr > 0 and 0 <= optim.min_lr <= optim.lr, got lr={o.lr}, min_lr={o.min_lr}")
    if len(o.betas) != 2 or o.warmup_steps < 0:
        raise ValueError(f"optim.betas must be two floats and optim.warmup_steps >= 0, got betas={o.betas}, "
                         f"warmup_steps={o.warmup_steps}")
    if t.param_dtype not in ("fp32", "bf16"):
        raise ValueError(f"train.param_dtype must be fp32 or bf16, got {t.param_dtype!r}")
    if t.param_dtype == "bf16" and t.dtype == "fp32":
        raise ValueError("train.param_dtype=bf16 computes in bf16: it cannot go with train.dtype=fp32")
    if t.param_dtype == "bf16" and cfg.parallel.zero_stage > 0:
        raise ValueError(f"train.param_dtype=bf16 is for one GPU and DDP: parallel.zero_stage "
                         f"{cfg.parallel.zero_stage} already keeps bf16 weights, with fp32 masters in DeepSpeed")
    if cfg.logger.name not in ("none", "wandb"):
        raise ValueError(f"logger.name must be none or wandb, got {cfg.logger.name!r}")
    _check_eval(cfg.eval)
    _check_parallel_combinations(cfg)


def _check_eval(e: EvalConfig) -> None:
    if e.passkey_every < 0 or e.passkey_samples < 1 or e.passkey_batch_size < 1:
        raise ValueError(f"need eval.passkey_every >= 0, eval.passkey_samples >= 1 and eval.passkey_batch_size >= 1, "
                         f"got {e.passkey_every}, {e.passkey_samples}, {e.passkey_batch_size}")
    if e.passkey_every and not (e.passkey_lengths and all(n > 0 for n in e.passkey_lengths)):
        raise ValueError(f"eval.passkey_lengths must be positive token counts, got {list(e.passkey_lengths)}")
    if e.ppl_every < 0 or e.ppl_docs < 1 or e.ppl_seq_len < 0:
        raise ValueError(f"need eval.ppl_every >= 0, eval.ppl_docs >= 1 and eval.ppl_seq_len >= 0, got "
                         f"{e.ppl_every}, {e.ppl_docs}, {e.ppl_seq_len}")
    b = list(e.ppl_buckets)
    if any(x < 0 for x in b) or any(y <= x for x, y in zip(b, b[1:])):
        raise ValueError(f"eval.ppl_buckets must be increasing non-negative positions, got {b}")
    if not all(0.0 <= d <= 1.0 for d in e.passkey_depths):
        raise ValueError(f"eval.passkey_depths must lie in [0, 1], got {list(e.passkey_depths)}")


def _check_parallel_combinations(cfg: Config) -> None:
    """Context parallelism and fp8 vs the model and data shapes (the world size is checked at startup)."""
    p = cfg.parallel
    if p.cp > 1 and cfg.data.seq_len % (2 * p.cp) != 0:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} is not divisible by 2*parallel.cp={2 * p.cp} (zigzag "
                         f"sharding cuts each sequence into 2*cp equal chunks)")
    if p.cp > 1 and p.cp_impl == "ulysses" and cfg.model.n_heads % p.cp != 0:
        raise ValueError(f"parallel.cp_impl=ulysses splits heads across ranks: model.n_heads ({cfg.model.n_heads}) "
                         f"must be divisible by parallel.cp ({p.cp}); use parallel.cp_impl=ring")
    _check_hybrid(cfg)
    _check_window(cfg)
    if cfg.attention.fp8_forward:
        if not cfg.data.cross_doc_attention:
            raise ValueError("attention.fp8_forward=true needs data.cross_doc_attention=true: packed documents run "
                             "the varlen kernel, which has no fp8 path")
        if p.cp > 1:
            raise ValueError(f"attention.fp8_forward=true needs parallel.cp=1 (got {p.cp}): ring / Ulysses "
                             f"attention have no fp8 path")


def _check_window(cfg: Config) -> None:
    """model.attn_window runs on the local kernels that take a window: Triton (or the reference on CPU); every CP
    core passes it on."""
    w = cfg.model.attn_window
    if w <= 0:
        return
    if cfg.attention.backend == "sdpa":
        raise ValueError(f"model.attn_window={w} needs attention.backend=auto or triton: torch's fused kernels have "
                         f"no sliding window, so sdpa would fall back to the dense N x N reference")
    if cfg.attention.fp8_forward:
        raise ValueError(f"model.attn_window={w} does not combine with attention.fp8_forward=true (the fp8 kernel "
                         f"is causal or full only)")


def _check_hybrid(cfg: Config) -> None:
    """parallel.cp_impl=hybrid: cp = ulysses_degree x ring degree, both > 1; heads split over ulysses_degree."""
    p, u = cfg.parallel, cfg.parallel.ulysses_degree
    if p.cp_impl != "hybrid":
        if u != 1:
            raise ValueError(f"parallel.ulysses_degree={u} only applies to parallel.cp_impl=hybrid (got "
                             f"cp_impl={p.cp_impl!r}); leave it at 1 or set parallel.cp_impl=hybrid")
        return
    if not (1 < u < p.cp and p.cp % u == 0):
        raise ValueError(f"parallel.cp_impl=hybrid needs 1 < parallel.ulysses_degree < parallel.cp with "
                         f"ulysses_degree dividing cp; got ulysses_degree={u}, cp={p.cp} (u = cp is "
                         f"parallel.cp_impl=ulysses, u = 1 is parallel.cp_impl=ring)")
    if cfg.model.n_heads % u != 0:
        raise ValueError(f"parallel.cp_impl=hybrid splits heads over the Ulysses group: model.n_heads "
                         f"({cfg.model.n_heads}) must be divisible by parallel.ulysses_degree ({u})")
    # The sequence layout needs seq_len % (2 * ring) == 0 and (seq_len / ring) % u == 0: both follow from the
    # seq_len % (2 * cp) check above.


# Overrides that leave the trained run the same: they stay out of the default run name, so adding one (more steps,
# another log interval, a logger, the passkey eval) resumes the run. Every other override (model.*, data.seq_len,
# data.batch_size, data.source / path, optim.*, parallel.*, attention.*, train.seed, train.dtype, ...) is hashed.
RUN_NAME_IGNORED = ("run_name", "experiment", "hydra", "logger", "eval", "train.steps", "train.out_dir",
                    "train.resume", "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
                    "train.keep_ckpts", "train.max_bad_steps", "train.peak_tflops", "data.num_workers",
                    "data.cache_dir", "data.token_cache")


def _ignored(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == p or key.startswith(p + ".") for p in RUN_NAME_IGNORED)


def run_name_for(base: str, overrides: list[str]) -> str:
    """`base`, or `base-<8 hex>` hashing the sorted run-defining overrides (`key=value` strings as typed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    kept = sorted(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed
                  if not _ignored(o.get_key_element()))
    if not kept:
        return base
    return f"{base}-{hashlib.sha1(chr(10).join(kept).encode()).hexdigest()[:8]}"


def _auto_run_name(base: str) -> str:
    # Resolved by Hydra for the run dir (hydra.run.dir = train.out_dir = outputs/${run_name}), after it has
    # stored the command line's overrides; a config composed without Hydra's job (tests) keeps the base name.
    if not HydraConfig.initialized():
        return base
    return run_name_for(base, list(HydraConfig.get().overrides.task))


def register_configs() -> None:
    """Make the schema available to configs/train.yaml as `base_config`, with the run-name resolver."""
    ConfigStore.instance().store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("auto_run_name", _auto_run_name, replace=True)
    OmegaConf.register_new_resolver("trainer_help", _train_help, replace=True)  # hydra.help.template (--help)


def _train_help(*, _root_) -> str:
    from trainer.cli_help import train_help  # imports this module: resolved lazily, on --help only

    return train_help(_root_=_root_)
