"""Reference attention (attention/reference.py) against the naive fp64 softmax(QK^T)V oracle."""

import pytest
import torch

from attention import attn_backward, attn_forward, flash_attn_func
from attention.reference import reference_attn_backward, reference_attn_forward
from attn_oracle import oracle, rand_qkv
from helpers import assert_close, visible_mask

# (B, Nq, Nk, H, Hkv, D, causal, window_size)
CASES = [
    (2, 17, 17, 4, 4, 16, False, (-1, -1)),  # odd length, plain
    (1, 13, 29, 4, 2, 8, True, (-1, -1)),  # Nq < Nk causal (bottom-right), GQA
    (2, 29, 13, 4, 1, 8, True, (-1, -1)),  # Nq > Nk causal: first 16 rows see nothing, MQA
    (1, 23, 23, 2, 2, 16, False, (5, -1)),  # left window only
    (1, 23, 19, 2, 1, 16, False, (-1, 3)),  # right window only, Nq > Nk
    (2, 21, 25, 6, 3, 8, False, (4, 2)),  # both sides, Nq < Nk
    (1, 31, 31, 4, 2, 8, True, (6, -1)),  # causal + window (sliding window)
    (1, 15, 15, 2, 2, 8, False, (0, 0)),  # diagonal only
    (1, 20, 10, 2, 1, 8, False, (2, 1)),  # window leaves the first rows empty
    (1, 1, 7, 2, 1, 8, True, (-1, -1)),  # one query (decode): sees every key
    (1, 9, 1, 2, 2, 8, False, (-1, -1)),  # one key
]
IDS = [f"B{c[0]}-q{c[1]}-k{c[2]}-h{c[3]}/{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}-w{c[7]}" for c in CASES]


def _expect_empty_rows(nq, nk, causal, window):
    """Bool (Nq,) rows with no visible key, straight from DESIGN.md's definition."""
    return ~visible_mask(nq, nk, causal, window).any(1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_backward_match_naive(case):
    B, nq, nk, H, hkv, D, causal, window = case
    q, k, v = rand_qkv(B, nq, nk, H, hkv, D)
    dout, dlse = torch.randn(B, nq, H, D), torch.randn(B, H, nq)
    out, lse = reference_attn_forward(q, k, v, causal, None, window)
    e_out, e_lse, e_dq, e_dk, e_dv = oracle(q, k, v, dout, dlse, causal, None, window)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (B, H, nq)
    assert out.is_contiguous()  # like FlashAttention: callers .view() it
    assert_close(out, e_out, "out")
    assert_close(lse, e_lse, "lse")
    empty = _expect_empty_rows(nq, nk, causal, window)
    assert torch.isinf(lse[..., empty]).all() and (lse[..., empty] < 0).all()
    assert (out[:, empty] == 0).all()
    dq, dk, dv = reference_attn_backward(dout, q, k, v, out, lse, causal, None, window, dlse=dlse)
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    assert_close(dq, e_dq, "dq")
    assert_close(dk, e_dk, "dk")
    assert_close(dv, e_dv, "dv")


def test_softmax_scale_is_used():
    q, k, v = rand_qkv(1, 9, 11, 2, 2, 8)
    out, lse = reference_attn_forward(q, k, v, True, 0.37)
    e_out, e_lse, *_ = oracle(q, k, v, torch.zeros(1, 9, 2, 8), None, True, 0.37)
    assert_close(out, e_out, "out")
    assert_close(lse, e_lse, "lse")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    """Low precision inputs are rounded once; the oracle sees the same rounded values."""
    q, k, v = rand_qkv(2, 19, 23, 4, 2, 16, dtype=dtype)
    dout, dlse = torch.randn(2, 19, 4, 16, dtype=dtype), torch.randn(2, 4, 19)
    out, lse = reference_attn_forward(q, k, v, True, None, (7, -1))
    dq, dk, dv = reference_attn_backward(dout, q, k, v, out, lse, True, None, (7, -1), dlse=dlse)
    assert (out.dtype, dq.dtype, dk.dtype, dv.dtype, lse.dtype) == (dtype,) * 4 + (torch.float32,)
    e_out, e_lse, e_dq, e_dk, e_dv = oracle(q, k, v, dout, dlse, True, None, (7, -1))
    lse_tol = 1e-9 if dtype == torch.float64 else 2e-4  # lse is fp32 whatever the input dtype
    scale = 4 if dtype == torch.bfloat16 else 1  # bf16 grads: sums of ~20 products of 8-bit mantissas
    assert_close(out, e_out.to(dtype), "out")
    assert_close(lse, e_lse, "lse", atol=max(lse_tol, 2e-6), rtol=max(lse_tol, 2e-6))
    for name, got, want in (("dq", dq, e_dq), ("dk", dk, e_dk), ("dv", dv, e_dv)):
        # fp64 grads recompute P from the fp32 lse (DESIGN.md: lse is fp32), so they carry its rounding
        tol = {torch.float64: 1e-6, torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}[dtype]
        assert_close(got, want.to(dtype), name, atol=tol * scale, rtol=tol * scale)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (9, 4)), (True, (5, -1))])
