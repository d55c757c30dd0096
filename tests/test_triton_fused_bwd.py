"""The one-launch deterministic backward (FEATURES["fused_bwd"]: dK/dV and dQ programs in one grid) under the
CPU interpreter, against fp64 oracles; the GPU twin is in tests/test_triton_gpu.py.

Small fp32/fp16 shapes (the interpreter's bf16 dot is wrong).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from attention import attn_backward, attn_forward, attn_varlen_backward, attn_varlen_forward  # noqa: E402
from test_triton_atomic_dq import CASES, VARLEN_CASES, _check_grads, _expected_grads, _qkv  # noqa: E402

triton_common = pytest.importorskip("attention.triton_common")
pytestmark = pytest.mark.skipif(not triton_common.INTERPRET,
                                reason="attention.triton_* was imported before TRITON_INTERPRET=1 was set")
from attention import triton_bwd  # noqa: E402


@pytest.fixture
def fused(monkeypatch):
    """Turns the one-launch backward on and records the kernels the backward launches."""
    monkeypatch.setitem(triton_common.FEATURES, "fused_bwd", True)
    seen, real = [], triton_bwd.launch

    def spy(kernel, tuned, cfg, grid, args, kwargs, q):
        seen.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        return real(kernel, tuned, cfg, grid, args, kwargs, q)

    monkeypatch.setattr(triton_bwd, "launch", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,nq,nk,H,hkv,D,causal,window", CASES)
def test_fused_backward_matches_oracle(B, nq, nk, H, hkv, D, causal, window, dtype, fused):
    q, k, v = _qkv(B, nq, nk, H, hkv, D, dtype)
    out, lse = attn_forward(q, k, v, causal, None, window, backend="triton")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = attn_backward(dout, q, k, v, out, lse, causal, None, window, dlse=dlse, backend="triton")
    assert fused == ["_bwd_fused_kernel"]
    _check_grads(grads, _expected_grads(dout, q, k, v, causal, window, dlse), dtype)
    blind = torch.isinf(lse).transpose(1, 2)  # (B, Nq, H): rows that see no key
    assert (grads[0][blind] == 0).all()


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("tiles", [(16, 32, 32, 16), (32, 16, 16, 32)])
def test_fused_backward_unequal_tiles(tiles, tma, fused, monkeypatch):
    """dK/dV and dQ tiles of different shapes in one grid, through pointer and descriptor loads."""
    m, n, m2, n2 = tiles
    monkeypatch.setattr(triton_bwd, "_INTERPRET_FUSED",
                        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_M2": m2, "BLOCK_N2": n2, "WARP_SPEC": False})
    monkeypatch.setitem(triton_common.FEATURES, "interpret_tma", tma)
    for causal, window, nq, nk, hkv in ((True, (-1, -1), 45, 70, 1), (False, (13, 5), 70, 45, 2),
                                        (True, (20, -1), 66, 66, 1)):
        q, k, v = _qkv(2, nq, nk, 4, hkv, 32, torch.float32)
        out, lse = attn_forward(q, k, v, causal, None, window, backend="triton")
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        grads = attn_backward(dout, q, k, v, out, lse, causal, None, window, dlse=dlse, backend="triton")
        _check_grads(grads, _expected_grads(dout, q, k, v, causal, window, dlse), torch.float32)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("len_q,len_k,hkv,causal,window", VARLEN_CASES)
def test_fused_backward_varlen(len_q, len_k, hkv, causal, window, tma, fused, monkeypatch):
    monkeypatch.setitem(triton_common.FEATURES, "interpret_tma", tma)
    H, D = 4, 32
    cu_q = torch.tensor([0, *torch.tensor(len_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(len_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(len_q), H, D)
    k, v = (torch.randn(sum(len_k), hkv, D) for _ in range(2))
    args = (cu_q, cu_k, max(len_q), max(len_k), causal, None, window)
    out, lse = attn_varlen_forward(q, k, v, *args, backend="triton")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = attn_varlen_backward(dout, q, k, v, out, lse, *args, dlse=dlse, backend="triton")
    assert fused == ["_bwd_fused_kernel"]
    ref_out, ref_lse = attn_varlen_forward(q.double(), k.double(), v.double(), *args, backend="reference")
    exp = attn_varlen_backward(dout.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, *args,
                               dlse=dlse.double(), backend="reference")
    _check_grads(grads, exp, torch.float32)
    assert (grads[0][torch.isinf(lse).T] == 0).all()
