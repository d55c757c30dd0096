"""Triton kernels under the CPU interpreter (TRITON_INTERPRET=1) against the fp64 oracles.

Small fp32/fp16 shapes only: the interpreter checks logic, not speed, and its bf16 dot is wrong (bf16 is
covered by tests/attention/test_triton_gpu.py). Lengths are not multiples of the 16-wide interpreter tiles.
"""

import os


import pytest  # noqa: E402
import torch  # noqa: E402

import attention  # noqa: E402
from attention import (attn_backward, attn_forward, attn_varlen_backward, attn_varlen_forward,  # noqa: E402
                       flash_attn_func, flash_attn_varlen_func, reference_attn_backward)
from helpers import assert_close, cu_seqlens, naive_attention  # noqa: E402

triton_common = pytest.importorskip("attention.triton.common")
pytestmark = pytest.mark.skipif(not triton_common.INTERPRET,
                                reason="attention.triton_* was imported before TRITON_INTERPRET=1 was set")

GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def _qkv(B, nq, nk, H, hkv, D, dtype):
    q = torch.randn(B, nq, H, D, dtype=dtype)
    k = torch.randn(B, nk, hkv, D, dtype=dtype)
    v = torch.randn(B, nk, hkv, D, dtype=dtype)
    return q, k, v


def _finite(lse):
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _expected_grads(dout, q, k, v, causal, window, dlse):
    """fp64 reference backward on the fp64 oracle's out/lse (handles rows that see no key)."""
    qd, kd, vd = q.double(), k.double(), v.double()
    out, lse = naive_attention(qd, kd, vd, causal, None, window)
    return reference_attn_backward(dout.double(), qd, kd, vd, out, lse.float(), causal, None, window,
                                   dlse=dlse.double())


CASES = [  # B, Nq, Nk, H, Hkv, D, causal, window
    (1, 37, 37, 2, 2, 32, True, (-1, -1)),
    (2, 33, 33, 2, 2, 64, False, (-1, -1)),
    (1, 21, 50, 4, 2, 32, True, (-1, -1)),  # Nq < Nk: bottom-right diagonal
    (1, 50, 21, 2, 1, 32, True, (-1, -1)),  # Nq > Nk: the first 29 rows see no key
    (1, 40, 40, 4, 1, 32, True, (9, -1)),  # MQA, causal sliding window
    (1, 35, 44, 2, 1, 32, False, (6, 3)),  # two-sided window, Nq != Nk
    (1, 30, 30, 2, 2, 32, False, (-1, 4)),  # right window only
    (2, 1, 19, 2, 2, 32, True, (-1, -1)),  # one query row (decode step)
    (1, 19, 23, 2, 2, 96, True, (-1, -1)),  # head_dim not a power of two
    (1, 17, 17, 2, 2, 128, False, (-1, -1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,nq,nk,H,hkv,D,causal,window", CASES)
def test_matches_oracle_with_lse_gradient(B, nq, nk, H, hkv, D, causal, window, dtype):
    q, k, v = _qkv(B, nq, nk, H, hkv, D, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True, backend="triton")
    ref_out, ref_lse = naive_attention(q.detach(), k.detach(), v.detach(), causal, None, window)
    assert_close(out, ref_out.to(dtype), "out")
    assert_close(lse, ref_lse.float(), "lse")
    assert lse.dtype == torch.float32 and lse.shape == (B, H, nq)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and (out[torch.isinf(lse).transpose(1, 2)] == 0).all()

    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    ((out * dout).sum() + (_finite(lse) * dlse).sum()).backward()
    exp = _expected_grads(dout, q.detach(), k.detach(), v.detach(), causal, window, dlse)
    tol = GRAD_TOL[dtype]
    for name, got, want in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), exp):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        assert_close(got, want.to(dtype), name, atol=tol, rtol=tol)


def test_gradients_match_naive_autograd():
    """Same check through the fp64 oracle's own autograd (every row sees a key here)."""
    q, k, v = _qkv(1, 29, 41, 4, 2, 32, torch.float32)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="triton")
    ref_out, ref_lse = naive_attention(qd, kd, vd, causal=True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    ((ref_out * dout.double()).sum() + (ref_lse * dlse.double()).sum()).backward()
    for name, got, want in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
        assert_close(got, want.float(), name, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tma,early_dp", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["pointers", "tma", "pointers-early-dP", "tma-early-dP"])
@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32)])
def test_unequal_tiles_low_level_pair(bm, bn, tma, early_dp, monkeypatch):
    """attn_forward / attn_backward(dlse=...) with BLOCK_M != BLOCK_N, as the GPU configs use, through
    pointer loads and through the tensor-descriptor (TMA) loads that Hopper runs, with the backward's dP GEMM
    issued after P (default) or right behind S (EARLY_DP)."""
    from attention.triton import bwd as triton_bwd, fwd as triton_fwd
    tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": False}
    monkeypatch.setattr(triton_fwd, "_INTERPRET_CONFIG", tiles)
    monkeypatch.setattr(triton_bwd, "_INTERPRET_CONFIG", {**tiles, "EARLY_DP": early_dp})
    monkeypatch.setitem(triton_common.FEATURES, "interpret_tma", tma)
    for causal, window, nq, nk in ((True, (-1, -1), 45, 70), (False, (13, 5), 70, 45), (True, (20, -1), 66, 66)):
        q, k, v = _qkv(1, nq, nk, 2, 1, 32, torch.float32)
        out, lse = attn_forward(q, k, v, causal, None, window, backend="triton")
        ref_out, ref_lse = naive_attention(q, k, v, causal, None, window)
        assert_close(out, ref_out.float(), "out")
        assert_close(lse, ref_lse.float(), "lse")
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        grads = attn_backward(dout, q, k, v, out, lse, causal, None, window, dlse=dlse, backend="triton")
        exp = _expected_grads(dout, q, k, v, causal, window, dlse)
        for name, got, want in zip(("dq", "dk", "dv"), grads, exp):
            assert_close(got, want.float(), name, atol=1e-4, rtol=1e-4)


