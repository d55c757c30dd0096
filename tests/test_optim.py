"""CompensatedAdamW (trainer/optim.py): torch's AdamW arithmetic; bf16 weights that follow an fp32 run where plain
bf16 AdamW stands still; a skipped step (found_inf) changes nothing; the compiled CUDA update equals the eager one."""

import copy

import pytest
import torch

from trainer.optim import CompensatedAdamW, adamw_update_, round_to_bf16

SHAPES = [(64, 48), (48,), (1000,)]


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # bf16-representable start, so every run begins at the same point
    return [(torch.randn(s, generator=gen) * 0.02).bfloat16().to(dtype).requires_grad_() for s in SHAPES]


def _run(opt, params, steps, lr_grads_seed=1, dtype=None):
    gen = torch.Generator().manual_seed(lr_grads_seed)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) + 0.5).to(dtype or p.dtype).to(p.dtype)
        opt.step()


def _groups(params):
    return [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]


def test_fp32_matches_torch_adamw():
    ours, ref = _params(torch.float32), _params(torch.float32)
    _run(CompensatedAdamW(_groups(ours), lr=1e-3, betas=(0.9, 0.95), eps=1e-8), ours, 20)
    _run(torch.optim.AdamW(_groups(ref), lr=1e-3, betas=(0.9, 0.95), eps=1e-8), ref, 20)
    start = _params(torch.float32)
    for a, b, s in zip(ours, ref, start):
        assert ((a - b).norm() / (b - s).norm()).item() < 1e-4


def test_bf16_weights_follow_the_fp32_run_where_plain_bf16_stands_still():
    """lr 1e-5 on weights of ~0.02 (bf16 resolution 1.2e-4): each update is under half a bf16 step."""
    start = _params(torch.float32)
    fp32, comp, plain = _params(torch.float32), _params(torch.bfloat16), _params(torch.bfloat16)
    opts = [torch.optim.AdamW(_groups(fp32), lr=1e-5, betas=(0.9, 0.95)),
            CompensatedAdamW(_groups(comp), lr=1e-5, betas=(0.9, 0.95)),
            torch.optim.AdamW(_groups(plain), lr=1e-5, betas=(0.9, 0.95))]
    for opt, params in zip(opts, (fp32, comp, plain)):
        _run(opt, params, 100, dtype=torch.bfloat16)  # the same bf16-rounded gradients everywhere
    for ref, c, p, s in zip(fp32, comp, plain, start):
        moved = (ref - s).norm()
        held = c.float() + opts[1].state[c]["compensation"].float()
        assert ((held - ref).norm() / moved).item() < 0.01  # weight + compensation: the fp32 trajectory
        assert ((c.float() - ref).norm() / moved).item() < 0.1  # the bf16 weight alone: within its rounding
        assert ((p.float() - ref).norm() / moved).item() > 0.5  # plain bf16 AdamW lost most updates
    assert {t.dtype for s in opts[1].state.values() for k, t in s.items() if k != "step"} == {torch.bfloat16}


def test_found_inf_skips_everything_and_resumes():
    params = _params(torch.bfloat16)
    opt = CompensatedAdamW(_groups(params), lr=1e-4)
    _run(opt, params, 3)
    before = [p.detach().clone() for p in params]
    state = {id(p): {k: t.clone() for k, t in opt.state[p].items()} for p in params}
    opt.found_inf = torch.ones(())
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        for k, t in opt.state[p].items():
            assert torch.equal(t, state[id(p)][k]), k
    opt.found_inf = torch.zeros(())
    _run(opt, params, 1)
    assert all(opt.state[p]["step"].item() == 4 for p in params)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


def test_state_dict_round_trip_continues_exactly():
    a, b = _params(torch.bfloat16), _params(torch.bfloat16)
    opt_a = CompensatedAdamW(_groups(a), lr=1e-4)
    _run(opt_a, a, 5)
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    opt_b = CompensatedAdamW(_groups(b), lr=1e-4)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a file: no tensor shared with opt_a
    _run(opt_a, a, 5, lr_grads_seed=7)
    _run(opt_b, b, 5, lr_grads_seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_resumes_from_torch_adamw_state():
    """A run saved with optim.compensated=false (torch's AdamW, bf16 states, a CPU step count) resumes with the
    compensation starting at zero and the moments and step count carried over."""
    a, b = _params(torch.bfloat16), _params(torch.bfloat16)
    plain = torch.optim.AdamW(_groups(a), lr=1e-3, foreach=False)
    _run(plain, a, 3)
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    ours = CompensatedAdamW(_groups(b), lr=1e-3)
    ours.load_state_dict(copy.deepcopy(plain.state_dict()))
    before = [x.detach().float() for x in a]
    _run(plain, a, 1, lr_grads_seed=5)
    _run(ours, b, 1, lr_grads_seed=5)
    for x, y, w in zip(a, b, before):  # torch's bf16 arithmetic against our fp32: the same step, to rounding
        assert ((x.float() - y.float()).norm() / (x.float() - w).norm()).item() < 0.1
    assert all(ours.state[p]["step"].item() == 4 for p in b)
    assert all(ours.state[p]["compensation"].abs().max() > 0 for p in b)


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="lr=0"):
        CompensatedAdamW(_params(torch.bfloat16), lr=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_update_matches_eager_on_gpu():
    """The CUDA path compiles adamw_update_ (trainer.fused.compiled), with the schedule's lr moving between steps
    (a 0-d tensor, so no recompile) and several shapes. Inductor keeps fp32 values where the source rounds to bf16
    and back, which once made every compensation zero; weight + compensation must follow the eager update (FMA
    contraction may move single bits, hence a tolerance, far below the 6e-5 half-step of these weights)."""
    params = [p.detach().cuda().requires_grad_() for p in _params(torch.bfloat16)]
    twins = [p.detach().clone() for p in params]
    opt = CompensatedAdamW(_groups(params), lr=1e-5, betas=(0.9, 0.95))
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), c=torch.zeros_like(p)) for p in twins]
    step = torch.zeros((), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    for i in range(6):
        lr = 1e-5 * (i + 1)
        for g in opt.param_groups:
            g["lr"] = lr
        step += 1
        for p, t, s, wd in zip(params, twins, state, (0.1, 0.0, 0.0)):
            grad = (torch.randn(p.shape, generator=gen, device="cuda") + 0.5).bfloat16()
            p.grad = grad
            adamw_update_(t, grad, s["m"], s["v"], s["c"], step, torch.full((), lr, device="cuda"),
                          torch.ones((), device="cuda"), 0.9, 0.95, 1e-8, wd)
        opt.step()
    for p, t, s in zip(params, twins, state):
        comp = opt.state[p]["compensation"].float()
        assert comp.abs().mean() > 0.2 * s["c"].float().abs().mean() > 0  # not optimised away
        held, ref = p.float() + comp, t.float() + s["c"].float()
        assert (held - ref).abs().max().item() < 1e-6
    before = [(p.detach().clone(), opt.state[p]["compensation"].clone()) for p in params]
    opt.found_inf = torch.ones((), device="cuda")  # the kernel's early exit
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert all(torch.equal(p, b) and torch.equal(opt.state[p]["compensation"], c) for p, (b, c) in zip(params, before))


def test_round_to_bf16_is_torch_rounding():
    x = torch.randn(100_000) * torch.logspace(-30, 30, 100_000)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.0e38, 1e-40])])
    assert torch.equal(round_to_bf16(x), x.bfloat16().float())
