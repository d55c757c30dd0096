"""Data parallelism over every rank: DDP (zero_stage=0) or a DeepSpeed ZeRO stage 1/2/3 engine.

    module, grad_scale = wrap_ddp(module, device)                               # zero_stage=0
    config = zero_config(stage=2, micro_batch_size=4, grad_accum=2, dp=4, cp=2, grad_clip=1.0, bf16=True,
                         device=device)
    with zero3_init(config, device):  # stage 3, optional: modules built in it are partitioned as they are created
        module = build()
    engine, grad_scale = init_zero_engine(module, torch_adamw, lambda opt: LambdaLR(opt, f), config)
    loss = engine(*inputs); engine.backward(loss * grad_scale, scale_wrt_gas=False); engine.step()

Both reduce gradients over the *whole* world (dp x cp ranks): cp ranks hold the same parameters and different
tokens of one sequence, so their gradients add up exactly as the dp ranks' do. Both *average* over the world;
for a loss that is already a global mean (sum of token losses / global token count) the caller multiplies by
grad_scale (= world size) to turn that average back into the sum, so cp=k gives the gradients of cp=1.

DeepSpeed on CPU (checked with deepspeed 0.19.8, torch 2.13): the CPU accelerator is picked automatically when
CUDA is absent (DS_ACCELERATOR=cpu forces it; we set it for device=cpu) and talks gloo. We initialise
torch.distributed ourselves (gloo / NCCL) and DeepSpeed adopts that process group (dist_init_required=False).
gloo has no reduce-scatter, so reduce_scatter and overlap_comm are off on CPU. The first DeepSpeed run on a
machine JIT-compiles its shared-memory comm op (~40 s on 2 cores, cached in ~/.cache/torch_extensions).
Knows nothing of models beyond nn.Module.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

ZERO_STAGES = (1, 2, 3)
QUIET_STEPS = 2**31 - 1  # DeepSpeed's own progress print every N steps: effectively never (the trainer logs)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def wrap_ddp(module: nn.Module, device: torch.device) -> tuple[nn.Module, float]:
    """DDP over every rank of the default group; a single process gets the module back unchanged.

    Returns (module, grad_scale): DDP averages gradients over world_size ranks, so a loss that is already a
    global mean is scaled by world_size in backward to undo that average.
    """
    world_size = _world_size()
    if world_size == 1:
        return module, 1.0
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids), float(world_size)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"zero_config: {name} must be an int >= 1, got {value!r}")


def zero_config(stage: int, micro_batch_size: int, grad_accum: int, dp: int, grad_clip: float, bf16: bool,
                device: torch.device, cp: int = 1, persistence_threshold: Optional[int] = None) -> dict:
    """The DeepSpeed config dict for ZeRO `stage` on a dp x cp grid.

    micro_batch_size: sequences per micro-batch per dp rank (every cp rank of a dp group holds a shard of the
    same ones); train_batch_size = micro_batch_size * grad_accum * dp. grad_clip: max global grad norm (0 = no
    clipping). bf16: DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights and optimizer
    states); otherwise everything is fp32. persistence_threshold (ZeRO-3): parameters with fewer elements stay
    whole on every rank (None: DeepSpeed's default, 1e5).
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"zero_config: stage must be one of {ZERO_STAGES} (0 is DDP: wrap_ddp), got {stage!r}")
    for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum), ("dp", dp), ("cp", cp)):
        _check_positive_int(name, value)
    if not grad_clip >= 0:  # also rejects NaN
        raise ValueError(f"zero_config: grad_clip must be >= 0 (0 disables clipping), got {grad_clip!r}")
    if persistence_threshold is not None and (not isinstance(persistence_threshold, int) or persistence_threshold < 0):
        raise ValueError(f"zero_config: persistence_threshold must be None or an int >= 0, got "
                         f"{persistence_threshold!r}")
    on_gpu = torch.device(device).type == "cuda"
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {
            "stage": stage,
            # gloo implements neither reduce-scatter nor the side streams overlap_comm uses.
            "reduce_scatter": on_gpu,
            "overlap_comm": on_gpu,
            "contiguous_gradients": True,
        },
        # A non-finite gradient norm skips the step (as the DDP path does); for fp32 DeepSpeed always checks.
        "bf16": {"enabled": bool(bf16), "check_grad_overflow": True},
        "fp16": {"enabled": False},
        # Our torch AdamW is the client optimizer: ZeRO partitions its state, and its state_dict format (and
        # so exact resume) stays ours.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if stage == 3 and persistence_threshold is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence_threshold
    if cp > 1:
        # Only DeepSpeed's batch-size check reads this (world / sequence_parallel_size = dp ranks that see
        # different samples). No mpu or mesh is passed, so its groups stay the whole world: ZeRO partitions
        # and reduces over dp x cp, which is what context parallelism needs.
        config["sequence_parallel_size"] = cp
    return config


