"""Autotuning on a stand-in for very long calls (triton_common.STAND_IN), under the CPU interpreter.

On a GPU the first call longer than STAND_IN["above"] first runs the same kernels on a STAND_IN["len"]-token
stand-in, so the autotuner times its candidates there instead of on the long call. Here the thresholds are
shrunk and the interpreter plays the GPU: the stand-in must run once per kind of call, before the real
launch, and must not change the long call's results.
"""

import os


import pytest  # noqa: E402
import torch  # noqa: E402

from attention import reference_attn_backward  # noqa: E402
from helpers import assert_close, naive_attention  # noqa: E402

triton_common = pytest.importorskip("attention.triton.common")
pytestmark = pytest.mark.skipif(not triton_common.INTERPRET,
                                reason="attention.triton_* was imported before TRITON_INTERPRET=1 was set")
from attention.triton import bwd as triton_bwd, fwd as triton_fwd  # noqa: E402

LONG, STAND_IN = 40, 24


@pytest.fixture
def launches(monkeypatch):
    """Stand-in thresholds shrunk to test sizes; records (kernel pass, longest length) of every launch."""
    monkeypatch.setitem(triton_common.STAND_IN, "above", 32)
    monkeypatch.setitem(triton_common.STAND_IN, "len", STAND_IN)
    monkeypatch.setitem(triton_common.STAND_IN, "on_cpu", True)
    monkeypatch.setattr(triton_common, "_STOOD_IN", set())
    seen = []
    real_fwd, real_bwd = triton_fwd._launch_fwd, triton_bwd._launch_bwd

    def fwd(*a, **kw):
        seen.append(("fwd", max(a[11], a[12])))  # max_q, max_k
        return real_fwd(*a, **kw)

    def bwd(*a, **kw):
        seen.append(("bwd", max(a[11], a[12])))
        return real_bwd(*a, **kw)

    monkeypatch.setattr(triton_fwd, "_launch_fwd", fwd)
    monkeypatch.setattr(triton_bwd, "_launch_bwd", bwd)
    return seen


def _qkv(n, lead=(1,)):
    torch.manual_seed(0)
    return [torch.randn(*lead, n, h, 32) for h in (4, 2, 2)]  # GQA: 4 query heads, 2 kv heads


def test_dense_forward_and_backward_stand_in_once(launches):
    q, k, v = _qkv(LONG)
    scale = 32 ** -0.5
    out, lse = triton_fwd.triton_attn_forward(q, k, v, True, scale, (-1, -1))
    assert launches == [("fwd", STAND_IN), ("fwd", LONG)]
    want_out, want_lse = naive_attention(q.double(), k.double(), v.double(), True, scale, (-1, -1))
    assert_close(out, want_out.float(), "out")
    assert_close(lse, want_lse.float(), "lse")

    launches.clear()
    triton_fwd.triton_attn_forward(q, k, v, True, scale, (-1, -1))
    assert launches == [("fwd", LONG)], "the stand-in runs once per kind of call"

    launches.clear()
    dout = torch.randn_like(out)
    grads = triton_bwd.triton_attn_backward(dout, q, k, v, out, lse, True, scale, (-1, -1), None)
    # the backward's stand-in needs a forward of its own first
    assert launches == [("fwd", STAND_IN), ("bwd", STAND_IN), ("bwd", LONG)]
    want = reference_attn_backward(dout.double(), q.double(), k.double(), v.double(), want_out, want_lse.float(),
                                   True, scale, (-1, -1))
    for g, w, name in zip(grads, want, ("dq", "dk", "dv")):
        assert_close(g, w.float(), name)


def test_new_kind_of_call_gets_its_own_stand_in_and_short_calls_none(launches):
    q, k, v = _qkv(LONG)
    triton_fwd.triton_attn_forward(q, k, v, True, 0.2, (-1, -1))
    triton_fwd.triton_attn_forward(q, k, v, False, 0.2, (-1, -1))  # other window flags: another autotune key
    triton_fwd.triton_attn_forward(*_qkv(STAND_IN + 1), False, 0.2, (-1, -1))  # not long: tuned in place
    assert launches == [("fwd", STAND_IN), ("fwd", LONG), ("fwd", STAND_IN), ("fwd", LONG), ("fwd", STAND_IN + 1)]


