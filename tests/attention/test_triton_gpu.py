"""Triton kernels on the GPU at real sizes (bf16/fp16) against the reference computed in fp32 on the GPU.

    pytest -m gpu tests/attention/test_triton_gpu.py -q

Errors are relative norms ||got - ref|| / ||ref|| (bf16 operands land between 1e-3 and 1e-2).
"""

import pytest
import torch
from gpu_utils import GPU_MARKS, cuda_qkv, rel_err
from helpers import cu_seqlens

from attention import (attn_backward, attn_forward, attn_varlen_backward, attn_varlen_forward, flash_attn_func,
                       reference_attn_backward, reference_attn_forward)

pytestmark = GPU_MARKS

OUT_TOL, GRAD_TOL = 1e-2, 2e-2




CASES = [  # B, Nq, Nk, H, Hkv, D, causal, window, dtype
    (2, 4096, 4096, 8, 8, 128, True, (-1, -1), torch.bfloat16),
    (2, 4096, 4096, 8, 2, 64, False, (-1, -1), torch.float16),
    (2, 4096, 4096, 8, 8, 64, True, (-1, -1), torch.bfloat16),
    (1, 3000, 4097, 8, 1, 128, True, (-1, -1), torch.bfloat16),  # Nq < Nk, MQA
    (1, 4097, 3000, 4, 4, 64, True, (-1, -1), torch.float16),  # Nq > Nk: 1097 rows see no key
    (2, 2048, 2048, 8, 4, 128, True, (256, -1), torch.bfloat16),  # causal sliding window
    (1, 1000, 1500, 4, 2, 96, False, (100, 50), torch.bfloat16),  # two-sided window, odd head_dim
    (1, 777, 777, 4, 4, 32, True, (-1, -1), torch.float16),
]


@pytest.mark.parametrize("B,nq,nk,H,hkv,D,causal,window,dtype", CASES)
def test_forward_backward_match_fp32_reference(B, nq, nk, H, hkv, D, causal, window, dtype):
    q, k, v = cuda_qkv(B, nq, nk, H, hkv, D, dtype)
    out, lse = attn_forward(q, k, v, causal, None, window, backend="triton")
    ref_out, ref_lse = reference_attn_forward(q.float(), k.float(), v.float(), causal, None, window)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel_err(out, ref_out) < OUT_TOL
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 2e-2
    assert (out.transpose(1, 2)[~fin] == 0).all()

    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    grads = attn_backward(dout, q, k, v, out, lse, causal, None, window, dlse=dlse, backend="triton")
    want = reference_attn_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, causal, None,
                                   window, dlse=dlse)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert g.dtype == dtype, name
        assert rel_err(g, w) < GRAD_TOL, name


def test_autograd_path_and_head_dim_256_forward():
    q, k, v = cuda_qkv(1, 2048, 2048, 4, 4, 128, torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="triton")
    (out.float().square().sum() + lse.sum()).backward()
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference_attn_forward(qf, kf, vf, True)
    g_out, g_lse = 2 * out.detach().float(), torch.ones_like(lse)
    want = reference_attn_backward(g_out, qf, kf, vf, ref_out, ref_lse, True, dlse=g_lse)
    for name, g, w in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), want):
        assert rel_err(g, w) < GRAD_TOL, name

    q, k, v = cuda_qkv(1, 1024, 1024, 4, 4, 256, torch.bfloat16)
    out, lse = attn_forward(q, k, v, True, None, (-1, -1), backend="triton")
    ref_out, _ = reference_attn_forward(q.float(), k.float(), v.float(), True)
    assert rel_err(out, ref_out) < OUT_TOL


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (300, 0))])
def test_varlen_packed_documents(causal, window):
    lens = [1000, 0, 1, 2049, 517, 4096]
    cu = cu_seqlens(lens, "cuda")
    q, k, v = (t[0] for t in cuda_qkv(1, sum(lens), sum(lens), 8, 2, 128, torch.bfloat16))
    args = (cu, cu, max(lens), max(lens), causal, None, window)
    out, lse = attn_varlen_forward(q, k, v, *args, backend="triton")
    ref_out, ref_lse = attn_varlen_forward(q.float(), k.float(), v.float(), *args, backend="reference")
    assert rel_err(out, ref_out) < OUT_TOL
    assert (lse - ref_lse).abs().max().item() < 2e-2
    dout = torch.randn_like(out)
    grads = attn_varlen_backward(dout, q, k, v, out, lse, *args, backend="triton")
    want = attn_varlen_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, *args,
                                backend="reference")
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert rel_err(g, w) < GRAD_TOL, name


def test_backward_deterministic_gqa():
    q, k, v = cuda_qkv(1, 4096, 4096, 16, 2, 128, torch.bfloat16)
    out, lse = attn_forward(q, k, v, True, None, (-1, -1), backend="triton")
    dout = torch.randn_like(out)
    first = attn_backward(dout, q, k, v, out, lse, True, backend="triton")
    second = attn_backward(dout, q, k, v, out, lse, True, backend="triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
