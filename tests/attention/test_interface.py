"""Public functions: varlen == per-document attention, backend dispatch, ValueErrors that name the argument."""

import pytest
import torch

from attention import (attn_backward, attn_forward, attn_varlen_backward, attn_varlen_forward, flash_attn_func,
                       flash_attn_varlen_func)
from attention.backends import resolve_backend_name
from attn_oracle import oracle
from helpers import assert_close, cu_seqlens

I32 = torch.int32


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (False, (3, 2))])
def test_varlen_equals_per_document(causal, window):
    # odd lengths, an empty document (0 queries, 0 keys), Nq != Nk per document both ways, a doc with
    # queries but no keys (out 0, lse -inf)
    lens_q, lens_k = [5, 0, 9, 4, 3], [7, 0, 6, 4, 0]
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    H, hkv, D = 4, 2, 8
    q = torch.randn(sum(lens_q), H, D, requires_grad=True)
    k = torch.randn(sum(lens_k), hkv, D, requires_grad=True)
    v = torch.randn(sum(lens_k), hkv, D, requires_grad=True)
    dout, dlse = torch.randn_like(q), torch.randn(H, sum(lens_q))
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                      window_size=window, return_lse=True)
    assert out.shape == q.shape and lse.shape == (H, sum(lens_q)) and lse.dtype == torch.float32
    ((out * dout).sum() + (torch.where(torch.isinf(lse), 0, lse) * dlse).sum()).backward()
    e_dq, e_dk, e_dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b in range(len(lens_q)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lens_q[b] == 0:
            continue
        if lens_k[b] == 0:
            assert (out[sq] == 0).all() and torch.isneginf(lse[:, sq]).all()
            continue
        e_out, e_lse, dq, dk, dv = oracle(q[sq][None], k[sk][None], v[sk][None], dout[sq][None],
                                          dlse[:, sq][None], causal, None, window)
        assert_close(out[sq], e_out[0], f"out doc {b}")
        assert_close(lse[:, sq], e_lse[0], f"lse doc {b}")
        e_dq[sq], e_dk[sk], e_dv[sk] = dq[0].float(), dk[0].float(), dv[0].float()
    assert_close(q.grad, e_dq, "dq")
    assert_close(k.grad, e_dk, "dk")
    assert_close(v.grad, e_dv, "dv")


def test_varlen_low_level_pair_matches_dense_per_document():
    lens = [6, 11]
    cu = cu_seqlens(lens)
    q, k, v = torch.randn(17, 2, 8), torch.randn(17, 2, 8), torch.randn(17, 2, 8)
    out, lse = attn_varlen_forward(q, k, v, cu, cu, 11, 11, causal=True, backend="reference")
    dout = torch.randn_like(out)
    dq, dk, dv = attn_varlen_backward(dout, q, k, v, out, lse, cu, cu, 11, 11, causal=True, backend="reference")
    for a, b in ((0, 6), (6, 17)):
        o, l = attn_forward(q[None, a:b], k[None, a:b], v[None, a:b], causal=True, backend="reference")
        g = attn_backward(dout[None, a:b], q[None, a:b], k[None, a:b], v[None, a:b], o, l, causal=True,
                          backend="reference")
        assert_close(out[a:b], o[0], "out")
        assert_close(lse[:, a:b], l[0], "lse")
        for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), g):
            assert_close(got[a:b], want[0], name)


# -- backend dispatch -----------------------------------------------------------------------------------------


def test_auto_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("ATTN_BACKEND", raising=False)
    assert resolve_backend_name("auto", torch.device("cpu")) == "reference"
    assert resolve_backend_name("sdpa", torch.device("cpu")) == "sdpa"