def test_varlen_stand_in_matches_the_plain_call(launches):
    q, k, v = _qkv(2 * LONG, lead=())
    cu = torch.tensor([0, 7, 2 * LONG], dtype=torch.int32)
    args = (q, k, v, cu, cu, 2 * LONG - 7, 2 * LONG - 7, True, 0.2, (-1, -1))
    out, lse = triton_fwd.triton_attn_varlen_forward(*args)
    assert launches == [("fwd", STAND_IN), ("fwd", 2 * LONG - 7)]
    launches.clear()
    dout = torch.randn_like(out)
    grads = triton_bwd.triton_attn_varlen_backward(dout, q, k, v, out, lse, cu, cu, 2 * LONG - 7, 2 * LONG - 7,
                                                   True, 0.2, (-1, -1), None)
    assert launches == [("fwd", STAND_IN), ("bwd", STAND_IN), ("bwd", 2 * LONG - 7)]

    triton_common.STAND_IN["on_cpu"] = False  # (restored by monkeypatch) the same calls without a stand-in
    out2, lse2 = triton_fwd.triton_attn_varlen_forward(*args)
    grads2 = triton_bwd.triton_attn_varlen_backward(dout, q, k, v, out2, lse2, cu, cu, 2 * LONG - 7, 2 * LONG - 7,
                                                    True, 0.2, (-1, -1), None)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g, g2)


def test_fp8_forward_stand_in_once_and_same_result(launches, monkeypatch):
    from attention.fp8 import Fp8Config, quantize_qkv
    from attention.fp8 import kernel as triton_fp8
    seen = []
    real = triton_fp8._fwd_args
    monkeypatch.setattr(triton_fp8, "_fwd_args", lambda fq, *a: seen.append(fq.q.shape[1]) or real(fq, *a))
    q, k, v = _qkv(2 * LONG)
    fq = quantize_qkv(q, k, v, Fp8Config(block_m=16, block_n=16, rotate=False))
    out, lse = triton_fp8.triton_fp8_forward(fq, True, 0.2, torch.float32)
    triton_fp8.triton_fp8_forward(fq, True, 0.2, torch.float32)
    assert seen == [STAND_IN, 2 * LONG, 2 * LONG]
    triton_common.STAND_IN["on_cpu"] = False  # (restored by monkeypatch)
    monkeypatch.setattr(triton_common, "_STOOD_IN", set())
    out2, lse2 = triton_fp8.triton_fp8_forward(fq, True, 0.2, torch.float32)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_length_classes_and_the_forward_pins():
    """Three length classes (under 4K, 4K-8K, 8K up); at D=128 with TMA the forward keeps only the tile pinned
    for the call's class (64x64, 4 warps under 4K; 128x128 warp-specialised above), whatever else survives."""
    lc = triton_common.length_class
    assert [lc(n) for n in (1, 4095, 4096, 8191, 8192, 1 << 21)] == [triton_common.SHORT] * 2 + \
        [triton_common.MID] * 2 + [triton_common.LONG] * 2
    assert len({triton_common.SHORT, triton_common.MID, triton_common.LONG}) == 3
    assert all(c % 16 == 0 for c in (triton_common.SHORT, triton_common.MID, triton_common.LONG))

    def tile(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["WARP_SPEC"]

    for n, want in ((2048, (64, 64, 4, 3, False)), (4096, (128, 128, 8, 3, True)), (65536, (128, 128, 8, 3, True))):
        kept = triton_fwd._prune_fwd(triton_fwd.FWD_CONFIGS, {"len_class": lc(n)}, BLOCK_D=128, USE_TMA=True)
        assert [tile(c) for c in kept] == [want], n
    # no pin without TMA or at other head dims: the autotuner chooses among the pruned list
    assert len(triton_fwd._prune_fwd(triton_fwd.FWD_CONFIGS, {"len_class": lc(2048)}, BLOCK_D=128,
                                     USE_TMA=False)) > 1
    assert len(triton_fwd._prune_fwd(triton_fwd.FWD_CONFIGS, {"len_class": lc(2048)}, BLOCK_D=64,
                                     USE_TMA=True)) > 1