def _ensure_deepspeed(device: torch.device, caller: str):
    """deepspeed, imported for `device` and adopting the torch.distributed group already joined."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{caller}: torch.distributed is not initialised; ZeRO shards over ranks, start "
                         "them with torchrun (or init_process_group) first")
    if "LOCAL_RANK" not in os.environ:
        raise ValueError(f"{caller}: DeepSpeed needs LOCAL_RANK in the environment (torchrun sets it)")
    if torch.device(device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed first picks its accelerator
    import deepspeed  # only ZeRO runs pay for (and need) the import

    return deepspeed


def zero3_init(config: dict, device: torch.device):
    """Context manager (deepspeed.zero.Init) under which every module built is partitioned as its constructor
    returns: each rank keeps 1/world of every parameter, so no rank ever holds the whole model. config: the
    zero_config(stage=3, ...) dict the engine will be initialised with (same partitioning, same process group:
    the whole world). The parameters' dtype is the config's: bf16 in DeepSpeed's bf16 mode (the engine checks
    that a partitioned model already has it), else fp32. Read or write a partitioned parameter whole inside
    deepspeed.zero.GatheredParameters; init_zero_engine accepts the model as it is."""
    if config is None or config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("zero3_init: config must be a zero_config(stage=3, ...) dict")
    deepspeed = _ensure_deepspeed(device, "zero3_init")
    # zero.Init reads the world size from deepspeed.comm (the batch-size check): adopt the torch group first
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    # dtype stays None: deepspeed 0.19.8 then takes it from the config; an explicit dtype next to a config is
    # ignored on an accelerator without fp16 (the CPU one), which builds in bf16
    return deepspeed.zero.Init(config_dict_or_path=config, remote_device=None, enabled=True)


def init_zero_engine(module: nn.Module, optimizer: torch.optim.Optimizer,
                     lr_scheduler: Optional[Callable] = None, config: Optional[dict] = None, quiet: bool = True):
    """Wrap `module` in a DeepSpeed engine; returns (engine, grad_scale).

    optimizer: a torch optimizer over module's parameters (ZeRO shards its state). lr_scheduler: a callable
    optimizer -> scheduler (DeepSpeed calls it with the optimizer whose param groups it manages) and steps it
    on every applied update. A parameter used outside its own submodule's forward (e.g. an lm head applied by
    a chunked loss) needs no registration: ZeRO-3 gathers such a parameter when it is read during a forward.
    Drive it with engine(*inputs), engine.backward(loss * grad_scale, scale_wrt_gas=False) and engine.step()
    after every micro-batch (the update happens on the gradient_accumulation_steps-th call).
    """
    if config is None or "zero_optimization" not in config:
        raise ValueError("init_zero_engine: config must be a DeepSpeed config dict from zero_config(...)")
    deepspeed = _ensure_deepspeed(next(module.parameters()).device, "init_zero_engine")

    if quiet:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=config, dist_init_required=False)
    return engine, float(_world_size())


def destroy_process_groups() -> None:
    """Tear down torch.distributed, through DeepSpeed when it took part: DeepSpeed caches process-group handles
    of its own (its world clone, data-parallel groups), which only its own destroy releases."""
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    elif dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def zero_grad_norm(engine, device: torch.device) -> torch.Tensor:
    """Global gradient norm (before clipping) of the engine's last update, as an fp32 tensor on `device`;
    inf when DeepSpeed skipped that update for a non-finite gradient."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return torch.full((), float("nan"), device=device)
    if isinstance(norm, torch.Tensor):
        return norm.detach().to(device=device, dtype=torch.float32)
    return torch.full((), float(norm), device=device)


def save_zero_checkpoint(engine, directory, tag: str = "zero") -> None:
    """Collective: every rank writes its ZeRO shards (weights, optimizer) under directory/tag."""
    engine.save_checkpoint(str(directory), tag=tag, client_state={}, save_latest=False)


def load_zero_checkpoint(engine, directory, tag: str = "zero") -> None:
    """Collective: restore weights and optimizer shards written by save_zero_checkpoint with the same world.

    The lr scheduler is not restored from here: the caller keeps one copy of its state (next to the data
    position and RNG), for DDP and ZeRO alike.
    """
    path, _ = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"train.resume: no DeepSpeed checkpoint {tag!r} under {directory}")
