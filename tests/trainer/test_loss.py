"""trainer/loss.py: chunked lm-head + CE equals plain cross-entropy in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from trainer.model.loss import chunked_cross_entropy, global_valid_count


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


def test_expression_form_matches_the_in_place_form():
    """ce_chunk_grad is what torch.compile sees on CUDA (model.compile); eager it must equal the in-place
    form the CPU path runs, ignored labels included."""
    from trainer.model.loss import _in_place_chunk_grad, ce_chunk_grad
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(37, 101, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 101, (37,), generator=g)
    labels[[0, 5, 36]] = -100
    loss_a, grad_a = ce_chunk_grad(logits, labels, -100)
    loss_b, grad_b = _in_place_chunk_grad(logits.clone(), labels, -100)
    want = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    assert_close(loss_a, want, "loss", atol=1e-4, rtol=1e-5)
    assert_close(loss_b, want, "loss in place", atol=1e-4, rtol=1e-5)
    assert grad_a.dtype == torch.bfloat16 and torch.equal(grad_a, grad_b)
    assert (grad_a[[0, 5, 36]] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_chunks_on_cuda_match_eager():
    """compile=True: the torch.compile'd softmax gradient and the fp32-output addmm for the weight gradient."""
    from trainer.model import loss as loss_mod
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(5000, 256, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(3000, 256, device="cuda", generator=g) * 0.05).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 3000, (5000,), device="cuda", generator=g)
    labels[::7] = -100
    grads = {}
    for compile in (False, True):
        hidden.grad = weight.grad = None
        total = chunked_cross_entropy(hidden, weight, labels, 2048, compile=compile)
        total.backward()
        grads[compile] = (total.detach(), hidden.grad.clone(), weight.grad.clone())
    want = F.cross_entropy(hidden.detach().float() @ weight.detach().float().T, labels, reduction="sum")
    assert_close(grads[True][0], want, "loss", atol=1e-2, rtol=1e-3)
    for name, a, b in zip(("loss", "d hidden", "d weight"), grads[True], grads[False]):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2, name
    assert loss_mod._ADDMM_FP32_OUT[0] is True  # the fp32-output GEMM ran (torch 2.11 + cu130 on an H200: yes)