def test_blocked_equals_unblocked(causal, window):
    q, k, v = rand_qkv(2, 37, 45, 4, 2, 8, dtype=torch.float64)
    dout, dlse = torch.randn(2, 37, 4, 8, dtype=torch.float64), torch.randn(2, 4, 37)
    big = dict(block_q=4096, block_k=4096)
    small = dict(block_q=5, block_k=3)
    out1, lse1 = reference_attn_forward(q, k, v, causal, None, window, **big)
    out2, lse2 = reference_attn_forward(q, k, v, causal, None, window, **small)
    assert_close(out2, out1, "out")
    assert_close(lse2, lse1, "lse", atol=1e-6, rtol=1e-6)  # lse is returned in fp32
    g1 = reference_attn_backward(dout, q, k, v, out1, lse1, causal, None, window, dlse, **big)
    g2 = reference_attn_backward(dout, q, k, v, out1, lse1, causal, None, window, dlse, **small)
    for name, a, b in zip(("dq", "dk", "dv"), g2, g1):
        assert_close(a, b, name)


def test_gradients_through_lse_via_autograd():
    """flash_attn_func(return_lse=True): a loss on out *and* lse backpropagates like the fp64 oracle."""
    q, k, v = rand_qkv(2, 13, 21, 4, 2, 8, requires_grad=True)
    dout, dlse = torch.randn(2, 13, 4, 8), torch.randn(2, 4, 13)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="reference")
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    _, _, e_dq, e_dk, e_dv = oracle(q, k, v, dout, dlse, causal=True)
    assert_close(q.grad, e_dq, "dq")
    assert_close(k.grad, e_dk, "dk")
    assert_close(v.grad, e_dv, "dv")


def test_lse_only_loss():
    """Only lse in the loss: dout arrives as None and must be treated as zeros."""
    q, k, v = rand_qkv(1, 11, 11, 2, 1, 8, requires_grad=True)
    dlse = torch.randn(1, 2, 11)
    _, lse = flash_attn_func(q, k, v, return_lse=True, backend="reference")
    (lse * dlse).sum().backward()
    _, _, e_dq, e_dk, e_dv = oracle(q, k, v, torch.zeros(1, 11, 2, 8), dlse)
    assert_close(q.grad, e_dq, "dq")
    assert_close(k.grad, e_dk, "dk")
    assert_close(v.grad, e_dv, "dv")


def test_attn_backward_with_dlse():
    q, k, v = rand_qkv(1, 16, 24, 4, 4, 8)
    dout, dlse = torch.randn(1, 16, 4, 8), torch.randn(1, 4, 16)
    out, lse = attn_forward(q, k, v, False, None, (3, 6), backend="reference")
    dq, dk, dv = attn_backward(dout, q, k, v, out, lse, False, None, (3, 6), dlse=dlse, backend="reference")
    _, _, e_dq, e_dk, e_dv = oracle(q, k, v, dout, dlse, False, None, (3, 6))
    assert_close(dq, e_dq, "dq")
    assert_close(dk, e_dk, "dk")
    assert_close(dv, e_dv, "dv")


def test_rows_without_keys_have_zero_out_and_finite_grads():
    q, k, v = rand_qkv(1, 12, 5, 2, 1, 8, requires_grad=True)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="reference")
    assert (out[:, :7] == 0).all() and torch.isneginf(lse[..., :7]).all()
    assert torch.isfinite(lse[..., 7:]).all()
    loss = out.square().sum() + torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).sum()
    loss.backward()
    for name, g in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(g).all(), name
    assert (q.grad[:, :7] == 0).all()
    _, _, e_dq, e_dk, e_dv = oracle(q, k, v, 2 * out.detach(), torch.ones(1, 2, 12), causal=True)
    assert_close(q.grad, e_dq, "dq")
    assert_close(k.grad, e_dk, "dk")
    assert_close(v.grad, e_dv, "dv")
