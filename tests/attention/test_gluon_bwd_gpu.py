"""The Gluon Hopper backward on an sm_90 GPU against the fp32 reference and against the Triton backward.

    pytest -m gpu tests/attention/test_gluon_bwd_gpu.py -q

Skipped where the Gluon kernels cannot run (another GPU or triton version: attention.gluon.hopper_ready).
Errors are relative norms, tolerances as in tests/attention/test_triton_gpu.py.
"""

import pytest
import torch
from gpu_utils import GPU_MARKS, cuda_qkv, gluon_skip, rel_err

from attention import reference_attn_backward, reference_attn_forward


pytestmark = [*GPU_MARKS, gluon_skip()]

GRAD_TOL = 2e-2

CASES = [  # B, Nq, Nk, H, Hkv, D, causal, window, dtype
    (2, 1024, 1024, 8, 8, 128, True, (-1, -1), torch.bfloat16),
    (2, 1024, 1024, 8, 8, 128, False, (-1, -1), torch.bfloat16),
    (2, 1024, 1024, 8, 2, 64, True, (-1, -1), torch.bfloat16),
    (1, 1024, 1024, 8, 1, 64, False, (-1, -1), torch.float16),
    (1, 1000, 1000, 8, 2, 128, True, (-1, -1), torch.bfloat16),  # ragged: not a multiple of any block
    (1, 1000, 1000, 8, 8, 64, False, (-1, -1), torch.bfloat16),
    (2, 200, 333, 8, 1, 128, True, (-1, -1), torch.bfloat16),  # Nq < Nk, MQA, shorter than the pipeline
    (1, 333, 200, 8, 2, 64, True, (-1, -1), torch.bfloat16),  # Nq > Nk: 133 rows see no key
    (1, 1024, 1024, 8, 2, 128, True, (64, 0), torch.bfloat16),  # causal sliding window
    (1, 1000, 1500, 8, 8, 128, False, (100, 50), torch.bfloat16),  # two-sided window, Nq != Nk
    (1, 1500, 1000, 8, 1, 64, False, (100, 50), torch.float16),  # two-sided window, rows that see nothing
    (1, 100, 1000, 8, 2, 128, True, (50, -1), torch.bfloat16),  # keys that no query sees: dK = dV = 0
    (1, 129, 64, 2, 2, 128, True, (-1, -1), torch.bfloat16),  # Nq > Nk inside one tile
    (1, 4096, 4096, 8, 4, 128, True, (-1, -1), torch.bfloat16),
]


def _grads(dout, q, k, v, out, lse, causal, window, dlse, deterministic):
    from attention.gluon.bwd import gluon_attn_backward
    scale = q.shape[-1] ** -0.5
    return gluon_attn_backward(dout, q, k, v, out, lse, causal, scale, window, dlse, deterministic=deterministic)


@pytest.mark.parametrize("mode", ["dq_kernel", "atomic_dq", "descending_dq", "split_atomic_dq"])
@pytest.mark.parametrize("with_dlse", [False, True], ids=["no_dlse", "dlse"])
@pytest.mark.parametrize("B,nq,nk,H,hkv,D,causal,window,dtype", CASES)
def test_gluon_backward_matches_fp32_reference_and_triton(B, nq, nk, H, hkv, D, causal, window, dtype, with_dlse,
                                                          mode, monkeypatch):
    """mode: deterministic (dq_kernel), non-deterministic (atomic_dq: causal key blocks without a window walk their
    query blocks last to first), deterministic with the L2 size seen as 0, so that it walks them that way too and
    splits GQA groups over programs (descending_dq), or non-deterministic with GQA groups split (split_atomic_dq:
    plan_bwd.split_group)."""
    from attention.gluon.bwd import WS_BWD_CONFIG
    from attention.gluon.plan_bwd import descending_walk
    from attention.triton.bwd import triton_attn_backward
    from attention.triton.fwd import triton_attn_forward
    deterministic = mode in ("dq_kernel", "descending_dq")
    if mode == "descending_dq":
        if D not in WS_BWD_CONFIG or not descending_walk(causal, window, nq, H // hkv, D, 0):
            pytest.skip("the deterministic backward walks first to last here whatever the L2")
        monkeypatch.setattr("attention.gluon.bwd.l2_bytes", lambda device: 0)
    if mode == "split_atomic_dq":
        if D not in WS_BWD_CONFIG or H == hkv:
            pytest.skip("no GQA group to split")
        monkeypatch.setattr("attention.gluon.bwd.split_group", lambda *args: True)
    q, k, v = cuda_qkv(B, nq, nk, H, hkv, D, dtype)
    scale = D ** -0.5
    out, lse = triton_attn_forward(q, k, v, causal, scale, window)
    ref_out, ref_lse = reference_attn_forward(q.float(), k.float(), v.float(), causal, scale, window)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    grads = _grads(dout, q, k, v, out, lse, causal, window, dlse, deterministic)
    want = reference_attn_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, causal, scale,
                                   window, dlse=dlse)
    tri = triton_attn_backward(dout, q, k, v, out, lse, causal, scale, window, dlse, deterministic)
    for name, g, w, t, src in zip(("dq", "dk", "dv"), grads, want, tri, (q, k, v)):
        assert g.dtype == dtype and g.shape == src.shape, name
        assert not torch.isnan(g).any(), f"{name}: NaN"
        assert rel_err(g, w) < GRAD_TOL, (name, rel_err(g, w))
        assert rel_err(g, t) < GRAD_TOL, (name, rel_err(g, t))
    # rows that see no key get zero dq; keys that no query sees get zero dk / dv
    dead_rows = torch.isinf(ref_lse).transpose(1, 2)  # (B, Nq, H)
    assert (grads[0][dead_rows] == 0).all()
    seen = torch.zeros(nk, dtype=torch.bool, device=q.device)
    for lo, hi in _key_spans(nq, nk, causal, window):
        seen[lo:hi] = True
    assert (grads[1][:, ~seen] == 0).all() and (grads[2][:, ~seen] == 0).all()


