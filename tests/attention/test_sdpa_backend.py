"""SDPA backend (attention/sdpa.py) against the reference, including which path each case takes."""

import warnings

import pytest
import torch

import attention.sdpa as sdpa
from attention import flash_attn_func, flash_attn_varlen_func
from attention.reference import reference_attn_backward, reference_attn_forward
from attn_oracle import rand_qkv
from helpers import assert_close

# (Nq, Nk, H, Hkv, causal, window, fused?)
CASES = [
    (17, 17, 4, 4, False, (-1, -1), True),
    (17, 17, 4, 2, True, (-1, -1), True),  # square causal, GQA
    (23, 9, 4, 1, True, (-1, -1), True),  # Nq > Nk causal: 14 empty rows + a square, MQA
    (9, 23, 4, 2, True, (-1, -1), True),  # Nq < Nk causal: plain prefix + square, merged
    (1, 12, 2, 1, True, (-1, -1), True),  # decode: causal is vacuous
    (11, 11, 2, 2, False, (-1, 0), True),  # window (-1, 0) == causal
    (11, 11, 2, 2, True, (30, -1), True),  # a window wider than the keys restricts nothing
    (19, 19, 2, 2, True, (4, -1), False),  # sliding window -> reference
    (15, 21, 4, 2, False, (3, 2), False),  # two-sided window -> reference
    (20, 10, 2, 1, False, (2, 1), False),  # window with empty rows -> reference
]
IDS = [f"q{c[0]}-k{c[1]}-h{c[2]}/{c[3]}-{'causal' if c[4] else 'full'}-w{c[5]}" for c in CASES]


@pytest.fixture
def ref_calls(monkeypatch):
    """Count the reference fallbacks taken inside attention.sdpa."""
    calls = {"forward": 0, "backward": 0}

    def fwd(*a, **kw):
        calls["forward"] += 1
        return reference_attn_forward(*a, **kw)

    def bwd(*a, **kw):
        calls["backward"] += 1
        return reference_attn_backward(*a, **kw)

    monkeypatch.setattr(sdpa, "reference_attn_forward", fwd)
    monkeypatch.setattr(sdpa, "reference_attn_backward", bwd)
    return calls


def _check_against_reference(q, k, v, causal, window, scale, dlse, tol=None):
    dout = torch.randn_like(q)
    out, lse = sdpa.sdpa_attn_forward(q, k, v, causal, scale, window)
    r_out, r_lse = reference_attn_forward(q, k, v, causal, scale, window)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == r_lse.shape
    assert out.shape == q.shape and out.is_contiguous()
    kw = {} if tol is None else dict(atol=tol, rtol=tol)
    assert_close(out, r_out, "out", **kw)
    # lse is fp32 by contract, but from fp16 / bf16 scores the CPU kernel's summation order shows at ~5e-5
    lse_tol = 1e-5 if q.dtype in (torch.float32, torch.float64) else 2e-4
    assert_close(lse, r_lse, "lse", **({} if tol is None else dict(atol=lse_tol, rtol=lse_tol)))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    # backward from the *reference* out/lse: the backend must accept out/lse produced elsewhere (a ring)
    grads = sdpa.sdpa_attn_backward(dout, q, k, v, r_out, r_lse, causal, scale, window, dlse)
    r_grads = reference_attn_backward(dout, q, k, v, r_out, r_lse, causal, scale, window, dlse)
    for name, g, r, t in zip(("dq", "dk", "dv"), grads, r_grads, (q, k, v)):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, r, name, **kw)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("with_dlse", [False, True])
def test_matches_reference_and_takes_the_documented_path(case, with_dlse, ref_calls):
    nq, nk, H, hkv, causal, window, fused = case
    q, k, v = rand_qkv(2, nq, nk, H, hkv, 16)
    dlse = torch.randn(2, H, nq) if with_dlse else None
    _check_against_reference(q, k, v, causal, window, 0.3, dlse)
    expected = 0 if fused else 1
    assert ref_calls == {"forward": expected, "backward": expected}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype, ref_calls):
    q, k, v = rand_qkv(1, 13, 21, 4, 2, 16, dtype=dtype)
    # fp64: the kernel runs in fp64 but lse (and the merge of the two causal pieces) is fp32 by contract
    tol = {torch.float64: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    _check_against_reference(q, k, v, True, (-1, -1), 0.25, torch.randn(1, 4, 13), tol=tol)
    assert ref_calls == {"forward": 0, "backward": 0}


def test_dlse_zero_equals_none():
    q, k, v = rand_qkv(1, 10, 10, 2, 2, 8)
    out, lse = sdpa.sdpa_attn_forward(q, k, v, True, 0.35, (-1, -1))
    dout = torch.randn_like(q)
    a = sdpa.sdpa_attn_backward(dout, q, k, v, out, lse, True, 0.35, (-1, -1), None)
    b = sdpa.sdpa_attn_backward(dout, q, k, v, out, lse, True, 0.35, (-1, -1), torch.zeros(1, 2, 10))
    for name, x, y in zip(("dq", "dk", "dv"), a, b):
        assert_close(x, y, name, atol=1e-6, rtol=1e-6)


def test_public_api_with_sdpa_backend_grads_through_lse():
    q, k, v = rand_qkv(2, 14, 20, 4, 2, 8, requires_grad=True)
    dout, dlse = torch.randn(2, 14, 4, 8), torch.randn(2, 4, 14)
    grads = {}
    for backend in ("sdpa", "reference"):
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend)
        g = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
        grads[backend] = (out, lse, *g)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), grads["sdpa"], grads["reference"]):
        assert_close(a, b, name)


