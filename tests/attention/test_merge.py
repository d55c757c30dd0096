"""merge_attn_outputs: attention over split keys, merged by lse, equals one softmax over all keys."""

import pytest
import torch

from attention import flash_attn_func, flash_attn_varlen_func, merge_attn_outputs
from attn_oracle import oracle, rand_qkv
from helpers import assert_close


def _parts(q, k, v, splits, causal):
    """Attention of q on each key slice [a, b). Bottom-right causal over all Nk keys restricted to keys
    [a, b) is, in the slice's own alignment, the window (-1, Nk - b) (causal for the last slice)."""
    nk = k.shape[1]
    bounds = [0, *splits, nk]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        window = (-1, nk - b) if causal else (-1, -1)
        parts.append(flash_attn_func(q, k[:, a:b], v[:, a:b], window_size=window, return_lse=True,
                                     backend="reference"))
    return parts


@pytest.mark.parametrize("splits,causal", [([9], False), ([3, 17], False), ([1, 2, 20], True), ([12], True)])
def test_split_keys_merge_equals_full(splits, causal):
    q, k, v = rand_qkv(2, 15, 24, 4, 2, 8, requires_grad=True)
    dout, dlse = torch.randn(2, 15, 4, 8), torch.randn(2, 4, 15)
    out, lse = merge_attn_outputs(_parts(q, k, v, splits, causal))
    e_out, e_lse, e_dq, e_dk, e_dv = oracle(q, k, v, dout, dlse, causal)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, e_out, "out")
    assert_close(lse, e_lse, "lse")
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    assert_close(q.grad, e_dq, "dq")
    assert_close(k.grad, e_dk, "dk")
    assert_close(v.grad, e_dv, "dv")


def test_parts_with_empty_rows():
    """Nq > Nk causal: in the split, early rows see nothing in some or all parts (lse -inf there)."""
    q, k, v = rand_qkv(1, 20, 12, 2, 2, 8, requires_grad=True)
    dout, dlse = torch.randn(1, 20, 2, 8), torch.randn(1, 2, 20)
    parts = _parts(q, k, v, [4], causal=True)
    assert torch.isinf(parts[1][1]).any() and torch.isinf(parts[0][1]).any()
    out, lse = merge_attn_outputs(parts)
    e_out, e_lse, e_dq, e_dk, e_dv = oracle(q, k, v, dout, dlse, causal=True)
    assert_close(out, e_out, "out")
    assert_close(lse, e_lse, "lse")
    ((out * dout).sum() + (torch.where(torch.isinf(lse), 0, lse) * dlse).sum()).backward()
    assert_close(q.grad, e_dq, "dq")
    assert_close(k.grad, e_dk, "dk")
    assert_close(v.grad, e_dv, "dv")


def test_minus_inf_part_contributes_nothing():
    out1, lse1 = torch.randn(2, 7, 3, 8), torch.randn(2, 3, 7)
    empty = (torch.randn(2, 7, 3, 8), torch.full((2, 3, 7), float("-inf")))  # garbage out, but lse -inf
    out, lse = merge_attn_outputs([empty, (out1, lse1), empty])
    assert_close(out, out1, "out")
    assert_close(lse, lse1, "lse")


def test_all_minus_inf_gives_zero_out_and_finite_grads():
    outs = [torch.randn(1, 5, 2, 4, requires_grad=True) for _ in range(3)]
    lses = [torch.full((1, 2, 5), float("-inf"), requires_grad=True) for _ in range(3)]
    out, lse = merge_attn_outputs(list(zip(outs, lses)))
    assert (out == 0).all() and torch.isneginf(lse).all()
    (out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    for t in outs + lses:
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_merge_is_order_independent_and_single_part_identity():
    parts = [(torch.randn(1, 6, 2, 4), torch.randn(1, 2, 6) * 5) for _ in range(3)]
    a = merge_attn_outputs(parts)
    b = merge_attn_outputs(parts[::-1])
    assert_close(a[0], b[0], "out")
    assert_close(a[1], b[1], "lse")
    one = merge_attn_outputs(parts[:1])
    assert_close(one[0], parts[0][0], "out")
    assert_close(one[1], parts[0][1], "lse")


def test_varlen_layout_and_low_precision():
    """(T, H, D) / (H, T) parts from flash_attn_varlen_func; bf16 out stays bf16, lse fp32."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q = torch.randn(12, 2, 8, dtype=torch.bfloat16)
    k = torch.randn(12, 1, 8, dtype=torch.bfloat16)
    v = torch.randn(12, 1, 8, dtype=torch.bfloat16)
    cu_k1, cu_k2 = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 3, 6], dtype=torch.int32)
    k1 = torch.cat([k[0:2], k[5:9]]), torch.cat([v[0:2], v[5:9]])
    k2 = torch.cat([k[2:5], k[9:12]]), torch.cat([v[2:5], v[9:12]])
    p1 = flash_attn_varlen_func(q, *k1, cu, cu_k1, 7, 4, return_lse=True, backend="reference")
    p2 = flash_attn_varlen_func(q, *k2, cu, cu_k2, 7, 3, return_lse=True, backend="reference")
    out, lse = merge_attn_outputs([p1, p2])
    full = flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, return_lse=True, backend="reference")
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (2, 12)
    assert_close(out, full[0], "out")
    assert_close(lse, full[1], "lse", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parts,match", [
    ([], "empty"),
    ([(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 4)), (torch.zeros(1, 5, 2, 8), torch.zeros(1, 2, 5))], "part 1"),
    ([(torch.zeros(4, 8), torch.zeros(4))], "out must be"),
    ([(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2))], "lse"),
    ([(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 4, 1))], "lse"),
])
def test_bad_input_raises_value_error(parts, match):
    with pytest.raises(ValueError, match=match):
        merge_attn_outputs(parts)
