"""trainer/loss.py: chunked lm-head + CE equals plain cross-entropy in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close
from trainer.loss import chunked_cross_entropy, global_valid_count


def plain_ce_sum(hidden, weight, labels):
    return F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")


def make_inputs(tokens, vocab, dim, dtype=torch.float64, ignore_frac=0.3):
    hidden = torch.randn(tokens, dim, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    labels[torch.rand(tokens) < ignore_frac] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("tokens,chunk", [(37, 8), (37, 1), (37, 100), (64, 16), (5, 3)])
def test_value_and_grads_match_plain_ce(tokens, chunk):
    hidden, weight, labels = make_inputs(tokens, vocab=29, dim=12)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    dout = torch.tensor(0.37, dtype=torch.float64)  # a non-unit upstream gradient (the 1/count scaling)
    gh, gw = torch.autograd.grad(loss, (hidden, weight), dout)
    expected = plain_ce_sum(hidden, weight, labels)
    eh, ew = torch.autograd.grad(expected, (hidden, weight), dout)
    # fp32 softmax inside (as in training), fp64 inputs: compare at fp32 accuracy.
    assert_close(loss, expected.float(), "loss")
    assert_close(gh.float(), eh.float(), "d hidden")
    assert_close(gw.float(), ew.float(), "d weight")


def test_fp32_and_only_weight_requires_grad():
    hidden, weight, labels = make_inputs(40, vocab=50, dim=16, dtype=torch.float32)
    hidden = hidden.detach()
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=7)
    loss.backward()
    w2 = weight.detach().clone().requires_grad_()
    plain_ce_sum(hidden, w2, labels).backward()
    assert_close(loss, plain_ce_sum(hidden, w2, labels).detach(), "loss")
    assert_close(weight.grad, w2.grad, "d weight")


def test_all_ignored_is_zero_with_zero_grads():
    hidden, weight, _ = make_inputs(9, vocab=11, dim=4)
    labels = torch.full((9,), -100)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_no_grad_path_matches():
    hidden, weight, labels = make_inputs(33, vocab=17, dim=8)
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=5)
    assert not loss.requires_grad
    assert_close(loss, plain_ce_sum(hidden, weight, labels).detach().float(), "no-grad loss")


def test_bf16_autocast_close_to_fp32():
    hidden, weight, labels = make_inputs(64, vocab=40, dim=32, dtype=torch.float32)
    expected = plain_ce_sum(hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=16)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert abs(loss.item() - expected.item()) / expected.item() < 2e-2


def test_bad_inputs():
    hidden, weight, labels = make_inputs(6, vocab=5, dim=4)
    with pytest.raises(ValueError, match="hidden"):
        chunked_cross_entropy(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="weight"):
        chunked_cross_entropy(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=0)


def test_global_valid_count_single_process():
    count = global_valid_count(123, torch.device("cpu"))
    assert count.item() == 123.0 and count.dtype == torch.float32
