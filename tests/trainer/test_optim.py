"""CompensatedAdamW (trainer/optim.py): torch's AdamW arithmetic; bf16 weights that follow an fp32 run where plain
bf16 AdamW stands still; a skipped step (found_inf) changes nothing; the compiled CUDA update equals the eager one."""

import copy

import pytest
import torch

from trainer.optim import INTERPRET, CompensatedAdamW, adamw_update_, round_to_bf16

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


def _follow_eager(params, opt, device, steps=6):
    """Steps opt and, beside it, the eager adamw_update_ on twins of params; the lr moves every step and every
    step brings new gradient tensors, at new addresses (all are kept alive). Returns the twins and their states."""
    twins, kept = [p.detach().clone() for p in params], []
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), c=torch.zeros_like(p)) for p in twins]
    step = torch.zeros((), device=device)
    gen = torch.Generator(device=device).manual_seed(3)
    for i in range(steps):
        lr = 1e-5 * (i + 1)
        for g in opt.param_groups:
            g["lr"] = lr
        step += 1
        for p, t, s, wd in zip(params, twins, state, [0.1] + [0.0] * (len(params) - 1)):
            grad = (torch.randn(p.shape, generator=gen, device=device) + 0.5).to(p.dtype)
            p.grad = grad
            kept.append(grad)
            adamw_update_(t, grad, s["m"], s["v"], s["c"], step, torch.full((), lr, device=device),
                          torch.ones((), device=device), 0.9, 0.95, 1e-8, wd)
        opt.step()
    return twins, state


def _assert_follows(params, opt, twins, state, tol):
    for p, t, s in zip(params, twins, state):
        comp = opt.state[p]["compensation"].float()
        assert comp.abs().mean() > 0.2 * s["c"].float().abs().mean() > 0  # not optimised away
        held, ref = p.float() + comp, t.float() + s["c"].float()
        assert (held - ref).abs().max().item() < tol
        m, m_ref = opt.state[p]["exp_avg"].float(), s["m"].float()  # one rounding flip can grow to 2 bf16 steps
        assert (m - m_ref).abs().max() <= 2**-6 * m_ref.abs().max()


def _assert_skip_changes_nothing(params, opt, device):
    before = [(p.detach().clone(), {k: t.clone() for k, t in opt.state[p].items()}) for p in params]
    opt.found_inf = torch.ones((), device=device)  # the kernel's early exit
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    for p, (b, st) in zip(params, before):
        assert torch.equal(p, b) and all(torch.equal(opt.state[p][k], t) for k, t in st.items())


# weight + compensation must follow the eager update. A one-bit difference in the fp32 arithmetic (FMA
# contraction, the kernel's exp2 / sqrt) can round the bf16 compensation the other way: one of its own steps,
# up to 2^-20 at these weights. 4e-6 = 2^-18 is still far below the 6e-5 half-step of the weights.
HELD_TOL = 4e-6


@pytest.mark.skipif(not INTERPRET, reason="the Triton interpreter runs the kernel on CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_multi_tensor_kernel_matches_eager_in_interpreter(dtype, monkeypatch):
    """adamw_multi_ (the CUDA path) under TRITON_INTERPRET: tensors of 1 to 3 tiles with ragged tails, two groups,
    an address table re-uploaded as new gradients arrive, and a skipped step. fp16 / fp32 only: the interpreter
    truncates fp32 to bf16 where the GPU rounds to nearest (bf16: test_cuda_update_matches_eager_on_gpu)."""
    import trainer.optim as optim
    monkeypatch.setattr(optim, "KERNEL_IN_INTERPRETER", True)
    gen = torch.Generator().manual_seed(0)
    params = [(torch.randn(s, generator=gen) * 0.02).to(dtype).requires_grad_() for s in [(40, 60), (7,), (1025,)]]
    opt = CompensatedAdamW(_groups(params), lr=1e-5, betas=(0.9, 0.95))
    twins, state = _follow_eager(params, opt, "cpu", steps=3)
    # fp16: one flip of the compensation's last bit (fp16's smallest step is 2^-24 = 6e-8) from a fused multiply-add
    _assert_follows(params, opt, twins, state, 2**-23 if dtype == torch.float16 else 1e-8)
    assert opt._tables[0].addresses[1] == params[0].grad.data_ptr()  # the table followed the last gradients
    assert opt._tables[0].tiles.tolist() == [[0, 0], [0, 1024], [0, 2048]]
    assert opt._tables[1].tiles.tolist() == [[0, 0], [1, 0], [1, 1024]]
    _assert_skip_changes_nothing(params, opt, "cpu")


@pytest.mark.skipif(not INTERPRET, reason="the Triton interpreter runs the kernel on CPU tensors")
def test_kernel_refuses_a_strided_weight(monkeypatch):
    """The kernel walks every tensor as one flat array: a weight that is a strided view (its states, loaded or made
    by zeros_like, are contiguous) must take the per-tensor update, and then gets the same result."""
    import trainer.optim as optim
    monkeypatch.setattr(optim, "KERNEL_IN_INTERPRETER", True)
    base = (torch.randn(8, 12) * 0.02).to(torch.float16)
    strided = base[:, ::2].detach().requires_grad_()  # a leaf view with strides (12, 2)
    state = [torch.zeros(8, 6, dtype=torch.float16) for _ in range(3)]
    assert not strided.is_contiguous() and all(s.is_contiguous() for s in state)
    assert not optim.kernel_applies([(strided, torch.ones(8, 6, dtype=torch.float16), *state, torch.ones(()))])
    opt = CompensatedAdamW([{"params": [strided], "weight_decay": 0.1}], lr=1e-5, betas=(0.9, 0.95))
    twins, twin_state = _follow_eager([strided], opt, "cpu", steps=3)
    _assert_follows([strided], opt, twins, twin_state, 1e-8)
    assert not opt._tables  # the kernel did not run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["kernel", "compiled"])
def test_cuda_update_matches_eager_on_gpu(path, monkeypatch):
    """Both CUDA paths: the multi-tensor Triton kernel, and the compiled torch update (trainer.model.fused.compiled) that
    takes tensors the kernel cannot. Inductor keeps fp32 values where the source rounds to bf16 and back, which
    once made every compensation zero."""
    import trainer.optim as optim
    if path == "compiled":
        monkeypatch.setattr(optim, "kernel_applies", lambda rows: False)
    params = [p.detach().cuda().requires_grad_() for p in _params(torch.bfloat16)]
    opt = CompensatedAdamW(_groups(params), lr=1e-5, betas=(0.9, 0.95))
    twins, state = _follow_eager(params, opt, "cuda")
    _assert_follows(params, opt, twins, state, HELD_TOL)
    assert bool(opt._tables) == (path == "kernel")  # the kernel's address tables exist only where it ran
    _assert_skip_changes_nothing(params, opt, "cuda")


def test_round_to_bf16_is_torch_rounding():
    x = torch.randn(100_000) * torch.logspace(-30, 30, 100_000)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.0e38, 1e-40])])
    assert torch.equal(round_to_bf16(x), x.bfloat16().float())
