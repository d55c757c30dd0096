"""The atomic-dQ Triton backward (deterministic=False) on the GPU at real sizes, against the fp32 reference.

    pytest -m gpu tests/attention/test_triton_atomic_dq_gpu.py -q

Each case runs with pointer loads + per-element atomics (the default) and with TMA loads + TMA reduce-add
(FEATURES["tma_reduce"]; Hopper only). Errors are relative norms, tolerances as in tests/attention/test_triton_gpu.py.
"""

import pytest
import torch
from gpu_utils import GPU_MARKS, cuda_qkv, rel_err
from helpers import cu_seqlens

import attention
from attention import (attn_backward, attn_forward, attn_varlen_backward, attn_varlen_forward, flash_attn_func,
                       reference_attn_backward, reference_attn_forward)

pytestmark = GPU_MARKS

GRAD_TOL = 2e-2




@pytest.fixture(params=[False, True], ids=["ptr_atomics", "tma_reduce"])
def tma_reduce(request, monkeypatch):
    from attention.triton import common as triton_common
    if request.param and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA reduce-add needs sm_90+")
    monkeypatch.setitem(triton_common.FEATURES, "tma_reduce", request.param)
    yield request.param
    assert triton_common.FEATURES["tma"], f"TMA path switched itself off: {triton_common.FEATURES['tma_error']}"


CASES = [  # B, Nq, Nk, H, Hkv, D, causal, window, dtype
    (2, 4096, 4096, 8, 8, 128, True, (-1, -1), torch.bfloat16),
    (2, 4096, 4096, 8, 2, 128, False, (-1, -1), torch.bfloat16),  # GQA
    (2, 4096, 4096, 8, 2, 64, True, (-1, -1), torch.float16),
    (1, 1000, 1000, 8, 8, 64, False, (-1, -1), torch.bfloat16),
    (1, 1000, 1500, 8, 1, 128, True, (-1, -1), torch.float16),  # Nq < Nk, MQA
    (1, 1500, 1000, 4, 2, 64, True, (-1, -1), torch.bfloat16),  # Nq > Nk: 500 rows see no key
    (2, 2048, 2048, 8, 4, 128, True, (256, -1), torch.bfloat16),  # causal sliding window
    (1, 1000, 1000, 4, 2, 96, False, (100, 50), torch.bfloat16),  # two-sided window, odd head_dim
]


@pytest.mark.parametrize("B,nq,nk,H,hkv,D,causal,window,dtype", CASES)
def test_atomic_backward_matches_fp32_reference(B, nq, nk, H, hkv, D, causal, window, dtype, tma_reduce):
    q, k, v = cuda_qkv(B, nq, nk, H, hkv, D, dtype)
    out, lse = attn_forward(q, k, v, causal, None, window, backend="triton")
    ref_out, ref_lse = reference_attn_forward(q.float(), k.float(), v.float(), causal, None, window)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = attn_backward(dout, q, k, v, out, lse, causal, None, window, dlse=dlse, backend="triton",
                          deterministic=False)
    want = reference_attn_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, causal, None,
                                   window, dlse=dlse)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert rel_err(g, w) < GRAD_TOL, name
    assert (grads[0].transpose(1, 2)[torch.isinf(ref_lse)] == 0).all()  # rows that see no key
    det = attn_backward(dout, q, k, v, out, lse, causal, None, window, dlse=dlse, backend="triton")
    for name, a, b in zip(("dq", "dk", "dv"), grads, det):  # the two modes differ in rounding only
        assert rel_err(a, b) < 1e-2, name


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (300, 0))])
def test_atomic_varlen_packed_documents(causal, window, tma_reduce):
    lens = [1000, 0, 1, 2049, 517, 4096]
    cu = cu_seqlens(lens, "cuda")
    q, k, v = (t[0] for t in cuda_qkv(1, sum(lens), sum(lens), 8, 2, 128, torch.bfloat16))
    args = (cu, cu, max(lens), max(lens), causal, None, window)
    out, lse = attn_varlen_forward(q, k, v, *args, backend="triton")
    ref_out, ref_lse = attn_varlen_forward(q.float(), k.float(), v.float(), *args, backend="reference")
    dout = torch.randn_like(out)
    grads = attn_varlen_backward(dout, q, k, v, out, lse, *args, backend="triton", deterministic=False)
    want = attn_varlen_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, *args,
                                backend="reference")
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert rel_err(g, w) < GRAD_TOL, name


def test_autograd_with_set_deterministic_false(tma_reduce):
    q, k, v = (t.requires_grad_() for t in cuda_qkv(1, 4096, 4096, 16, 2, 128, torch.bfloat16))
    attention.set_deterministic(False)
    try:
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="triton")
        (out.float().square().sum() + lse.sum()).backward()
    finally:
        attention.set_deterministic(True)
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    ref_out, ref_lse = reference_attn_forward(qf, kf, vf, True)
    want = reference_attn_backward(2 * out.detach().float(), qf, kf, vf, ref_out, ref_lse, True,
                                   dlse=torch.ones_like(lse))
    for name, g, w in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), want):
        assert rel_err(g, w) < GRAD_TOL, name
