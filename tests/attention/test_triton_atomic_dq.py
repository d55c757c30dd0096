"""The opt-in atomic-dQ Triton backward (deterministic=False) under the CPU interpreter, against fp64 oracles,
and how the mode is chosen (per call, global default, env, torch deterministic mode).

Small fp32/fp16 shapes (the interpreter's bf16 dot is wrong; bf16 is in tests/attention/test_triton_atomic_dq_gpu.py).
"""

import os


import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import attention  # noqa: E402
from attention import (attn_backward, attn_forward, attn_varlen_backward, attn_varlen_forward,  # noqa: E402
                       flash_attn_func, reference_attn_backward)
from attention import backends  # noqa: E402
from helpers import ROOT, assert_close, cu_seqlens, naive_attention  # noqa: E402

triton_common = pytest.importorskip("attention.triton.common")
pytestmark = pytest.mark.skipif(not triton_common.INTERPRET,
                                reason="attention.triton_* was imported before TRITON_INTERPRET=1 was set")
from attention.triton import bwd as triton_bwd  # noqa: E402

GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _restore_default():
    saved = backends._DETERMINISTIC[0]
    yield
    backends._DETERMINISTIC[0] = saved


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, ATOMIC_DQ) for every dK/dV or dQ kernel launch of the Triton backward."""
    seen, real = [], triton_bwd.launch

    def spy(kernel, tuned, cfg, grid, args, kwargs, q, **opts):
        seen.append((kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__,
                     kwargs.get("ATOMIC_DQ")))
        return real(kernel, tuned, cfg, grid, args, kwargs, q, **opts)

    monkeypatch.setattr(triton_bwd, "launch", spy)
    return seen


ATOMIC = [("_dkdv_kernel", True)]
DETERMINISTIC = [("_dkdv_kernel", False), ("_dq_kernel", None)]


def _qkv(B, nq, nk, H, hkv, D, dtype):
    return torch.randn(B, nq, H, D, dtype=dtype), torch.randn(B, nk, hkv, D, dtype=dtype), \
        torch.randn(B, nk, hkv, D, dtype=dtype)


def _expected_grads(dout, q, k, v, causal, window, dlse):
    """fp64 reference backward at the fp64 oracle's out/lse (handles rows that see no key)."""
    qd, kd, vd = q.double(), k.double(), v.double()
    out, lse = naive_attention(qd, kd, vd, causal, None, window)
    return reference_attn_backward(dout.double(), qd, kd, vd, out, lse.float(), causal, None, window,
                                   dlse=dlse.double())


def _check_grads(grads, exp, dtype, tol=None):
    tol = GRAD_TOL[dtype] if tol is None else tol
    for name, got, want in zip(("dq", "dk", "dv"), grads, exp):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        assert_close(got, want.to(dtype), name, atol=tol, rtol=tol)


CASES = [  # B, Nq, Nk, H, Hkv, D, causal, window
    (1, 37, 37, 2, 2, 32, True, (-1, -1)),
    (2, 33, 33, 2, 2, 32, False, (-1, -1)),
    (1, 21, 50, 4, 2, 32, True, (-1, -1)),  # Nq < Nk: bottom-right diagonal, GQA
    (1, 50, 21, 4, 2, 32, True, (-1, -1)),  # Nq > Nk: the first 29 rows see no key
    (1, 40, 40, 4, 1, 32, True, (9, -1)),  # MQA, causal sliding window
    (1, 35, 44, 2, 1, 32, False, (6, 3)),  # two-sided window, Nq != Nk
    (1, 30, 30, 2, 2, 32, False, (-1, 4)),  # right window only
    (1, 19, 23, 2, 2, 96, True, (-1, -1)),  # head_dim not a power of two: padded columns in the atomics
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,nq,nk,H,hkv,D,causal,window", CASES)
def test_atomic_dq_matches_oracle(B, nq, nk, H, hkv, D, causal, window, dtype, launches):
    q, k, v = _qkv(B, nq, nk, H, hkv, D, dtype)
    out, lse = attn_forward(q, k, v, causal, None, window, backend="triton")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = attn_backward(dout, q, k, v, out, lse, causal, None, window, dlse=dlse, backend="triton",
                          deterministic=False)
    assert launches == ATOMIC
    _check_grads(grads, _expected_grads(dout, q, k, v, causal, window, dlse), dtype)
    blind = torch.isinf(lse).transpose(1, 2)  # (B, Nq, H): rows that see no key
    assert (grads[0][blind] == 0).all()


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32)])
def test_atomic_dq_unequal_tiles(bm, bn, tma, monkeypatch):
    """BLOCK_M != BLOCK_N as the GPU configs use, through pointer loads and through the descriptor loads."""
    monkeypatch.setattr(triton_bwd, "_INTERPRET_CONFIG", {"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": False})
    monkeypatch.setitem(triton_common.FEATURES, "interpret_tma", tma)
    monkeypatch.setitem(triton_common.FEATURES, "tma_reduce", tma)  # the atomic kernel loads by TMA only with it
    for causal, window, nq, nk in ((True, (-1, -1), 45, 70), (False, (13, 5), 70, 45), (True, (20, -1), 66, 66)):
        q, k, v = _qkv(1, nq, nk, 2, 1, 32, torch.float32)
        out, lse = attn_forward(q, k, v, causal, None, window, backend="triton")
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        grads = attn_backward(dout, q, k, v, out, lse, causal, None, window, dlse=dlse, backend="triton",
                              deterministic=False)
        _check_grads(grads, _expected_grads(dout, q, k, v, causal, window, dlse), torch.float32)