def test_env_override(monkeypatch):
    monkeypatch.setenv("ATTN_BACKEND", "sdpa")
    assert resolve_backend_name("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend_name("reference", torch.device("cpu")) == "reference"  # explicit wins
    q, k, v = torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    out = flash_attn_func(q, k, v, causal=True)
    assert_close(out, flash_attn_func(q, k, v, causal=True, backend="reference"), "out")
    monkeypatch.setenv("ATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        flash_attn_func(q, k, v)


def test_unknown_backend_raises():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="backend"):
        flash_attn_func(q, q, q, backend="cuda-magic")
    with pytest.raises(ValueError, match="backend"):
        attn_forward(q, q, q, backend="cuda-magic")


# -- bad input: every public function raises ValueError naming the argument -----------------------------------


def _dense_calls(q, k, v, **kw):
    """Each public dense entry point called on (q, k, v); backward gets well-formed out/lse for q's shape."""
    def fwd_func():
        flash_attn_func(q, k, v, **kw)

    def fwd_low():
        attn_forward(q, k, v, **kw)

    def bwd_low():
        shape = q.shape if q.dim() == 4 else (1, 1, 1, 1)
        out = torch.zeros(shape)
        attn_backward(out, q, k, v, out, torch.zeros(shape[0], shape[2], shape[1]), **kw)
    return [fwd_func, fwd_low, bwd_low]


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


BAD_DENSE = [
    ("rank", (_t(2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8)), {}, "q must be 4-D"),
    ("k rank", (_t(1, 3, 2, 8), _t(2, 2, 8), _t(2, 2, 8)), {}, "k must be 4-D"),
    ("batch", (_t(2, 3, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8)), {}, "batch"),
    ("head_dim", (_t(1, 3, 2, 8), _t(1, 3, 2, 16), _t(1, 3, 2, 16)), {}, "head_dim"),
    ("heads", (_t(1, 3, 3, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8)), {}, "heads"),
    ("k/v", (_t(1, 3, 2, 8), _t(1, 3, 2, 8), _t(1, 4, 2, 8)), {}, "k .* and v"),
    ("int dtype", (_t(1, 3, 2, 8, dtype=torch.int64),) * 3, {}, "q dtype"),
    ("mixed dtype", (_t(1, 3, 2, 8), _t(1, 3, 2, 8, dtype=torch.float64), _t(1, 3, 2, 8)), {}, "k dtype"),
    ("device", (_t(1, 3, 2, 8), _t(1, 3, 2, 8, device="meta"), _t(1, 3, 2, 8)), {}, "k is on meta"),
    ("not a tensor", (_t(1, 3, 2, 8), [1.0], _t(1, 3, 2, 8)), {}, "k must be a torch.Tensor"),
    ("empty seq", (_t(1, 0, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8)), {}, "sequence lengths"),
    ("window neg", (_t(1, 3, 2, 8),) * 3, {"window_size": (-2, 0)}, "window_size"),
    ("window len", (_t(1, 3, 2, 8),) * 3, {"window_size": (1,)}, "window_size"),
    ("window float", (_t(1, 3, 2, 8),) * 3, {"window_size": (1.5, 2)}, "window_size"),
    ("scale zero", (_t(1, 3, 2, 8),) * 3, {"softmax_scale": 0.0}, "softmax_scale"),
    ("scale neg", (_t(1, 3, 2, 8),) * 3, {"softmax_scale": -1.0}, "softmax_scale"),
    ("scale str", (_t(1, 3, 2, 8),) * 3, {"softmax_scale": "0.1"}, "softmax_scale"),
]


@pytest.mark.parametrize("name,qkv,kw,match", BAD_DENSE, ids=[b[0] for b in BAD_DENSE])
def test_dense_bad_input(name, qkv, kw, match):
    for call in _dense_calls(*qkv, **kw):
        with pytest.raises(ValueError, match=match):
            call()


def test_attn_backward_bad_out_lse_dlse():
    q = _t(1, 3, 2, 8)
    good_lse = _t(1, 2, 3)
    with pytest.raises(ValueError, match="dout"):
        attn_backward(_t(1, 4, 2, 8), q, q, q, q, good_lse)
    with pytest.raises(ValueError, match="out"):
        attn_backward(q, q, q, q, _t(1, 3, 2, 4), good_lse)
    with pytest.raises(ValueError, match="lse must be"):
        attn_backward(q, q, q, q, q, _t(1, 3, 2))
    with pytest.raises(ValueError, match="dlse must be"):
        attn_backward(q, q, q, q, q, good_lse, dlse=_t(2, 3))


def _varlen_calls(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
    def fwd_func():
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    def fwd_low():
        attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    def bwd_low():
        out = torch.zeros(q.shape) if q.dim() == 3 else torch.zeros(1, 1, 1)
        attn_varlen_backward(out, q, k, v, out, torch.zeros(out.shape[1], out.shape[0]), cu_q, cu_k, max_q,
                             max_k, **kw)
    return [fwd_func, fwd_low, bwd_low]


CU = torch.tensor([0, 3, 7], dtype=I32)
BAD_VARLEN = [
    ("rank", (_t(1, 7, 2, 8), _t(7, 2, 8), _t(7, 2, 8), CU, CU, 4, 4), "q must be 3-D"),
    ("head_dim", (_t(7, 2, 8), _t(7, 2, 4), _t(7, 2, 4), CU, CU, 4, 4), "head_dim"),
    ("heads", (_t(7, 3, 8), _t(7, 2, 8), _t(7, 2, 8), CU, CU, 4, 4), "heads"),
    ("int dtype", (_t(7, 2, 8, dtype=torch.int32),) * 3 + (CU, CU, 4, 4), "dtype"),
    ("cu int64", (_t(7, 2, 8),) * 3 + (CU.long(), CU, 4, 4), "cu_seqlens_q must be int32"),
    ("cu 2-D", (_t(7, 2, 8),) * 3 + (CU, CU[None], 4, 4), "cu_seqlens_k must be a 1-D"),
    ("cu start", (_t(7, 2, 8),) * 3 + (torch.tensor([1, 3, 7], dtype=I32), CU, 4, 4), "cu_seqlens_q must start"),
    ("cu decreasing", (_t(7, 2, 8),) * 3 + (CU, torch.tensor([0, 8, 7], dtype=I32), 4, 4),
     "cu_seqlens_k .*non-decreasing"),
    ("cu end", (_t(7, 2, 8),) * 3 + (torch.tensor([0, 3, 6], dtype=I32), CU, 4, 4), "cu_seqlens_q .*end at 7"),
    ("cu count", (_t(7, 2, 8),) * 3 + (CU, torch.tensor([0, 7], dtype=I32), 7, 7), "sequences"),
    ("cu device", (_t(7, 2, 8),) * 3 + (CU.to("meta"), CU, 4, 4), "cu_seqlens_q is on meta"),
    ("max_seqlen", (_t(7, 2, 8),) * 3 + (CU, CU, 3, 4), "max_seqlen_q"),
]


@pytest.mark.parametrize("name,args,match", BAD_VARLEN, ids=[b[0] for b in BAD_VARLEN])
def test_varlen_bad_input(name, args, match):
    for call in _varlen_calls(*args):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("kw,match", [({"window_size": (0, -3)}, "window_size"),
                                      ({"softmax_scale": -0.5}, "softmax_scale")])
def test_varlen_bad_options(kw, match):
    for call in _varlen_calls(_t(7, 2, 8), _t(7, 2, 8), _t(7, 2, 8), CU, CU, 4, 4, **kw):
        with pytest.raises(ValueError, match=match):
            call()