def _key_spans(nq, nk, causal, window):
    """Half-open key spans each query row sees (the reference's visibility rule)."""
    from attention.reference import effective_window, key_range
    left, right = effective_window(causal, window)
    return [key_range(i, i + 1, nq, nk, left, right) for i in range(nq)]


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (300, 0)), (False, (200, 100))])
@pytest.mark.parametrize("nq,nk", [(3000, 3000), (2000, 3100)])
@pytest.mark.parametrize("l2", [None, 0], ids=["l2", "descending"])
@pytest.mark.parametrize("D", [128, 64])
def test_deterministic_backward_repeats_bitwise_and_matches_the_other_mode(nq, nk, causal, window, l2, D,
                                                                           monkeypatch):
    """Many key blocks add into each query block's dq: in the deterministic mode (the warp-specialized kernel
    orders the additions by a semaphore per query block) every run gives the same bits. l2=0: as if the heads
    outgrew the L2, so that causal key blocks without a window walk their query blocks last to first
    (plan_bwd.descending_walk) and the GQA group is split over programs, whose fp32 dK / dV the host sums in a
    fixed order (plan_bwd.split_group)."""
    if l2 is not None:
        monkeypatch.setattr("attention.gluon.bwd.l2_bytes", lambda device: l2)
    q, k, v = cuda_qkv(2, nq, nk, 8, 2, D, torch.bfloat16)
    from attention.triton.fwd import triton_attn_forward
    out, lse = triton_attn_forward(q, k, v, causal, D ** -0.5, window)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    runs = [_grads(dout, q, k, v, out, lse, causal, window, dlse, True) for _ in range(4)]
    for again in runs[1:]:
        for a, b in zip(runs[0], again):
            assert torch.equal(a, b)
    other = _grads(dout, q, k, v, out, lse, causal, window, dlse, False)
    for a, b in zip(runs[0], other):
        assert rel_err(b, a) < 1e-2


@pytest.mark.parametrize("D", [128, 64])
@pytest.mark.parametrize("split", [False, True], ids=["group", "split"])
def test_deterministic_backward_gives_the_same_bits_in_either_launch_order(D, split, monkeypatch):
    """Without a mask the deterministic backward interleaves (batch, head) pairs two by two in its launch order
    (plan_bwd.head_interleave); the semaphores fix the order of the additions, so dq, dk, dv are the bits of the
    launch pair after pair."""
    from attention.gluon.plan_bwd import head_interleave
    if split:
        monkeypatch.setattr("attention.gluon.bwd.split_group", lambda *args: True)
    q, k, v = cuda_qkv(2, 2000, 2000, 8, 2, D, torch.bfloat16)
    assert head_interleave(False, (-1, -1), True, 2 * (8 if split else 2)) == 2
    from attention.triton.fwd import triton_attn_forward
    out, lse = triton_attn_forward(q, k, v, False, D ** -0.5, (-1, -1))
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    interleaved = _grads(dout, q, k, v, out, lse, False, (-1, -1), dlse, True)
    monkeypatch.setattr("attention.gluon.bwd.head_interleave", lambda *args: 1)
    in_turn = _grads(dout, q, k, v, out, lse, False, (-1, -1), dlse, True)
    for a, b in zip(interleaved, in_turn):
        assert torch.equal(a, b)