def test_varlen_with_sdpa_backend():
    cu_q = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    cu_k = torch.tensor([0, 8, 9, 13], dtype=torch.int32)
    q = torch.randn(14, 4, 8, requires_grad=True)
    k, v = (torch.randn(13, 2, 8, requires_grad=True) for _ in range(2))
    res = {}
    for backend in ("sdpa", "reference"):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 8, causal=True, backend=backend)
        res[backend] = (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), res["sdpa"], res["reference"]):
        assert_close(a, b, name)


def test_kernel_runtime_error_falls_back_with_warning(monkeypatch, ref_calls):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated: kernel not built for this arch")

    broken_kernel = sdpa._Kernel("broken", broken, broken, pad=1)
    monkeypatch.setattr(sdpa, "_pick_kernels", lambda *a, **kw: [broken_kernel])
    monkeypatch.setattr(sdpa, "_WARNED", set())
    q, k, v = rand_qkv(1, 9, 9, 2, 2, 8)
    with pytest.warns(UserWarning, match="broken: simulated"):
        out, lse = sdpa.sdpa_attn_forward(q, k, v, True, 0.3, (-1, -1))
    r_out, r_lse = reference_attn_forward(q, k, v, True, 0.3)
    assert_close(out, r_out, "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already: no second warning
        sdpa.sdpa_attn_backward(torch.ones_like(q), q, k, v, out, lse, True, 0.3, (-1, -1), None)
    assert ref_calls == {"forward": 1, "backward": 1}


def test_no_kernel_means_reference(monkeypatch, ref_calls):
    monkeypatch.setattr(sdpa, "_pick_kernels", lambda *a, **kw: [])
    q, k, v = rand_qkv(1, 6, 6, 2, 2, 8)
    _check_against_reference(q, k, v, False, (-1, -1), 0.3, None)
    assert ref_calls == {"forward": 1, "backward": 1}


def test_a_failing_kernel_hands_over_to_the_next_without_warning(monkeypatch, ref_calls):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated: shape not supported")

    chain = [sdpa._Kernel("broken", broken, broken, pad=1), sdpa._CPU]
    monkeypatch.setattr(sdpa, "_pick_kernels", lambda *a, **kw: chain)
    q, k, v = rand_qkv(1, 9, 9, 2, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only a fall to the reference warns
        _check_against_reference(q, k, v, True, (-1, -1), 0.3, None)
    assert ref_calls == {"forward": 0, "backward": 0}


def _lse_in_log2(q, k, v, causal, scale):  # a kernel whose lse is in another base: the check must see it
    out, lse = sdpa._cpu_forward(q, k, v, causal, scale)
    return out, lse * 1.4426950408889634


@pytest.mark.parametrize("kernel,passes", [
    (sdpa._CPU, True),
    (sdpa._Kernel("log2 lse", _lse_in_log2, sdpa._cpu_backward, pad=1), False),
    (sdpa._Kernel("raises", sdpa._cpu_forward, lambda *a: (_ for _ in ()).throw(RuntimeError("no")), pad=1), False),
], ids=["same", "wrong-lse", "raises"])
def test_self_check_admits_only_a_kernel_that_reproduces_the_trusted_one(monkeypatch, kernel, passes):
    monkeypatch.setattr(sdpa, "_CHECKED", {})
    assert sdpa._self_check(kernel, sdpa._CPU, torch.device("cpu"), torch.float32, 16) is passes


@pytest.mark.gpu
def test_cudnn_is_first_on_hopper_and_passes_its_self_check():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN attention is only preferred on sm90+")
    for dtype in (torch.float16, torch.bfloat16):
        for D in (64, 128):
            assert sdpa._pick_kernels(torch.device("cuda"), dtype, D)[0] is sdpa._CUDNN, (dtype, D)
    assert sdpa._CUDNN not in sdpa._pick_kernels(torch.device("cuda"), torch.bfloat16, 136, dlse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("nq,nk,causal", [(256, 256, True), (200, 333, True), (333, 200, True), (129, 77, False)])
def test_cuda_fused_kernels_match_reference(dtype, D, nq, nk, causal, ref_calls):
    torch.manual_seed(0)
    q, k, v = (t.cuda() for t in rand_qkv(2, nq, nk, 8, 2, D, dtype=dtype))
    dlse = torch.randn(2, 8, nq, device="cuda")
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-3}[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fused-kernel failure would warn and fall back
        _check_against_reference(q, k, v, causal, (-1, -1), D ** -0.5, dlse, tol=tol)
    assert ref_calls == {"forward": 0, "backward": 0}