def test_backward_is_deterministic_for_gqa():
    q, k, v = _qkv(1, 40, 40, 4, 1, 32, torch.float16)
    out, lse = attn_forward(q, k, v, True, None, (-1, -1), backend="triton")
    dout = torch.randn_like(out)
    first = attn_backward(dout, q, k, v, out, lse, True, backend="triton")
    second = attn_backward(dout, q, k, v, out, lse, True, backend="triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


VARLEN_CASES = [  # q doc lengths, k doc lengths, Hkv, causal, window
    ([7, 0, 19, 1, 12], [7, 0, 19, 1, 12], 2, True, (-1, -1)),  # odd lengths and an empty document
    ([13, 5, 22], [9, 17, 22], 1, True, (-1, -1)),  # Nq != Nk per document, MQA
    ([9, 6, 20], [9, 0, 20], 2, False, (4, 2)),  # a document with queries but no keys: lse -inf, out 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("len_q,len_k,hkv,causal,window", VARLEN_CASES)
def test_varlen_matches_per_document_oracle(len_q, len_k, hkv, causal, window, dtype):
    H, D = 2, 32
    cu_q = cu_seqlens(len_q)
    cu_k = cu_seqlens(len_k)
    q = torch.randn(sum(len_q), H, D, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(len_k), hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(len_k), hkv, D, dtype=dtype, requires_grad=True)
    args = (cu_q, cu_k, max(len_q), max(len_k))
    out, lse = flash_attn_varlen_func(q, k, v, *args, causal=causal, window_size=window, return_lse=True,
                                      backend="triton")
    ref_out, ref_lse = attn_varlen_forward(q.detach().double(), k.detach().double(), v.detach().double(), *args,
                                           causal, None, window, backend="reference")
    assert_close(out, ref_out.to(dtype), "out")
    assert_close(lse, ref_lse, "lse")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    ((out * dout).sum() + (_finite(lse) * dlse).sum()).backward()
    exp = attn_varlen_backward(dout.double(), q.detach().double(), k.detach().double(), v.detach().double(),
                               ref_out, ref_lse, *args, causal, None, window, dlse=dlse.double(),
                               backend="reference")
    tol = GRAD_TOL[dtype]
    for name, got, want in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), exp):
        assert torch.isfinite(got).all(), name
        assert_close(got, want.to(dtype), name, atol=tol, rtol=tol)


def test_varlen_tma_loads_stop_at_document_ends(monkeypatch):
    """Descriptor loads are shaped per document: rows past a document's end must read as zeros."""
    monkeypatch.setitem(triton_common.FEATURES, "interpret_tma", True)
    test_varlen_matches_per_document_oracle(*VARLEN_CASES[0], torch.float32)
    test_varlen_matches_per_document_oracle(*VARLEN_CASES[2], torch.float32)


def test_varlen_agrees_with_dense_batches():
    """Equal-length documents packed = the dense batched call."""
    q, k, v = _qkv(3, 21, 21, 2, 1, 32, torch.float32)
    out, lse = attn_forward(q, k, v, True, None, (-1, -1), backend="triton")
    cu = torch.arange(0, 64, 21, dtype=torch.int32)
    pack = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731  (B, N, H, D) -> (B*N, H, D)
    vout, vlse = attn_varlen_forward(pack(q), pack(k), pack(v), cu, cu, 21, 21, True, backend="triton")
    assert_close(vout, pack(out), "out")
    assert_close(vlse, lse.permute(1, 0, 2).reshape(2, -1), "lse")


def test_unsupported_inputs_raise_value_error(monkeypatch):
    q, k, v = _qkv(1, 8, 8, 2, 2, 48, torch.float32)
    with pytest.raises(ValueError, match="head_dim 48"):
        flash_attn_func(q, k, v, backend="triton")
    q, k, v = _qkv(1, 8, 8, 2, 2, 256, torch.float32)
    flash_attn_func(q, k, v, backend="triton")  # 256 is fine forward ...
    with pytest.raises(ValueError, match="head_dim 256"):  # ... but not backward
        attn_backward(q, q, k, v, q, torch.zeros(1, 2, 8), backend="triton")
    q, k, v = _qkv(1, 8, 8, 2, 2, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        flash_attn_func(q, k, v, backend="triton")
    q, k, v = _qkv(1, 8, 8, 2, 2, 32, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        flash_attn_func(q, k, v, backend="triton")
    from attention.triton import fwd as triton_fwd
    monkeypatch.setattr(triton_fwd, "INTERPRET", False)
    q, k, v = _qkv(1, 8, 8, 2, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="needs CUDA"):
        flash_attn_func(q, k, v, backend="triton")
    assert "triton" in attention.available_backends()
