"""parallel/data_parallel.py: the DeepSpeed config dict and its ValueErrors, and DDP / ZeRO 1/2/3 engines on 2
gloo ranks against one process running the same AdamW over the whole batch (the oracle); a non-finite step
is skipped by every ZeRO stage.

The toy module applies a head weight outside the head's forward, as the trainer's chunked loss does, and
ZeRO-3 partitions even its tiny parameters (persistence_threshold=0), so that read must gather the weight.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_utils import run_world
from helpers import assert_close
from parallel.data_parallel import init_zero_engine, wrap_ddp, zero_config, zero_grad_norm

CPU = torch.device("cpu")


def _cfg(**kw):
    args = dict(stage=2, micro_batch_size=4, grad_accum=2, dp=3, grad_clip=1.0, bf16=False, device=CPU)
    args.update(kw)
    return zero_config(**args)


def test_zero_config_values():
    c = _cfg()
    assert c["train_micro_batch_size_per_gpu"] == 4 and c["gradient_accumulation_steps"] == 2
    assert c["train_batch_size"] == 4 * 2 * 3
    assert c["zero_optimization"]["stage"] == 2 and c["gradient_clipping"] == 1.0
    assert c["bf16"]["enabled"] is False and c["fp16"]["enabled"] is False
    assert c["zero_optimization"]["reduce_scatter"] is False  # gloo has no reduce-scatter
    assert c["zero_optimization"]["overlap_comm"] is False
    assert "sequence_parallel_size" not in c
    assert "stage3_param_persistence_threshold" not in c["zero_optimization"]
    assert _cfg(stage=3, persistence_threshold=0)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    gpu = _cfg(stage=3, bf16=True, device=torch.device("cuda", 0), cp=4, dp=2, grad_clip=0.0)
    assert gpu["bf16"] == {"enabled": True, "check_grad_overflow": True} and gpu["gradient_clipping"] == 0.0
    assert gpu["zero_optimization"]["reduce_scatter"] is True and gpu["zero_optimization"]["overlap_comm"] is True
    # train_batch_size counts samples: cp ranks share theirs, so it is micro x accum x dp, not x world.
    assert gpu["train_batch_size"] == 4 * 2 * 2 and gpu["sequence_parallel_size"] == 4


@pytest.mark.parametrize("kw,match", [
    (dict(stage=0), "stage must be one of"), (dict(stage=4), "stage must be one of"),
    (dict(micro_batch_size=0), "micro_batch_size"), (dict(grad_accum=0), "grad_accum"), (dict(dp=0), "dp"),
    (dict(cp=0), "cp"), (dict(dp=2.0), "dp"), (dict(grad_accum=True), "grad_accum"),
    (dict(grad_clip=-1.0), "grad_clip"), (dict(grad_clip=float("nan")), "grad_clip"),
    (dict(persistence_threshold=-1), "persistence_threshold"),
])
def test_zero_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_init_zero_engine_needs_a_config_and_a_process_group():
    module = nn.Linear(2, 2)
    opt = torch.optim.AdamW(module.parameters())
    with pytest.raises(ValueError, match="config"):
        init_zero_engine(module, opt, config={"train_batch_size": 1})
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialised"):
        init_zero_engine(module, opt, config=_cfg())


def test_wrap_ddp_single_process_is_identity():
    module = nn.Linear(2, 2)
    wrapped, scale = wrap_ddp(module, CPU)
    assert wrapped is module and scale == 1.0


# -- 2 ranks vs one process ----------------------------------------------------------------------------------

IN, HID, OUT, N_SAMPLES, STEPS, ACCUM = 6, 8, 5, 8, 3, 2
LR_FACTOR = [1.0, 0.5, 0.25]  # per-step lr multipliers, through the scheduler callable


class HeadLoss(nn.Module):
    """Sum of squared errors of head(relu(body(x))); the head weight is applied by hand (outside head.forward)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(IN, HID)
        self.head = nn.Linear(HID, OUT, bias=False)

    def forward(self, x, y):
        h = torch.relu(self.body(x))
        return ((h @ self.head.weight.T - y) ** 2).sum()


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, ACCUM, N_SAMPLES, IN, generator=gen)
    y = torch.randn(STEPS, ACCUM, N_SAMPLES, OUT, generator=gen) * 3  # large errors: clipping is active
    return x, y


def _new_model_and_opt():
    torch.manual_seed(0)
    model = HeadLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    return model, opt


def _lr_schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: LR_FACTOR[min(s, len(LR_FACTOR) - 1)])


def _oracle():
    """One process, the whole batch: loss = sum / count over every accumulation slice; clip 1.0; AdamW."""
    model, opt = _new_model_and_opt()
    sched = _lr_schedule(opt)
    x, y = _data()
    norms = []
    for step in range(STEPS):
        for m in range(ACCUM):
            (model(x[step, m], y[step, m]) / (ACCUM * N_SAMPLES)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        sched.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], norms


def _distributed_run(rank, world_size, stage):
    model, opt = _new_model_and_opt()
    x, y = _data()
    half = N_SAMPLES // world_size
    mine = slice(rank * half, (rank + 1) * half)
    denom = ACCUM * N_SAMPLES  # the global count, as the trainer all-reduces it
    norms = []
    if stage == 0:
        module, grad_scale = wrap_ddp(model, CPU)
        sched = _lr_schedule(opt)
        for step in range(STEPS):
            for m in range(ACCUM):
                (module(x[step, m, mine], y[step, m, mine]) * (grad_scale / denom)).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
            opt.step()
            sched.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], norms
    # persistence_threshold=0: even these tiny parameters are partitioned under ZeRO-3.
    config = zero_config(stage, half, ACCUM, world_size, 1.0, False, CPU, persistence_threshold=0)
    engine, grad_scale = init_zero_engine(model, opt, _lr_schedule, config)
    for step in range(STEPS):
        for m in range(ACCUM):
            engine.backward(engine(x[step, m, mine], y[step, m, mine]) * (grad_scale / denom), scale_wrt_gas=False)
            engine.step()
        norms.append(float(zero_grad_norm(engine, CPU)))
    params = _gathered(engine)
    _check_non_finite_step_is_skipped(engine, grad_scale, params)
    engine.destroy()
    return params, norms


def _gathered(engine):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # no-op below stage 3
        return [p.detach().clone() for p in engine.module.parameters()]


def _check_non_finite_step_is_skipped(engine, grad_scale, params):
    """A NaN loss: the engine reports a non-finite grad norm and leaves weights and lr schedule alone."""
    lr = engine.lr_scheduler.get_last_lr()
    for _ in range(ACCUM):
        x, y = torch.ones(N_SAMPLES // 2, IN), torch.full((N_SAMPLES // 2, OUT), float("nan"))
        engine.backward(engine(x, y) * grad_scale, scale_wrt_gas=False)
        engine.step()
    assert not torch.isfinite(zero_grad_norm(engine, CPU)) and engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(_gathered(engine), params))
    assert engine.lr_scheduler.get_last_lr() == lr


def _engines_worker(rank, world_size):
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed reads it; torchrun would set it
    want_params, want_norms = _oracle()
    for stage in (0, 1, 2, 3):
        params, norms = _distributed_run(rank, world_size, stage)
        for i, (got, want) in enumerate(zip(params, want_params)):
            assert_close(got, want, f"stage {stage} param {i}", atol=2e-6, rtol=2e-5)
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(norms, want_norms)), (stage, norms, want_norms)
        assert want_norms[0] > 1.0  # the clip was active, so its semantics were compared too


def test_ddp_and_zero_stages_match_one_process(free_port):
    run_world(_engines_worker, 2, free_port)