VARLEN_CASES = [  # q doc lengths, k doc lengths, Hkv, causal, window
    ([7, 0, 19, 1, 13], [7, 0, 19, 1, 13], 2, True, (-1, -1)),  # odd lengths and an empty document
    ([13, 5, 23], [9, 17, 23], 1, True, (-1, -1)),  # Nq != Nk per document, MQA
    ([9, 6, 21], [9, 0, 21], 2, False, (4, 2)),  # a document with queries but no keys: dq 0 there
]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("len_q,len_k,hkv,causal,window", VARLEN_CASES)
def test_atomic_dq_varlen(len_q, len_k, hkv, causal, window, dtype, tma, monkeypatch, launches):
    monkeypatch.setitem(triton_common.FEATURES, "interpret_tma", tma)
    monkeypatch.setitem(triton_common.FEATURES, "tma_reduce", tma)  # the atomic kernel loads by TMA only with it
    H, D = 4, 32
    cu_q = cu_seqlens(len_q)
    cu_k = cu_seqlens(len_k)
    q = torch.randn(sum(len_q), H, D, dtype=dtype)
    k, v = (torch.randn(sum(len_k), hkv, D, dtype=dtype) for _ in range(2))
    args = (cu_q, cu_k, max(len_q), max(len_k), causal, None, window)
    out, lse = attn_varlen_forward(q, k, v, *args, backend="triton")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = attn_varlen_backward(dout, q, k, v, out, lse, *args, dlse=dlse, backend="triton", deterministic=False)
    assert launches == ATOMIC
    ref_out, ref_lse = attn_varlen_forward(q.double(), k.double(), v.double(), *args, backend="reference")
    exp = attn_varlen_backward(dout.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, *args,
                               dlse=dlse.double(), backend="reference")
    _check_grads(grads, exp, dtype)
    assert (grads[0][torch.isinf(lse).T] == 0).all()


def test_autograd_follows_global_default(launches):
    """flash_attn_func's backward (and so ring / trainer) picks the mode up from set_deterministic."""
    q, k, v = _qkv(1, 29, 41, 4, 2, 32, torch.float32)
    assert attention.get_deterministic()  # the default (this test process does not set the env)
    results = {}
    for flag in (True, False):
        attention.set_deterministic(flag)
        launches.clear()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = flash_attn_func(*leaves, causal=True, return_lse=True, backend="triton")
        (out.square().sum() + lse.sum()).backward()
        assert launches == (DETERMINISTIC if flag else ATOMIC)
        results[flag] = [t.grad for t in leaves]
    for name, a, b in zip(("dq", "dk", "dv"), results[True], results[False]):
        assert_close(b, a, name, atol=1e-5, rtol=1e-5)


def test_torch_deterministic_mode_wins(launches):
    q, k, v = _qkv(1, 20, 20, 2, 2, 32, torch.float32)
    out, lse = attn_forward(q, k, v, True, None, (-1, -1), backend="triton")
    attention.set_deterministic(False)
    assert not attention.get_deterministic()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert attention.get_deterministic()
        attn_backward(out, q, k, v, out, lse, True, backend="triton")
        attn_backward(out, q, k, v, out, lse, True, backend="triton", deterministic=False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert launches == DETERMINISTIC * 2
    launches.clear()
    attn_backward(out, q, k, v, out, lse, True, backend="triton", deterministic=True)  # explicit beats global
    assert launches == DETERMINISTIC


def test_other_backends_accept_and_ignore_the_flag():
    q, k, v = _qkv(1, 20, 24, 2, 1, 32, torch.float64)
    out, lse = attn_forward(q, k, v, True, None, (-1, -1), backend="reference")
    want = attn_backward(out, q, k, v, out, lse, True, backend="reference")
    for backend in ("reference", "sdpa"):
        got = attn_backward(out, q, k, v, out, lse, True, backend=backend, deterministic=False)
        for a, b in zip(got, want):
            assert_close(a, b, backend)
    cu = torch.tensor([0, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 24], dtype=torch.int32)
    got = attn_varlen_backward(out[0], q[0], k[0], v[0], out[0], lse[0], cu, cu_k, 20, 24, True,
                               backend="reference", deterministic=False)
    for a, b in zip(got, want):
        assert_close(a, b[0], "varlen")


def test_bad_flag_raises_value_error():
    q, k, v = _qkv(1, 8, 8, 2, 2, 32, torch.float32)
    out, lse = attn_forward(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="deterministic"):
        attn_backward(out, q, k, v, out, lse, backend="triton", deterministic="no")
    with pytest.raises(ValueError, match="flag"):
        attention.set_deterministic(0)


@pytest.mark.parametrize("env,want", [("0", False), ("1", True), (None, True)])
def test_env_sets_the_initial_default(env, want):
    envs = {k: v for k, v in os.environ.items() if k != "RINGFLASH_DETERMINISTIC"}
    if env is not None:
        envs["RINGFLASH_DETERMINISTIC"] = env
    root = str(ROOT)
    res = subprocess.run([sys.executable, "-c", "import attention; print(attention.get_deterministic())"],
                         env=envs, cwd=root, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == str(want)