def test_gluon_backward_is_deterministic_and_takes_strided_views():
    q, k, v = cuda_qkv(1, 2048, 2048, 8, 2, 128, torch.bfloat16)
    from attention.triton.fwd import triton_attn_forward
    out, lse = triton_attn_forward(q, k, v, True, 128 ** -0.5, (-1, -1))
    dout = torch.randn(1, 2048, 8, 129, device="cuda", dtype=torch.bfloat16)[..., :128]  # 258-byte rows: copied
    first = _grads(dout, q, k, v, out, lse, True, (-1, -1), None, True)
    second = _grads(dout, q, k, v, out, lse, True, (-1, -1), None, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = _grads(dout, q, k, v, out, lse, True, (-1, -1), None, False)
    for a, b in zip(first, atomic):
        assert rel_err(b, a) < 1e-2
    again = _grads(dout, q, k, v, out, lse, True, (-1, -1), None, False)
    assert torch.equal(atomic[1], again[1]) and torch.equal(atomic[2], again[2])  # dK / dV never use atomics


VARLEN_CASES = [  # query lengths, key lengths (None: the same), H, Hkv, D, causal, window; bf16
    ([1000, 0, 1, 2049, 517, 4096], None, 8, 2, 128, True, (-1, -1)),
    ([1000, 0, 1, 2049, 517, 4096], None, 8, 8, 128, False, (-1, -1)),
    ([128, 64, 192, 63, 65, 256, 1], None, 4, 1, 128, True, (-1, -1)),  # tile-edge lengths
    ([3000, 700, 1500], None, 8, 4, 128, True, (300, -1)),  # sliding window per document
    ([900, 1200], None, 4, 4, 128, False, (100, 50)),
    ([300, 1000, 5], [700, 1000, 0], 4, 2, 128, True, (-1, -1)),  # Nq != Nk per document, a document with no key
    ([1000, 0, 1, 2049, 517, 4096], None, 8, 2, 64, True, (-1, -1)),
    ([128, 64, 192, 63, 65, 256, 1], None, 4, 4, 64, False, (100, 50)),
]


@pytest.mark.parametrize("deterministic", [True, False], ids=["dq_kernel", "atomic_dq"])
@pytest.mark.parametrize("lens_q,lens_k,H,hkv,D,causal,window", VARLEN_CASES)
def test_gluon_packed_document_backward_matches_fp32_reference_and_triton(lens_q, lens_k, H, hkv, D, causal, window,
                                                                          deterministic, monkeypatch):
    """The warp-specialized backward over (document, key block) programs, in both modes (causal key blocks walk
    last to first in both), short documents included."""
    from attention import attn_varlen_backward, attn_varlen_forward
    from attention.gluon import dispatch
    from helpers import cu_seqlens
    monkeypatch.setattr(dispatch, "GLUON_VARLEN_BWD_MIN_SEQLEN", 0)
    monkeypatch.setattr(dispatch, "GLUON_VARLEN_HEAD_DIMS", (64, 128))  # the kernel at every head dim it takes
    lens_k = lens_q if lens_k is None else lens_k
    cu = [cu_seqlens(lens, "cuda") for lens in (lens_q, lens_k)]
    q, k, v = (t[0] for t in cuda_qkv(1, sum(lens_q), sum(lens_k), H, hkv, D, torch.bfloat16))
    args = (*cu, max(lens_q), max(lens_k), causal, None, window)
    out, lse = attn_varlen_forward(q, k, v, *args, backend="triton")
    ref_out, ref_lse = attn_varlen_forward(q.float(), k.float(), v.float(), *args, backend="reference")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = attn_varlen_backward(dout, q, k, v, out, lse, *args, dlse=dlse, backend="gluon",
                                 deterministic=deterministic)
    want = attn_varlen_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, *args, dlse=dlse,
                                backend="reference")
    tri = attn_varlen_backward(dout, q, k, v, out, lse, *args, dlse=dlse, backend="triton")
    for name, g, w, t, src in zip(("dq", "dk", "dv"), grads, want, tri, (q, k, v)):
        assert g.dtype == src.dtype and g.shape == src.shape, name
        assert rel_err(g, w) < GRAD_TOL, (name, rel_err(g, w))
        assert rel_err(g, t) < GRAD_TOL, (name, rel_err(g, t))
    dead_rows = torch.isinf(ref_lse).transpose(0, 1)  # (total_q, H): rows that see no key
    assert (grads[0][dead_rows] == 0).all()
    if deterministic:
        again = attn_varlen_backward(dout, q, k, v, out, lse, *args, dlse=dlse, backend="gluon", deterministic=True)
        for a, b in zip(grads, again):
            assert torch.equal(a, b)
